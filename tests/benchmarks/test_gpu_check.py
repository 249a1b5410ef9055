"""benchmarks/gpu_check.py (the one-command GPU check) and scripts/gpu_check_prepare.sh: lint-clean (ruff for
the driver, which must stay standard-library only; shellcheck for the prepare script), the dry run plans every
step with its command, with or without the wheelhouse, bad input is refused in one line, and a real run on a
machine without a GPU records its steps and packs its logs.

shellcheck comes from the system (apt-get install shellcheck; the test installs it when it can): a
machine where it can be neither found nor installed FAILS here with that message, it never skips.
"""
import ast
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from benchmarks import gpu_check

ROOT = Path(__file__).resolve().parents[2]
DRIVER = "benchmarks/gpu_check.py"
STEPS = ["machine_info", "install_deps", "horovod_build", "horovod_check_build", "resnet50_fp16", "resnet50_bf16",
         "plain_resnet50_fp16", "plain_resnet50_bf16", "bert_base_bf16", "ddp_resnet50_fp16", "resume_fp16_part1",
         "resume_fp16_part2"]
MISSING = "wheelhouse missing: run scripts/gpu_check_prepare.sh"


def _shellcheck() -> str:
    found = shutil.which("shellcheck")
    if found:
        return found
    sudo = [] if os.geteuid() == 0 else ["sudo", "-n"]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    tried = []
    if shutil.which("apt-get"):
        for cmd in (sudo + ["apt-get", "update", "-qq"], sudo + ["apt-get", "install", "-y", "-qq", "shellcheck"]):
            p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
            tried.append(f"{' '.join(cmd)} -> rc {p.returncode}: {p.stderr.strip()[-300:]}")
    found = shutil.which("shellcheck")
    if not found:
        pytest.fail("shellcheck is not installed and could not be installed (apt-get install shellcheck); "
                    "install it to run this test. Tried:\n" + ("\n".join(tried) or "no apt-get on this machine"))
    return found


