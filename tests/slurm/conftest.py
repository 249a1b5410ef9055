"""One real Slurm cluster (8 nodes, each an emulated host with its own name, address and link) for the whole
test session."""
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.launch import ROOT, env
from tests.network.hosts import Hosts
from tests.network.hosts import ensure_installed as ensure_network
from tests.slurm_cluster import SlurmCluster, ensure_installed

TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
            "PREEMPTED"}


NODES = [f"node{i}" for i in range(1, 9)]
SUBNET = "10.231.9.0/24"  # apart from the network tier's (10.231.7/8): both may be up at once
PREFIX = "hpxs"


@pytest.fixture(scope="session")
def slurm():
    """8 nodes, each its own emulated host (10 Gbit/s links to one bridge; slurmctld on the bridge's head
    address). SlurmdTimeout 30 s: a node whose link stays down is declared DOWN within ~30-40 s."""
    if os.geteuid() != 0:
        pytest.skip("the Slurm test cluster needs root: slurmd launches jobs as root and apt-get installs Slurm")
    installed = ensure_installed(log=lambda m: print(m, file=sys.stderr))
    installed += ensure_network(log=lambda m: print(m, file=sys.stderr))
    # A short path: munge and PMIx put Unix sockets under it (108-byte limit on socket paths).
    base = Path(tempfile.mkdtemp(prefix="hpctrain-slurm-"))
    hosts = Hosts(base / "net", names=NODES, subnet=SUBNET, prefix=PREFIX, sshd=False, head=True)
    t0 = time.monotonic()
    try:
        hosts.start(log=lambda m: print(m, file=sys.stderr))
        cluster = SlurmCluster(base, hosts=hosts, slurmd_timeout=30)
        cluster.start()
    except BaseException:
        hosts.stop()
        raise
    cluster.started_in = time.monotonic() - t0
    cluster.installed_in = installed
    print(f"\nslurm test cluster: 8 nodes on their own hosts ({SUBNET}, slurmctld on {hosts.head_address}) idle "
          f"{cluster.started_in:.1f} s after start (package install {installed:.1f} s), state in {base}",
          file=sys.stderr)
    try:
        yield cluster
    finally:
        cluster.stop()
        hosts.stop()
        shutil.rmtree(base, ignore_errors=True)


def job_env(cluster: SlurmCluster, **extra) -> dict:
    e = cluster.env(env())  # tests.launch.env(): venv on PATH, no inherited launcher identity, root allowed
    e.update(extra)
    return e


def sbatch(cluster: SlurmCluster, args: list[str], cwd: Path = ROOT, **extra_env) -> str:
    p = subprocess.run(["sbatch", "--parsable", *args], cwd=cwd, env=job_env(cluster, **extra_env),
                       capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, f"sbatch failed: {p.stderr}"
    return p.stdout.strip().split(";")[0]


def job_info(cluster: SlurmCluster, job: str) -> dict:
    p = cluster.run("scontrol", "show", "job", "-o", job)
    return dict(re.findall(r"(\w+)=(\S*)", p.stdout))


def diagnostics(cluster: SlurmCluster, output: Path | None = None) -> str:
    parts = []
    if output is not None and output.exists():
        parts.append(f"--- {output} (tail)\n" + "\n".join(output.read_text().splitlines()[-40:]))
    log = cluster.base / "log" / "slurmctld.log"
    if log.exists():
        parts.append("--- slurmctld.log (tail)\n" + "\n".join(log.read_text().splitlines()[-15:]))
    return "\n".join(parts)


def wait_for_job(cluster: SlurmCluster, job: str, timeout: float, output: Path | None = None,
                 every: float = 1.0, seen: list | None = None) -> dict:
    """Poll `scontrol show job` until the job is in a terminal state; `seen` collects (time, info)."""
    deadline = time.monotonic() + timeout
    while True:
        info = job_info(cluster, job)
        if seen is not None:
            seen.append((time.monotonic(), info))
        if info.get("JobState") in TERMINAL:
            return info
        if time.monotonic() > deadline:
            state = info.get("JobState")
            pytest.fail(f"job {job} still {state} after {timeout:.0f} s\n" + diagnostics(cluster, output))
        time.sleep(every)
