"""benchmarks/gpu_check.sh (the one-command GPU check) and scripts/gpu_check_prepare.sh: shellcheck-clean,
and the dry run plans every step with its command, with or without the carried wheelhouse.

shellcheck comes from the system (apt-get install shellcheck; the test installs it when it can): a
machine where it can be neither found nor installed FAILS here with that message, it never skips.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = ["benchmarks/gpu_check.sh", "scripts/gpu_check_prepare.sh"]
STEPS = ["machine_info", "install_deps", "horovod_build", "horovod_check_build", "resnet50_fp16", "resnet50_bf16",
         "plain_resnet50_fp16", "plain_resnet50_bf16", "bert_base_bf16", "ddp_resnet50_fp16", "resume_fp16_part1",
         "resume_fp16_part2"]


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


def _dry_run(tmp_path, wheels):
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "GPU_CHECK_WHEELS": str(wheels), "GPU_CHECK_WORK": str(tmp_path / "work"),
           "GPU_CHECK_PYTHON": sys.executable}
    p = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--dry-run"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert sorted(x.name for x in out.iterdir()) == ["gpu_check.json"], list(out.iterdir())  # nothing else left
    return json.loads((out / "gpu_check.json").read_text()), p.stdout


def test_shellcheck_clean():
    p = subprocess.run([_shellcheck(), "-x", *SCRIPTS], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr


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
    assert "--no-index" in cmd["install_deps"] and "--no-deps" in cmd["install_deps"] and "--target" in cmd["install_deps"]
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
        assert "--amp fp16 --checkpoint-every 10" in c and c.endswith(f"--max-steps {steps_}") and "/runs/resume_fp16" in c
    assert cmd["resume_fp16_part1"].split("--resume")[0] == cmd["resume_fp16_part2"].split("--resume")[0]  # same run dir
    # a fresh clone has no wheelhouse: reported as a check result, not an error
    checks = {c["check"]: c for c in data["checks"]}
    assert checks["wheelhouse"]["ok"] is False
    assert checks["wheelhouse"]["detail"] == "wheelhouse missing: run scripts/gpu_check_prepare.sh"
    assert "wheelhouse missing: run scripts/gpu_check_prepare.sh" in steps["install_deps"]["note"]
    assert "wheelhouse missing: run scripts/gpu_check_prepare.sh" in stdout
    assert checks["python"]["ok"] is True and "torch import" in checks and "nvidia-smi present" in checks
    assert checks["nvidia-smi present"]["required"] is False
    assert data["anchor"]["images_per_s"] == 2470
    assert data["settings"]["PIP_CONFIG_FILE"] == "/dev/null"


def test_dry_run_checks_a_wheelhouse(tmp_path):
    """The wheel checks read the manifest the prepare script writes and the wheel file names (tags)."""
    w = tmp_path / "wheels"
    w.mkdir()
    (w / "horovod-0.28.1.tar.gz").write_bytes(b"")
    (w / "manifest.tsv").write_text("# dist\tversion\timport\ntqdm\t4.70.1\ttqdm\npyyaml\t6.0.4\tyaml\n"
                                    "tokenizers\t0.23.3\ttokenizers\n")
    for name in ("tqdm-4.70.1-py3-none-any.whl", "pyyaml-6.0.4-cp311-cp311-manylinux2014_x86_64.whl",
                 "pyyaml-6.0.4-cp312-cp312-manylinux2014_x86_64.manylinux_2_17_x86_64.whl",
                 "tokenizers-0.23.3-cp310-abi3-manylinux_2_17_x86_64.manylinux2014_x86_64.whl"):
        (w / name).write_bytes(b"")
    data, _ = _dry_run(tmp_path, w)
    checks = {c["check"]: c for c in data["checks"]}
    assert checks["wheelhouse"]["ok"] and checks["horovod sdist"]["ok"]
    assert checks["wheels for CPython 3.11"]["ok"] and checks["wheels for CPython 3.12"]["ok"]
    assert not checks["wheels for CPython 3.13"]["ok"]
    assert checks["wheels for CPython 3.13"]["detail"] == "lacking: pyyaml==6.0.4"
    assert "note" not in {s["name"]: s for s in data["steps"]}["install_deps"]


def test_plain_horovod_fp16_needs_cuda():
    p = subprocess.run([sys.executable, "benchmarks/plain_horovod.py", "--amp", "fp16"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "--amp fp16 needs --device cuda" in p.stderr, p.stderr[-2000:]
