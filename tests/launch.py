"""Start real multi-process jobs from tests: mpirun, horovodrun, or a single process."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def env() -> dict:
    e = dict(os.environ)
    e["PATH"] = f"{BIN}:{e.get('PATH', '')}"  # horovodrun/mpirun children must find the venv's python
    e["PYTHONPATH"] = f"{ROOT}:{e.get('PYTHONPATH', '')}"
    e["PYTHONUNBUFFERED"] = "1"
    e.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", OMPI_MCA_rmaps_base_oversubscribe="1")
    gloo_identity = ("HOROVOD_RANK", "HOROVOD_SIZE", "HOROVOD_LOCAL_", "HOROVOD_CROSS_")
    for k in [k for k in e if k.startswith(("OMPI_COMM_WORLD", "SLURM_", "PMIX_", "PMI_", *gloo_identity))]:
        del e[k]  # never inherit a launcher identity from the shell that runs pytest
    return e


def command(launcher: str, np: int, args: list[str]) -> list[str]:
    py = [sys.executable, *args]
    if launcher == "mpirun":
        return [shutil.which("mpirun") or "mpirun", "-np", str(np), "--oversubscribe", "--bind-to", "none", *py]
    if launcher == "horovodrun":
        return [str(BIN / "horovodrun"), "-np", str(np), "-H", f"localhost:{np}", *py]
    if launcher == "horovodrun-gloo":  # no mpirun: Horovod's own launcher sets HOROVOD_RANK & co.
        return [str(BIN / "horovodrun"), "--gloo", "-np", str(np), "-H", f"localhost:{np}", *py]
    if launcher == "single":
        return py
    raise ValueError(launcher)


def run(launcher: str, np: int, args: list[str], timeout: int = 180, cwd: Path | None = None,
        extra_env: dict | None = None) -> subprocess.CompletedProcess:
    e = env()
    e.update(extra_env or {})
    return subprocess.run(command(launcher, np, args), cwd=cwd or ROOT, env=e, capture_output=True, text=True,
                          timeout=timeout)


def check_ok(p: subprocess.CompletedProcess) -> str:
    """Assert a launched job succeeded; return its whole output."""
    assert p.returncode == 0, f"rc={p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p.stdout + p.stderr


def metrics(run_dir: Path, kind: str) -> list[dict]:
    """Records of one kind (train, eval, epoch) from a run's metrics.jsonl, in file order."""
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]