def _check(tmp_path, wheels, *args, env_extra=None, timeout=120):
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPU_CHECK_")}
    env.update(OUT=str(tmp_path / "out"), GPU_CHECK_WHEELS=str(wheels), GPU_CHECK_WORK=str(tmp_path / "work"),
               GPU_CHECK_PYTHON=sys.executable)
    env.update(env_extra or {})
    return subprocess.run([sys.executable, DRIVER, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def _dry_run(tmp_path, wheels):
    p = _check(tmp_path, wheels, "--dry-run")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    out = tmp_path / "out"
    assert sorted(x.name for x in out.iterdir()) == ["gpu_check.json"], list(out.iterdir())  # nothing else left
    return json.loads((out / "gpu_check.json").read_text()), p.stdout


def _wheelhouse(path: Path, sdist=True) -> Path:
    path.mkdir()
    if sdist:
        (path / "horovod-0.28.1.tar.gz").write_bytes(b"")
    (path / "manifest.tsv").write_text("# dist\tversion\timport\ntqdm\t4.70.1\ttqdm\npyyaml\t6.0.4\tyaml\n"
                                       "tokenizers\t0.23.3\ttokenizers\n")
    for name in ("tqdm-4.70.1-py3-none-any.whl", "pyyaml-6.0.4-cp311-cp311-manylinux2014_x86_64.whl",
                 "pyyaml-6.0.4-cp312-cp312-manylinux2014_x86_64.manylinux_2_17_x86_64.whl",
                 "tokenizers-0.23.3-cp310-abi3-manylinux_2_17_x86_64.manylinux2014_x86_64.whl"):
        (path / name).write_bytes(b"")
    return path


def test_shellcheck_clean():
    p = subprocess.run([_shellcheck(), "-x", "scripts/gpu_check_prepare.sh"], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr


def test_driver_is_lint_clean_and_standard_library_only():
    """It runs before anything is installed: the standard library only; torch only inside the probes, which
    run under GPU_CHECK_PYTHON."""
    p = subprocess.run([sys.executable, "-m", "ruff", "check", DRIVER], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr  # ruff is a locked dev dependency (requirements/lock.txt)
    tree = ast.parse((ROOT / DRIVER).read_text())
    top = {a.name.split(".")[0] for n in tree.body if isinstance(n, ast.Import) for a in n.names}
    top |= {n.module.split(".")[0] for n in tree.body if isinstance(n, ast.ImportFrom)}
    assert top <= set(sys.stdlib_module_names) | {"__future__"}, top - set(sys.stdlib_module_names)
    inner = {a.name for f in tree.body if isinstance(f, ast.FunctionDef) for n in ast.walk(f)
             if isinstance(n, ast.Import) for a in n.names}
    assert inner <= {"torch"}, inner
    too_long = [f"{n.name}: {n.end_lineno - n.lineno + 1} lines" for n in ast.walk(tree)
                if isinstance(n, ast.FunctionDef) and n.end_lineno - n.lineno + 1 > 60]
    assert not too_long, too_long


def test_dry_run_without_wheelhouse(tmp_path):
    data, stdout = _dry_run(tmp_path, tmp_path / "no-wheelhouse")
    assert data["dry_run"] is True and data["plan_complete"] is True
    steps = {s["name"]: s for s in data["steps"]}
    assert [s["name"] for s in data["steps"]] == STEPS
    assert [s["id"] for s in data["steps"]] == [f"{i:02d}" for i in range(1, 13)]
    for s in data["steps"]:
        assert s["status"] == "planned" and s["command"].strip() and s["what"], s
        assert s["timeout_s"] > 0, s
    for name in STEPS:
        assert name in stdout  # each step and its command is printed
    cmd = {n: s["command"] for n, s in steps.items()}
    # the exact commands the GPU machine would run
    for flag in ("--no-index", "--no-deps", "--target"):
        assert flag in cmd["install_deps"], flag
    for flag in ("HOROVOD_GPU_OPERATIONS=NCCL", "HOROVOD_WITH_PYTORCH=1", "HOROVOD_WITHOUT_TENSORFLOW=1",
                 "HOROVOD_WITHOUT_MXNET=1", "HOROVOD_WITH_GLOO=1", "scripts/cxx17-shim.sh", "MAKEFLAGS=-j",
                 "horovod-0.28.1.tar.gz", "--no-build-isolation"):
        assert flag in cmd["horovod_build"], flag
    assert "HOROVOD_WITH_MPI=1" in cmd["horovod_build"] or "HOROVOD_WITHOUT_MPI=1" in cmd["horovod_build"]
    assert cmd["horovod_check_build"].endswith("horovod.runner.launch --check-build")
    for amp in ("fp16", "bf16"):
        c = cmd[f"resnet50_{amp}"]
        assert "-np 1" in c and "-m hpctrain.resnet --backend horovod" in c and f"--amp {amp}" in c
        for flag in ("--dataset synthetic", "--arch resnet50", "--image-size 224", "--batch-size 256",
                     "--max-steps 60", "--log-every 20", "--progress never", "/runs/resnet50_"):
            assert flag in c, (flag, c)
        p = cmd[f"plain_resnet50_{amp}"]
        assert "benchmarks/plain_horovod.py --device cuda" in p and f"--amp {amp}" in p and "--batch-size 256" in p
    assert "-m hpctrain.bert" in cmd["bert_base_bf16"] and "--preset base --amp bf16" in cmd["bert_base_bf16"]
    assert "torch.distributed.run" in cmd["ddp_resnet50_fp16"] and "--nproc_per_node 1" in cmd["ddp_resnet50_fp16"]
    assert "--backend ddp" in cmd["ddp_resnet50_fp16"]
    for part, steps_ in (("part1", 20), ("part2", 30)):
        c = cmd[f"resume_fp16_{part}"]
        assert "--amp fp16 --checkpoint-every 10" in c and c.endswith(f"--max-steps {steps_}")
        assert "/runs/resume_fp16" in c
    same_run_dir = cmd["resume_fp16_part1"].split("--resume")[0] == cmd["resume_fp16_part2"].split("--resume")[0]
    assert same_run_dir
    # a fresh clone has no wheelhouse: in a dry run, reported as a check result, not an error
    checks = {c["check"]: c for c in data["checks"]}
    assert checks["wheelhouse"]["ok"] is False
    assert checks["wheelhouse"]["detail"] == MISSING
    assert MISSING in steps["install_deps"]["note"]
    assert MISSING in stdout
    assert checks["python"]["ok"] is True and "torch import" in checks and "nvidia-smi present" in checks
    assert checks["nvidia-smi present"]["required"] is False
    assert data["anchor"]["images_per_s"] == 2470
    assert data["settings"]["PIP_CONFIG_FILE"] == "/dev/null"


def test_dry_run_checks_a_wheelhouse(tmp_path):
    """The wheel checks read the manifest the prepare script writes and the wheel file names (tags)."""
    data, _ = _dry_run(tmp_path, _wheelhouse(tmp_path / "wheels"))
    checks = {c["check"]: c for c in data["checks"]}
    assert checks["wheelhouse"]["ok"] and checks["horovod sdist"]["ok"]
    assert checks["wheels for CPython 3.11"]["ok"] and checks["wheels for CPython 3.12"]["ok"]
    assert not checks["wheels for CPython 3.13"]["ok"]
    assert checks["wheels for CPython 3.13"]["detail"] == "lacking: pyyaml==6.0.4"
    assert "note" not in {s["name"]: s for s in data["steps"]}["install_deps"]


@pytest.mark.parametrize("args, env, bad", [
    (["--dry-run", "--fast"], {}, "'--fast'"),
    (["--dry-run"], {"GPU_CHECK_BUDGET_S": "7min"}, "GPU_CHECK_BUDGET_S='7min'"),
    (["--dry-run"], {"GPU_CHECK_KEEP": "yes"}, "GPU_CHECK_KEEP='yes'"),
    (["probe", "nvidia"], {}, "'nvidia'"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, env, bad):
    p = _check(tmp_path, tmp_path / "no-wheelhouse", *args, env_extra=env)
    assert p.returncode == 2 and p.stdout == "", p.stdout + p.stderr
    assert len(p.stderr.splitlines()) == 1 and bad in p.stderr and "allowed:" in p.stderr, p.stderr


@pytest.mark.parametrize("env, bad", [({}, "GPU_CHECK_WHEELS="), ({"GPU_CHECK_PYTHON": "no-such-python3"},
                                                                  "GPU_CHECK_PYTHON=no-such-python3")])
def test_a_check_that_cannot_start_says_so_in_the_json(tmp_path, env, bad):
    """A real run without its wheelhouse (or without the Python that holds torch) stops before any step."""
    p = _check(tmp_path, tmp_path / "no-wheelhouse", env_extra=env)
    assert p.returncode == 2 and len(p.stderr.splitlines()) == 1 and bad in p.stderr, p.stdout + p.stderr
    out = tmp_path / "out"
    assert sorted(x.name for x in out.iterdir()) == ["gpu_check.json"]
    data = json.loads((out / "gpu_check.json").read_text())
    assert data["dry_run"] is False and data["steps"] == [] and bad in data["error"]


def test_real_run_without_a_gpu_records_every_step(tmp_path):
    """What runs without a GPU runs (machine info, the import check); the rest is recorded as skipped, with why."""
    p = _check(tmp_path, _wheelhouse(tmp_path / "wheels", sdist=False), env_extra={"CUDA_VISIBLE_DEVICES": ""},
               timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    out = tmp_path / "out"
    assert sorted(x.name for x in out.iterdir()) == ["gpu_check.json", "gpu_check_logs.tar.gz"]
    data = json.loads((out / "gpu_check.json").read_text())
    steps = {s["name"]: s for s in data["steps"]}
    assert [s["name"] for s in data["steps"]] == STEPS and data["dry_run"] is False
    assert steps["machine_info"]["status"] == "ok" and data["machine"]["torch"]["version"]
    assert steps["install_deps"]["status"] == "ok" and data["details"]["importable"]["critical_missing"] == []
    assert "no sdist at" in steps["horovod_build"]["note"] and steps["horovod_build"]["status"] == "skipped"
    for name in STEPS[2:]:
        assert steps[name]["status"] == "skipped" and steps[name]["note"] and steps[name]["rc"] is None, steps[name]
    for name in STEPS[:2]:
        s = steps[name]
        assert s["rc"] == 0 and s["seconds"] > 0 and s["log"] == f"logs/{s['id']}-{name}.log" and s["log_tail"]
    summary = data["summary"]
    assert summary["horovod_built"] is False and summary["backend_used"]["hpctrain_backend"] == "none"
    assert summary["step_status"] == {n: steps[n]["status"] for n in STEPS}
    assert summary["resnet50_224_batch256"]["fp16"]["hpctrain_images_per_s"] is None
    with tarfile.open(out / "gpu_check_logs.tar.gz") as tar:
        assert sorted(tar.getnames()) == ["logs/01-machine_info.log", "logs/02-install_deps.log"]


def test_figures_from_a_run(tmp_path):
    """The figures each GPU step leaves: hpctrain's metrics.jsonl, the plain loop's JSON line, the resume line."""
    run = tmp_path / "run"
    run.mkdir()
    rows = [{"kind": "train", "step": s, "samples_per_s_total": v, "loss": 7.0 - s / 10} for s, v in
            ((20, 900.0), (40, 2000.0), (60, 2100.04))]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [{"kind": "eval"}, *rows]))
    log = tmp_path / "log"
    log.write_text('[0]<stdout>:{"samples_per_s_total": 2222.26, "device": "cuda", "amp": "fp16"}\n'
                   "resumed from ckpt-20.pt at step 20\n")
    cfg = gpu_check.Config(dry=False, out=tmp_path, wheels=tmp_path, python=sys.executable, work=tmp_path,
                           budget_s=60, min_step_s=1, build_timeout_s=1, keep=False, hvd_version="0.28.1")
    fig = gpu_check.figures(cfg, "hpctrain", run, log)
    assert fig["samples_per_s"] == 2100.0 and fig["samples_per_s_mean_after_first_interval"] == 2050.0
    assert fig["last_step"] == 60 and [i["step"] for i in fig["intervals"]] == [20, 40, 60]
    assert gpu_check.figures(cfg, "plain", None, log) == {"samples_per_s": 2222.3, "device": "cuda", "amp": "fp16"}
    fig = gpu_check.figures(cfg, "resume", run, log)
    assert fig["resumed_at_step"] == 20 and fig["resumed_at_step_20"] is True and fig["resumed_from"] == "ckpt-20.pt"
    assert fig["loss_scale_by_checkpoint"] == {}  # no checkpoints folder here


def test_a_step_past_its_limit_ends_with_its_children(tmp_path):
    log = tmp_path / "log"
    assert gpu_check.run_command("echo started; sleep 1177 & sleep 1177", 1, log) == 124
    assert log.read_text() == "started\n"
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert "sleep 1177" not in ps
    assert gpu_check.run_command("exit 3", 5, log) == 3


def test_plain_horovod_fp16_needs_cuda():
    p = subprocess.run([sys.executable, "benchmarks/plain_horovod.py", "--amp", "fp16"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "--amp fp16 needs --device cuda" in p.stderr, p.stderr[-2000:]
