"""Which nodes of the running job step the batch host cannot reach. Framework-neutral, stdlib only.

A node whose link goes down takes its tasks' exit messages with it: srun, told by the other nodes that the
step failed, waits for that node until Slurm declares it DOWN (SlurmdTimeout, 300 s by default), so the
step would outlive the hang watchdog by minutes. The supervisor asks this module, once srun has reported a
failed task and still runs a while later, which of the step's nodes cannot be reached: their slurmd's port
does not accept a TCP connection from here within a few seconds. Those nodes are blamed, srun is ended, and
the relaunch excludes them (a spare takes their place). A node that answers is never declared unreachable,
however slow srun is.
"""
from __future__ import annotations

import re
import socket
import subprocess
from concurrent.futures import ThreadPoolExecutor

SLURMD_PORT = 6818  # Slurm's default; `scontrol show node` names another one where the site set it


def _scontrol(*args: str, timeout: float = 30) -> str:
    try:
        p = subprocess.run(["scontrol", *args], capture_output=True, text=True, timeout=timeout,
                           stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return p.stdout if p.returncode == 0 else ""


def newest_step(squeue: str) -> str | None:
    """The node list of the newest numbered step in `squeue -h -s -o "%i %N"` output (batch and extern steps
    are not numbered); None when there is none."""
    steps = []
    for line in squeue.splitlines():
        m = re.fullmatch(r"\S+?\.(\d+) (\S+)", line.strip())
        if m:
            steps.append((int(m.group(1)), m.group(2)))
    return max(steps)[1] if steps else None


def step_nodes(job: str) -> list[str]:
    """The nodes of the job's newest numbered step (the one the supervisor runs: a step stuck on a lost node
    can still be listed beside it); [] when Slurm cannot tell."""
    try:
        p = subprocess.run(["squeue", "-h", "-s", "-j", job, "-o", "%i %N"], capture_output=True, text=True,
                           timeout=30, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        return []
    nodelist = newest_step(p.stdout)
    return _scontrol("show", "hostnames", nodelist).split() if nodelist else []


def address(node: str) -> tuple[str, int]:
    """Where the node's slurmd listens: (NodeAddr, Port) from `scontrol show node`, the node name and the
    default port where it says nothing."""
    text = _scontrol("show", "node", "-o", node)
    addr = re.search(r"\bNodeAddr=(\S+)", text)
    port = re.search(r"\bPort=(\d+)", text)
    return (addr.group(1) if addr else node), (int(port.group(1)) if port else SLURMD_PORT)


def reachable(node: str, timeout: float = 3.0) -> bool:
    host, port = address(node)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def unreachable(nodes: list[str], timeout: float = 3.0) -> list[str]:
    """The nodes among `nodes` whose slurmd does not accept a connection within `timeout` s (probed at once)."""
    if not nodes:
        return []
    with ThreadPoolExecutor(max_workers=min(32, len(nodes))) as pool:
        ok = list(pool.map(lambda n: reachable(n, timeout), nodes))
    return sorted(n for n, up in zip(nodes, ok) if not up)
