"""A real Slurm 22.05 cluster on this one machine: slurmctld + N slurmd + a private munged.

Two shapes. Given `hosts` (tests.network.hosts.Hosts started with `head=True`), every node is its own emulated
host: its slurmd runs inside the host (its network namespace, its host name), `NodeAddr` is the host's address,
slurmctld listens on the bridge's head address, and jobs, srun steps and PMIx cross real links, shaped and
cut like any other. Without it, N slurmds share this machine's loopback (quick, for tests that prove nothing
about the network: containers).

Everything (config, keys, sockets, state, spool, logs, pid files) lives in one directory; nothing is
written to /etc. Clients find the cluster through `SLURM_CONF` (see `env()`). Daemons run in the
foreground as our children and are stopped by the pids we recorded, never by name.

Measured facts behind the settings (in short: Debian's
Open MPI needs `--mpi=pmix`; one TmpFS per node or PMIx fails with "File exists"; a TaskProlog
switches Open MPI to TCP on loopback because emulated nodes share one host's shared memory;
cred_expire=10 or a requeued job waits 120 s; the -wlm binaries where slurm-wlm-emulator is installed).
On networked hosts Open MPI is not pinned to an interface: each host has one network (and its own host name,
so shared-memory segment names no longer collide); the TaskProlog only allows root.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from tests.packages import apt_install

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge", "libpmix-dev"]
CLIENTS = ["sbatch", "scontrol", "sinfo", "scancel", "squeue", "srun"]


class ClusterError(RuntimeError):
    pass


def _missing_packages() -> list[str]:
    missing = []
    for pkg in PACKAGES:
        q = subprocess.run(["dpkg-query", "-W", "-f=${Status}", pkg], capture_output=True, text=True)
        if q.returncode != 0 or "install ok installed" not in q.stdout:
            missing.append(pkg)
    return missing


def ensure_installed(log=print) -> float:
    """Install the Debian packages if any is missing (needs root). Returns seconds spent."""
    if shutil.which("dpkg-query") is None:
        raise ClusterError("dpkg-query not found: this harness needs Debian/Ubuntu packages of Slurm")
    missing = _missing_packages()
    if not missing:
        return 0.0
    return apt_install(missing, "slurm_cluster", ClusterError, log)


def _sbin(name: str) -> str:
    # slurm-wlm-emulator redirects the plain names to its front-end build; the -wlm ones are real.
    for candidate in (f"/usr/sbin/{name}-wlm", f"/usr/sbin/{name}"):
        if os.access(candidate, os.X_OK):
            return candidate
    found = shutil.which(name)
    if not found:
        raise ClusterError(f"{name} not found after installing {' '.join(PACKAGES)}")
    return found


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


def cgroup_mounts() -> str:
    """Shell commands mounting this machine's cgroup hierarchies again: `ip netns exec` gives a host a fresh
    /sys without the cgroup mounts slurmd's start-up probes (the same hierarchies, seen from the host's own
    mount namespace)."""
    cmds = []
    for line in Path("/proc/self/mounts").read_text().splitlines():
        _, where, kind, opts = line.split()[:4]
        if where == "/sys/fs/cgroup" and kind == "tmpfs":
            cmds.append("mount -t tmpfs -o mode=755 cgroup_root /sys/fs/cgroup")
        elif where.startswith("/sys/fs/cgroup") and kind in ("cgroup", "cgroup2"):
            cmds.append(f"mkdir -p {where} && mount -t {kind} -o {opts} {kind} {where}")
    return " && ".join(cmds + ['exec "$@"'])


TASK_PROLOG_HOSTS = """#!/bin/sh
# Lines starting with "export" become task environment. The tests run jobs as root.
echo export OMPI_ALLOW_RUN_AS_ROOT=1
echo export OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
"""

TASK_PROLOG = """#!/bin/sh
# Lines starting with "export" become task environment. Emulated nodes share one host, so Open MPI's
# shared-memory segments would collide: TCP over loopback only.
echo export OMPI_MCA_btl=self,tcp
echo export OMPI_MCA_btl_tcp_if_include=lo
echo export OMPI_MCA_oob_tcp_if_include=lo
echo export OMPI_ALLOW_RUN_AS_ROOT=1
echo export OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
"""


class SlurmCluster:
    """`start()` / `stop()` a cluster of `nodes` emulated nodes (node1..nodeN) under `base`, or one node per
    host of a started `hosts` network (named as its hosts)."""

    def __init__(self, base: str | os.PathLike, nodes: int = 8, cpus_per_node: int = 2, hosts=None,
                 slurmd_timeout: int = 300):
        self.base = Path(base).resolve()
        self.hosts = hosts
        self.names = list(hosts.names) if hosts else [f"node{i}" for i in range(1, nodes + 1)]
        self.nodes = len(self.names)
        self.cpus = cpus_per_node
        self.slurmd_timeout = slurmd_timeout
        self.conf = self.base / "etc" / "slurm.conf"
        self.pid_dir = self.base / "pids"
        self.munge_dir = self.base / "munge"

    # ---- environment for clients -----------------------------------------------------------------
    def env(self, base: dict | None = None) -> dict:
        e = dict(os.environ if base is None else base)
        for k in [k for k in e if k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_"))]:
            del e[k]  # a surrounding allocation must not leak into the test cluster's jobs
        e["SLURM_CONF"] = str(self.conf)
        return e

    def run(self, *args: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
        p = subprocess.run(list(args), env=self.env(), capture_output=True, text=True, timeout=timeout)
        if check and p.returncode != 0:
            raise ClusterError(f"{' '.join(args)} failed (rc={p.returncode}): {(p.stderr or p.stdout).strip()}")
        return p

    # ---- lifecycle -----------------------------------------------------------------------------
    def start(self, timeout: float = 60) -> float:
        """Write the config, start munged, slurmctld and the slurmds; wait until every node is idle.
        Returns seconds taken (not counting package installation)."""
        t0 = time.monotonic()
        self._layout()
        try:
            self._start_munged()
            self._spawn("slurmctld", [_sbin("slurmctld"), "-D", "-c", "-f", str(self.conf)])
            stepd = _sbin("slurmstepd")
            for name in self.names:
                on_host = [*self.hosts.exec_prefix(name), "sh", "-c", cgroup_mounts(), "sh"] if self.hosts else []
                self._spawn(f"slurmd-{name}", [*on_host, _sbin("slurmd"), "-D", "-N", name, "-f", str(self.conf),
                                               "-d", stepd])
            self._wait_idle(timeout)
        except BaseException:
            self.stop()
            raise
        return time.monotonic() - t0

    def _layout(self) -> None:
        for sub in ("etc", "state", "log", "pids", "run", "munge"):
            (self.base / sub).mkdir(parents=True, exist_ok=True)
        for name in self.names:
            for sub in ("spool", "tmp"):
                (self.base / sub / name).mkdir(parents=True, exist_ok=True)
        ports = _free_ports(self.nodes + 1)
        prolog = self.base / "etc" / "task_prolog.sh"
        prolog.write_text(TASK_PROLOG_HOSTS if self.hosts else TASK_PROLOG)
        prolog.chmod(0o755)
        b = self.base
        lines = [
            "ClusterName=hpctraintest",
            f"SlurmctldHost={socket.gethostname()}({self.hosts.head_address if self.hosts else '127.0.0.1'})",
            f"SlurmctldPort={ports[0]}",
            "SlurmUser=root", "SlurmdUser=root",
            "AuthType=auth/munge",
            f"AuthInfo=socket={self.munge_dir}/munge.socket,cred_expire=10",
            f"StateSaveLocation={b}/state",
            f"SlurmctldPidFile={b}/run/slurmctld.pid",
            f"SlurmctldLogFile={b}/log/slurmctld.log",
            f"SlurmdSpoolDir={b}/spool/%n",
            f"SlurmdPidFile={b}/run/slurmd-%n.pid",
            f"SlurmdLogFile={b}/log/slurmd-%n.log",
            f"TmpFS={b}/tmp/%n",
            f"TaskProlog={prolog}",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SwitchType=switch/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "SlurmdParameters=config_overrides",
            "MpiDefault=pmix",
            "ReturnToService=2",
            "SchedulerParameters=sched_interval=2",
            "MinJobAge=600",
            "KillWait=10",
            f"SlurmdTimeout={self.slurmd_timeout}",
            "InactiveLimit=0",
        ]
        for name, port in zip(self.names, ports[1:]):
            where = f"NodeHostname={name} NodeAddr={self.hosts.address[name]}" if self.hosts else \
                "NodeHostname=localhost NodeAddr=127.0.0.1"
            lines.append(f"NodeName={name} {where} Port={port} CPUs={self.cpus} RealMemory=8000 State=UNKNOWN")
        lines.append("PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP")
        self.conf.write_text("\n".join(lines) + "\n")

    def _start_munged(self) -> None:
        key = self.munge_dir / "munge.key"
        if not key.exists():
            key.write_bytes(os.urandom(1024))
            key.chmod(0o400)
        m = self.munge_dir
        # --force: munged refuses socket directories under a world-writable /tmp otherwise.
        self._spawn("munged", [_sbin("munged"), "-F", "--force", f"--key-file={key}", f"--socket={m}/munge.socket",
                               f"--pid-file={m}/munged.pid", f"--log-file={m}/munged.log",
                               f"--seed-file={m}/munged.seed"])
        deadline = time.monotonic() + 15
        while not (m / "munge.socket").exists():
            self._check_alive("munged")
            if time.monotonic() > deadline:
                raise ClusterError(f"munged did not create {m}/munge.socket in 15 s (log: {m}/munged.log)")
            time.sleep(0.05)

    def _spawn(self, name: str, cmd: list[str]) -> None:
        out = open(self.base / "log" / f"{name}.stdout", "ab")
        # A new session: a Ctrl-C in the terminal running pytest must not reach the daemons first.
        p = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                             env=self.env(), start_new_session=True)
        out.close()
        (self.pid_dir / f"{name}.pid").write_text(f"{p.pid}\n")

    def _check_alive(self, name: str) -> None:
        pid = int((self.pid_dir / f"{name}.pid").read_text())
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            done = pid
        if done:
            log = (self.base / "log" / f"{name}.stdout").read_text(errors="replace").strip().splitlines()[-3:]
            raise ClusterError(f"{name} (pid {pid}) exited during start-up: {' | '.join(log)}")

    def _wait_idle(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            for name in ["slurmctld", *(f"slurmd-{n}" for n in self.names)]:
                self._check_alive(name)
            p = self.run("sinfo", "-h", "-N", "-o", "%N %t", check=False, timeout=10)
            last = (p.stdout or p.stderr).strip()
            states = dict(line.split() for line in p.stdout.splitlines() if line.strip())
            if p.returncode == 0 and len(states) == self.nodes and all(s == "idle" for s in states.values()):
                return
            time.sleep(0.2)
        raise ClusterError(f"nodes not idle after {timeout:.0f} s: {last!r} (logs in {self.base}/log)")

    def stop(self, timeout: float = 20) -> None:
        """Cancel leftover jobs, then stop slurmds, slurmctld and munged by their recorded pids."""
        if (self.pid_dir / "slurmctld.pid").exists():
            self.run("scancel", "--full", "--partition=debug", check=False, timeout=10)
        order = [f"slurmd-{n}" for n in self.names] + ["slurmctld", "munged"]
        for group in (order[:-2], order[-2:-1], order[-1:]):
            pids = [pid for name in group if (pid := self._pid(name))]
            for pid in pids:
                _signal(pid, signal.SIGTERM)
            for pid in pids:
                _reap(pid, timeout)

    def _pid(self, name: str) -> int | None:
        f = self.pid_dir / f"{name}.pid"
        if not f.exists():
            return None
        pid = int(f.read_text())
        f.unlink()
        return pid


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _reap(pid: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
            if done:
                return
        except ChildProcessError:  # not our child (started by another process): poll for existence
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
        time.sleep(0.05)
    _signal(pid, signal.SIGKILL)
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass
