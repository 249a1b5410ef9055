"""scripts/lock_select.py: the lock without what only the frameworks left out need (install.sh's
HPCTRAIN_FRAMEWORKS), and install.sh's checks of that setting."""
import subprocess
import sys

import pytest

from tests.launch import ROOT

sys.path.insert(0, str(ROOT / "scripts"))
import lock_select

LOCK = ROOT / "requirements" / "lock.txt"
BASE_IN = ROOT / "requirements" / "base.in"
SCRIPT = ROOT / "scripts" / "lock_select.py"


def _names(text: str) -> set[str]:
    return {name for name, _ in lock_select.blocks(text) if name}


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize("drop", ["horovod", "horovod|torch", "horovod|tensorflow", "horovod|torch|tensorflow"])
def test_both_frameworks_give_exactly_what_install_sh_installed_before(drop):
    # The awk filter install.sh used until the framework list existed: the host path must not change.
    awk = subprocess.run(["awk", "-v", f"drop={drop}",
                          '/^[^ #]/ { split($1, a, "=="); skip = (a[1] ~ "^(" drop ")$") } !skip', str(LOCK)],
                         capture_output=True, text=True, check=True).stdout
    assert _cli("--drop", drop, str(LOCK)).stdout == awk


def test_torch_only_leaves_out_exactly_the_tensorflow_closure():
    text = LOCK.read_text()
    parsed = lock_select.blocks(text)
    needs = {name: lock_select.dependents(lines) for name, lines in parsed if name}
    kept = _names(lock_select.select(text, {"torch"}, {"horovod"}))
    gone = set(needs) - kept - {"horovod"}
    assert {"tensorflow", "keras-hub", "keras", "tensorflow-text", "h5py", "requests", "urllib3"} <= gone
    assert {"torch", "tensorboard", "grpcio", "protobuf", "absl-py", "numpy", "transformers", "mpi4py"} <= kept
    for name in gone - lock_select.ROOTS["tf"]:  # nothing kept needs what went
        assert needs[name] <= gone, (name, needs[name])
    for name in kept:  # everything kept is asked for by base.in or by something kept
        assert lock_select.DIRECT in needs[name] or needs[name] & kept, (name, needs[name])
    # Hash lines and comments travel with their package.
    total = text.count("--hash=sha256:")
    gone_hashes = sum("".join(lines).count("--hash=sha256:") for name, lines in parsed if name in gone)
    assert lock_select.select(text, {"torch"}).count("--hash=sha256:") == total - gone_hashes > 0


def test_closure_reaches_a_fixed_point():
    text = ("keras-hub==1 \\\n    # via -r base.in\ntensorflow==2 \\\n    # via -r base.in\n"
            "a==1 \\\n    # via keras-hub\nb==1 \\\n    # via\n    #   a\n    #   tensorflow\n"
            "c==1 \\\n    # via\n    #   b\n    #   torch\ntorch==3 \\\n    # via -r base.in\n")
    assert _names(lock_select.select(text, {"torch"})) == {"c", "torch"}
    assert _names(lock_select.select(text, {"torch", "tf"})) == {"keras-hub", "tensorflow", "a", "b", "c", "torch"}


def test_base_in_without_via_loses_only_roots_and_drops():
    out = _cli("--frameworks", "torch", "--drop", "horovod", str(BASE_IN)).stdout
    names = _names(out)
    assert {"tensorflow", "keras-hub", "horovod"}.isdisjoint(names) and {"torch", "numpy", "pytest"} <= names
    assert "GPU clusters install tensorflow" not in out  # a package's continuation comment goes with it


@pytest.mark.parametrize("value", ["tf", "jax", "", "torch,jax"])
def test_bad_framework_list_is_one_line(value):
    p = _cli("--frameworks", value, str(LOCK))
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr == f"lock_select.py: error: --frameworks: {value!r} is not allowed (allowed: torch, torch,tf)\n"


@pytest.mark.parametrize("env, words", [
    ({"HPCTRAIN_FRAMEWORKS": "jax"}, "HPCTRAIN_FRAMEWORKS='jax' is not allowed (allowed: torch,tf or torch)"),
    ({"HPCTRAIN_FRAMEWORKS": "torch", "HPCTRAIN_TF": "tensorflow==2.21.0"},
     "HPCTRAIN_TF='tensorflow==2.21.0' set but HPCTRAIN_FRAMEWORKS=torch"),
])
def test_install_sh_refuses_bad_framework_settings_before_doing_anything(env, words, tmp_path):
    p = subprocess.run(["bash", str(ROOT / "scripts" / "install.sh")], capture_output=True, text=True, timeout=30,
                       env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "HPCTRAIN_VENV": str(tmp_path / "v"),
                            **env})
    assert p.returncode == 2 and p.stdout == "" and not (tmp_path / "v").exists()
    assert p.stderr.count("\n") == 1 and words in p.stderr, p.stderr
