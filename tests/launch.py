"""Start real multi-process jobs from tests: mpirun, horovodrun, or a single process."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def slow_fsync(delay_us: int) -> str:
    """A shell wrapper for a rank's command: rank 0 runs under strace, which holds every fsync() for `delay_us` (a
    checkpoint on a slow cluster file system); the other ranks run as they are. --seccomp-bpf stops the process at
    fsync only: without it every system call of the rank stops for strace, and the rank runs many times slower."""
    return ("if [ \"$OMPI_COMM_WORLD_RANK\" = 0 ]; then exec strace -f --seccomp-bpf -qq -o /dev/null -e trace=fsync "
            f"-e inject=fsync:delay_exit={delay_us} \"$@\"; else exec \"$@\"; fi")


SLOW_FSYNC = slow_fsync(2_500_000)  # 2.5 s


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


def start(np: int, args: list[str], wrap: str | None = None, launcher: str = "mpirun",
          extra_env: dict | None = None, new_session: bool = False) -> subprocess.Popen:
    """Start a job without waiting; `wrap` is a bash snippet each rank runs its command through ("$@");
    `new_session`: the launcher leads its own process group, as in a terminal (for Ctrl-C = SIGINT to the group)."""
    cmd = command(launcher, np, args)
    if wrap:  # mpirun -np N bash -c WRAP _ python ARGS
        at = cmd.index(args[0]) - 1
        cmd[at:at] = ["bash", "-c", wrap, "_"]
    e = env()
    e.update(extra_env or {})
    return subprocess.Popen(cmd, cwd=ROOT, env=e, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=new_session)


def wait_for(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return False


def trained(run_dir: Path, steps: int) -> bool:
    try:
        return len(metrics(run_dir, "train")) >= steps
    except (FileNotFoundError, ValueError):
        return False


def signal_ranks(job: subprocess.Popen, sig: int, module: str = "hpctrain.", rank: int | None = None) -> int:
    """Send `sig` to the job's Python rank processes (only to `rank` if given); returns how many."""
    ranks = rank_processes(job, module, rank)
    for p in ranks:
        p.send_signal(sig)
    return len(ranks)


def rank_processes(job: subprocess.Popen, module: str = "hpctrain.", rank: int | None = None) -> list:
    """The job's Python rank processes (psutil), only `rank` if given."""
    def wanted(p: psutil.Process) -> bool:
        try:
            if not (p.name().startswith("python") and any(module in part for part in p.cmdline())):
                return False
            e = p.environ()
            return rank is None or e.get("OMPI_COMM_WORLD_RANK", e.get("HOROVOD_RANK")) == str(rank)
        except psutil.NoSuchProcess:  # a helper process that ended meanwhile
            return False
    return [p for p in psutil.Process(job.pid).children(recursive=True) if wanted(p)]


def finish(job: subprocess.Popen, timeout: float = 240) -> str:
    try:
        out, _ = job.communicate(timeout=timeout)
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()
    return out
