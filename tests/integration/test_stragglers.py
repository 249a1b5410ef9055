"""A throttled rank named by rank 0 (hpctrain.stragglers) from the times every rank reports in the log windows.

The throttle is the kernel's CPU bandwidth control, as a node's cgroup or a co-tenant imposes it: rank 2 of 3 is
moved into a cgroup capped at 0.15 CPU, then released."""
import re
import socket
import uuid
from pathlib import Path

from tests.launch import finish, metrics, rank_processes, signal_ranks, start, trained, wait_for

TINY = ["-m", "hpctrain.resnet", "--config", "configs/tiny.toml", "--backend", "mpi", "--synthetic-size", "1920",
        "--log-every", "5", "--tensorboard", "false", "--max-steps", "60"]


class CpuCap:
    """A cgroup (v2, or v1's cpu controller) holding processes to `cpus` CPUs; removed on exit."""

    def __init__(self, cpus: float, period_us: int = 100_000):
        name = f"hpxt-{uuid.uuid4().hex[:8]}"
        v2 = Path("/sys/fs/cgroup/cgroup.controllers")
        self.path = Path("/sys/fs/cgroup" if v2.exists() else "/sys/fs/cgroup/cpu") / name
        self.root = self.path.parent
        self.path.mkdir()
        quota = int(cpus * period_us)
        if v2.exists():
            (self.path / "cpu.max").write_text(f"{quota} {period_us}")
        else:
            (self.path / "cpu.cfs_period_us").write_text(str(period_us))
            (self.path / "cpu.cfs_quota_us").write_text(str(quota))

    def add(self, pid: int) -> None:
        (self.path / "cgroup.procs").write_text(str(pid))

    def release(self) -> None:
        for pid in (self.path / "cgroup.procs").read_text().split():
            (self.root / "cgroup.procs").write_text(pid)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()
        self.path.rmdir()


def rank_pid(job, rank: int) -> int:
    ranks = rank_processes(job, rank=rank)
    assert len(ranks) == 1, ranks
    return ranks[0].pid


def records(run_dir: Path) -> list[dict]:
    try:
        return metrics(run_dir, "train")
    except (FileNotFoundError, ValueError):
        return []


def test_a_throttled_rank_is_named_then_its_recovery(tmp_path):
    d = tmp_path / "run"
    job = start(3, [*TINY, "--run-dir", str(d)])
    try:
        assert wait_for(lambda: trained(d, 2), 240), finish(job, 5)[-3000:]
        with CpuCap(0.15) as cap:
            cap.add(rank_pid(job, 2))
            # named once it is the straggler in two windows in a row (the first window, warm-up, never counts)
            assert wait_for(lambda: sum(r.get("straggler_rank") == 2 for r in records(d)[1:]) >= 2, 240), records(d)
            throttled = records(d)[-1]["step"]
            cap.release()
            assert wait_for(lambda: any(r["step"] > throttled and "straggler_rank" not in r for r in records(d)),
                            240), records(d)
        out = finish(job, 240)
    finally:
        signal_ranks(job, 9) if job.poll() is None else None
    assert job.returncode == 0, out[-3000:]
    lines = [line for line in out.splitlines() if "straggler: " in line or "straggler gone: " in line]
    host = socket.gethostname()
    assert len(lines) >= 2 and f"straggler: rank 2 on node {host} was busy" in lines[0], out[-3000:]
    assert f"straggler gone: rank 2 on node {host}" in lines[1], lines
    # after the recovery three ranks sharing fewer cores may name a passing straggler again (any of them, rank 2
    # too: it is one of the three), never inside the throttled stretch and never at the throttle's ratio
    recovered = int(re.search(r"steps (\d+)\.\.(\d+)", lines[1]).group(2))
    throttled_ratio = float(re.search(r"(\d+\.\d)x the other", lines[0]).group(1))
    for line in lines[2:]:
        if "straggler: " in line:
            assert int(re.search(r"steps (\d+)\.\.", line).group(1)) > recovered, lines
            assert float(re.search(r"(\d+\.\d)x the other", line).group(1)) < throttled_ratio, lines
    slow = next(r for r in records(d) if r.get("straggler_rank") == 2)
    assert slow["busy_s_per_step_max"] > 1.5 * slow["busy_s_per_step_median"]
