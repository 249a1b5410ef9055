"""What the doctor's checks share: a result line (`Check`), the per-rank `Context`, subprocess probes, MPI vendor
names. Framework-neutral (mpi4py and numpy are imported inside the functions that use them)."""
from __future__ import annotations

import argparse
import importlib.util
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from hpctrain.cluster import ClusterEnv

PROBE_TIMEOUT_S = 20
NOT_MPI = ("horovod-gloo", "torchrun", "tf-config")  # launchers whose ranks MPI starts as singletons


@dataclass
class Check:
    """One printed line: what a check found on one rank, or on all of them after the merge."""
    status: str
    name: str
    detail: str
    fix: str | None = None

    def line(self) -> str:
        return f"{self.status}  {self.name}: {self.detail}" + (f" -> {self.fix}" if self.fix else "")


@dataclass
class Context:
    """One rank's doctor run: the parsed flags, the launch, the lines so far and what checks learned."""
    args: argparse.Namespace
    cluster: ClusterEnv
    checks: list[Check] = field(default_factory=list)
    facts: dict[str, Any] = field(default_factory=dict)  # what later checks and the launch line need
    comm: Any = None  # mpi4py's COMM_WORLD once the mpi4py check started MPI
    hvd: Any = None  # horovod.torch once the ranks check initialised it
    spans: set[str] = field(default_factory=set)  # the libraries whose world is this launch's world
    stage: str = "start"
    on_stage: Callable[[str, bool], None] = lambda stage, waits: None  # the deadline's re-arm

    def enter(self, stage: str, waits: bool = False) -> None:
        """Start `stage`; `waits`: it waits for the other ranks (a collective), so --timeout bounds it."""
        self.stage = stage
        self.on_stage(stage, waits and self.cluster.size > 1)  # one rank waits for nobody

    def mpi_allreduce(self, values: list, op: str) -> list:
        """Elementwise SUM/MIN/MAX of `values` over COMM_WORLD. Buffer calls release the GIL while they wait
        (mpi4py's pickled-object ones do not): the deadline can then still report a peer that never arrives."""
        import numpy as np
        from mpi4py import MPI
        buffer = np.array(values, dtype=np.float64)
        self.comm.Allreduce(MPI.IN_PLACE, buffer, op=getattr(MPI, op))
        return buffer.tolist()


def say(text: str) -> None:
    sys.stdout.write(text + "\n")  # one write per line: mpirun --tag-output never tags a bare newline
    sys.stdout.flush()


def probe(*cmd: str) -> tuple[int, str]:
    """(exit code, stdout + stderr) of a short command; 124 when it does not answer in time."""
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=PROBE_TIMEOUT_S)
    except subprocess.TimeoutExpired:  # e.g. srun looking for an unreachable slurmctld: a WARN, not a FAIL
        return 124, f"{' '.join(cmd)}: no answer within {PROBE_TIMEOUT_S} s"
    return p.returncode, (p.stdout + p.stderr).strip()


def mpi_flavour(text: str) -> str:
    """'Open MPI v4.1.4, package...' or 'mpirun (Open MPI) 4.1.4' -> 'Open MPI 4.1.4'."""
    vendors = (("open mpi", "Open MPI"), ("intel", "Intel MPI"), ("cray", "Cray MPICH"), ("mvapich", "MVAPICH"),
               ("mpich", "MPICH"), ("hydra", "MPICH"))
    vendor = next((name for key, name in vendors if key in text.lower()), "unknown MPI")
    version = re.search(r"\d+\.\d+(?:\.\d+)?", text)
    return f"{vendor} {version.group(0) if version else '?'}"


def installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def needs_tensorflow(ctx: Context) -> str | None:
    """`when` of the TensorFlow checks."""
    return None if installed("tensorflow") else "TensorFlow not installed (optional)"
