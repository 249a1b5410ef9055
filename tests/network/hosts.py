"""Emulated hosts with a real network on one machine: the harness of the `network` test tier.

Each host is a network namespace (`hpxt-<name>`) with one interface `eth0` holding its own address on a
private /24 (10.231.7.0/24 by default; no other address is ever touched), linked by a veth pair to one
common bridge (`hpxt-br`). Each link's rate is set per host with a `tbf` qdisc on both ends (what the host
sends and what it receives), and `link_down(host)` / `link_up(host)` cut and restore it: TCP streams to a
host whose link is down freeze (sends block, no error), and continue when it comes back.

With `management=True` each host also has a second interface `mgmt0` on a second private /24 (10.231.8.0/24
by default) and a second bridge (`hpxt-brm`), shaped to `management_rate` (1 Gbit/s by default): a management
network like real nodes have, not routed to the first (no host has a route or a gateway between the two), so
which interface a library takes is a real question. `<name>-mgmt` resolves to a host's management address;
the plain host name stays its eth0 address (sshd listens there only).

Commands run "on" a host through `exec_prefix(name)`: inside its network namespace and a fresh UTS
namespace holding its host name, so `hostname` says `host2` there. Host names resolve on every host
through a per-host /etc/hosts (`/etc/netns/<ns>/hosts`, which `ip netns exec` binds over /etc/hosts for
the processes it starts): the machine's own /etc/hosts is left as it is. The ssh client settings every
host uses (`/etc/netns/<ns>/ssh/ssh_config`, the same text as `ssh_config_file` for `ssh -F`) log in as
root with a generated key and keep no known_hosts, so launchers need no options to reach the other hosts
(inside a host, /etc/ssh holds only that file: sshd is always given its own config).

Every host runs a real `sshd` (Debian's openssh-server, installed if missing) on port 22 of its own
address, with its own config, host key and pid file under `base`; sessions it starts inherit the host's
namespaces, so `ssh host2 hostname` run on host1 prints `host2`. Launchers (mpirun, horovodrun) are
started on one of the hosts, as a user on a cluster node would, and reach the others over ssh.

Everything created is named with the `hpxt` prefix or lives under `base`, and `stop()` removes it by name
and pid file; `sweep()` (run by `start()`) removes what an earlier run left behind.
"""
from __future__ import annotations

import ipaddress
import os
import shlex
import shutil
import signal
import subprocess
import time
from pathlib import Path

from tests.packages import apt_install

PREFIX = "hpxt"                     # every namespace, link and the bridge carry it (the default prefix)
MARKER = ".hpxt-created"             # in a directory this harness created (any prefix)
MGMT_IFACE = "mgmt0"
NETNS_ETC = Path("/etc/netns")      # `ip netns exec NS` binds /etc/netns/NS/* over /etc/*
SSHD_RUN_DIR = Path("/run/sshd")    # sshd's privilege separation directory, required to exist
PACKAGES = {"sshd": "openssh-server", "ssh": "openssh-client", "ip": "iproute2", "tc": "iproute2",
            "unshare": "util-linux"}
TAG = "# hpctrain-network-test"     # marks the host lines it writes (per-host files; swept from /etc/hosts too)


class HostsError(RuntimeError):
    pass


def _sh(*args: str, check: bool = True, timeout: float = 20, input: str | None = None) -> subprocess.CompletedProcess:
    p = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout, input=input)
    if check and p.returncode != 0:
        raise HostsError(f"{shlex.join(args)} failed (rc={p.returncode}): {(p.stderr or p.stdout).strip()}")
    return p


def ensure_installed(log=print) -> float:
    """Install openssh-server & co. with apt-get where a tool is missing (needs root). Returns seconds spent."""
    missing = sorted({pkg for tool, pkg in PACKAGES.items()
                      if not (shutil.which(tool) or os.access(f"/usr/sbin/{tool}", os.X_OK))})
    if not missing:
        return 0.0
    if shutil.which("apt-get") is None:
        raise HostsError(f"missing {' '.join(missing)} and no apt-get to install them")
    return apt_install(missing, "network hosts", HostsError, log)


def rate_bits(rate: str) -> float:
    """'10gbit' -> 1e10, '100mbit' -> 1e8 (tc's units, bits per second)."""
    units = {"gbit": 1e9, "mbit": 1e6, "kbit": 1e3, "bit": 1.0}
    for unit, factor in units.items():
        if rate.endswith(unit):
            return float(rate[:-len(unit)]) * factor
    raise ValueError(f"rate {rate!r}: expected a number followed by gbit, mbit or kbit")


def sweep(log=print, prefix: str = PREFIX, sshd: bool = True) -> list[str]:
    """Remove what an earlier run of this harness with `prefix` left (by prefix, tag and pid file; sshd's run
    directory only for a network with sshds). Returns what it removed."""
    removed = []
    for ns in _sh("ip", "netns", "list", check=False).stdout.split():
        if ns.startswith(f"{prefix}-"):
            for pid in _sh("ip", "netns", "pids", ns, check=False).stdout.split():
                _kill(int(pid))  # only processes inside our own namespaces (stale sshds, ranks)
            _sh("ip", "netns", "del", ns, check=False)
            removed.append(f"netns {ns}")
    for line in _sh("ip", "-o", "link", "show", check=False).stdout.splitlines():
        name = line.split(":")[1].strip().split("@")[0] if line.count(":") >= 2 else ""
        if name.startswith(f"{prefix}-"):
            _sh("ip", "link", "del", name, check=False)
            removed.append(f"link {name}")
    if NETNS_ETC.is_dir():
        for d in NETNS_ETC.glob(f"{prefix}-*"):
            shutil.rmtree(d, ignore_errors=True)
            removed.append(str(d))
        _rmdir_if_ours(NETNS_ETC)
    if sshd and SSHD_RUN_DIR.is_dir() and (SSHD_RUN_DIR / MARKER).exists():
        _rmdir_if_ours(SSHD_RUN_DIR)  # (after the stale sshds above are gone)
        if not SSHD_RUN_DIR.exists():
            removed.append(str(SSHD_RUN_DIR))
    hosts = Path("/etc/hosts")
    text = hosts.read_text()
    if TAG in text:
        hosts.write_text("".join(line for line in text.splitlines(True) if TAG not in line))
        removed.append("tagged /etc/hosts lines")
    if removed:
        log(f"network hosts: removed stale {', '.join(removed)}")
    return removed


def _rmdir_if_ours(path: Path) -> None:
    marker = path / MARKER
    if marker.exists() and not [p for p in path.iterdir() if p != marker]:
        marker.unlink()
        path.rmdir()


def _kill(pid: int, sig: int = signal.SIGKILL) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError, IndexError):
            return True
        if state in ("Z", "X"):  # exited; its parent (init, for a daemon) has not reaped it yet
            return True
        time.sleep(0.05)
    return False


class Hosts:
    """`start()` / `stop()` emulated hosts `names` on `subnet`, links at `rates` (per host; default `rate`).

    `prefix` names everything (two networks with different prefixes coexist); `sshd=False` starts no sshd
    (hosts reached by a workload manager only); `head=True` gives the bridge the subnet's first address, so
    daemons of this machine's own namespace (a head node: slurmctld, the clients) reach the hosts and back."""

    def __init__(self, base: str | os.PathLike, names=("host1", "host2"), subnet: str = "10.231.7.0/24",
                 rate: str = "10gbit", rates: dict[str, str] | None = None, first_address: int = 11,
                 management: bool = False, management_subnet: str = "10.231.8.0/24", management_rate: str = "1gbit",
                 prefix: str = PREFIX, sshd: bool = True, head: bool = False):
        self.prefix = prefix
        self.bridge, self.mgmt_bridge = f"{prefix}-br", f"{prefix}-brm"
        self.sshd, self.head = sshd, head
        self.base = Path(base).resolve()
        self.names = list(names)
        self.net = ipaddress.ip_network(subnet)
        if not self.net.is_private or self.net.prefixlen != 24:
            raise HostsError(f"subnet {subnet}: a private /24 expected")
        hosts = list(self.net.hosts())
        self.head_address = str(hosts[0])
        self.address = {n: str(hosts[first_address - 1 + i]) for i, n in enumerate(self.names)}
        self.rate = {n: (rates or {}).get(n, rate) for n in self.names}
        self.management = management
        self.mgmt_net = ipaddress.ip_network(management_subnet)
        if management and (not self.mgmt_net.is_private or self.mgmt_net.prefixlen != 24
                           or self.mgmt_net.overlaps(self.net)):
            raise HostsError(f"management subnet {management_subnet}: a private /24 apart from {subnet} expected")
        mgmt_hosts = list(self.mgmt_net.hosts())
        self.mgmt_address = {n: str(mgmt_hosts[first_address - 1 + i]) for i, n in enumerate(self.names)}
        self.mgmt_rate = {n: management_rate for n in self.names}
        self.down: set[str] = set()
        self.ssh_key = self.base / "id_ed25519"
        self.ssh_config_file = self.base / "ssh_config"

    # ---- names ---------------------------------------------------------------------------------------
    def ns(self, name: str) -> str:
        return f"{self.prefix}-{name}"

    def link(self, name: str) -> str:
        """The bridge-side end of a host's veth pair (in this namespace)."""
        return f"{self.prefix}-v{self.names.index(name) + 1}"

    def mgmt_link(self, name: str) -> str:
        """The bridge-side end of a host's management veth pair (its mgmt0 is the other end)."""
        return f"{self.prefix}-m{self.names.index(name) + 1}"

    @property
    def cidr(self) -> str:
        return str(self.net)

    def hostlist(self, names=None, slots: int = 1) -> str:
        """'host1:1,host2:1' for mpirun/horovodrun -H."""
        return ",".join(f"{n}:{slots}" for n in (names or self.names))

    # ---- running commands on a host ------------------------------------------------------------------
    def exec_prefix(self, name: str) -> list[str]:
        """Prefix a command with this to run it on host `name` (its network, its host name, its /etc/hosts)."""
        return ["ip", "netns", "exec", self.ns(name), "unshare", "--uts", "sh", "-c",
                f'hostname {shlex.quote(name)} && exec "$@"', "sh"]

    def mpirun_prefix(self, names=None, slots: int = 1) -> list[str]:
        """What a user on the first host types to start `slots` ranks per host over ssh, Open MPI's TCP on the
        hosts' /24 (pass the environment on with `-x VAR`, then the command)."""
        names = names or self.names
        return ["mpirun", "-np", str(slots * len(names)), "-H", self.hostlist(names, slots), "--bind-to", "none",
                "--mca", "plm_rsh_agent", f"ssh -F {self.ssh_config_file}",
                "--mca", "btl", "self,tcp", "--mca", "btl_tcp_if_include", self.cidr,
                "--mca", "oob_tcp_if_include", self.cidr]

    def run(self, name: str, cmd: list[str], check: bool = False, **kw) -> subprocess.CompletedProcess:
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        kw.setdefault("timeout", 60)
        p = subprocess.run(self.exec_prefix(name) + list(cmd), **kw)
        if check and p.returncode != 0:
            raise HostsError(f"on {name}: {shlex.join(cmd)} failed (rc={p.returncode}): {p.stderr or p.stdout}")
        return p

    def popen(self, name: str, cmd: list[str], **kw) -> subprocess.Popen:
        return subprocess.Popen(self.exec_prefix(name) + list(cmd), **kw)

    def ssh(self, src: str, dst: str, *cmd: str, **kw) -> subprocess.CompletedProcess:
        """`ssh dst cmd` run on host `src` (its client config already points at our key)."""
        return self.run(src, ["ssh", "-F", str(self.ssh_config_file), dst, *cmd], **kw)

    # ---- links ---------------------------------------------------------------------------------------
    def set_rate(self, name: str, rate: str, iface: str = "eth0") -> None:
        """Shape the host's link to `rate` in both directions (tbf on the bridge side and on its eth0, or on
        its mgmt0 with iface="mgmt0")."""
        bits = rate_bits(rate)
        # The bucket must hold at least one timer tick of traffic at the rate, or tbf falls short of it.
        burst = f"{max(256, int(bits / 8 / 1024 / 100))}kb"
        outside = self.link(name) if iface == "eth0" else self.mgmt_link(name)
        for where in ([], ["ip", "netns", "exec", self.ns(name)]):
            dev = outside if not where else iface
            _sh(*where, "tc", "qdisc", "replace", "dev", dev, "root", "tbf", "rate", rate, "burst", burst,
                "latency", "50ms")
        (self.rate if iface == "eth0" else self.mgmt_rate)[name] = rate

    def link_down(self, name: str) -> None:
        """Cut the host off: its link to the bridge goes down (streams to and from it freeze)."""
        _sh("ip", "link", "set", self.link(name), "down")
        self.down.add(name)

    def link_up(self, name: str) -> None:
        _sh("ip", "link", "set", self.link(name), "up")
        self.down.discard(name)

    def sysctl(self, name: str, key: str, value: str | int) -> None:
        """Set a per-namespace kernel setting on host `name` (net.ipv4.* and the like); gone with the host."""
        self.run(name, ["sysctl", "-qw", f"{key}={value}"], check=True)

    def counters(self, name: str, iface: str = "eth0") -> dict[str, int]:
        """Bytes the host's eth0 (or `iface`, e.g. mgmt0) received and sent so far."""
        out = self.run(name, ["cat", f"/sys/class/net/{iface}/statistics/rx_bytes",
                              f"/sys/class/net/{iface}/statistics/tx_bytes"], check=True).stdout.split()
        return {"rx": int(out[0]), "tx": int(out[1])}

    # ---- lifecycle -----------------------------------------------------------------------------------
    def start(self, log=print) -> float:
        """Build the network, start one sshd per host, wait until every host reaches every other over ssh.
        Returns seconds taken."""
        t0 = time.monotonic()
        sweep(log, self.prefix, self.sshd)
        try:
            self.base.mkdir(parents=True, exist_ok=True)
            self._keys()
            self._network()
            self._etc()
            if self.sshd:
                for name in self.names:
                    self._start_sshd(name)
                self._wait_ssh(timeout=20)
        except BaseException:
            self.stop()
            raise
        return time.monotonic() - t0

    def _keys(self) -> None:
        if not self.ssh_key.exists():
            _sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "hpctrain-network-test", "-f", str(self.ssh_key))
        (self.base / "authorized_keys").write_text(Path(f"{self.ssh_key}.pub").read_text())
        for name in self.names:
            key = self.base / f"ssh_host_ed25519_key-{name}"
            if not key.exists():
                _sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", name, "-f", str(key))

    def _network(self) -> None:
        _sh("ip", "link", "add", self.bridge, "type", "bridge")
        _sh("ip", "link", "set", self.bridge, "up")
        if self.head:
            _sh("ip", "addr", "add", f"{self.head_address}/{self.net.prefixlen}", "dev", self.bridge)
        for name in self.names:
            ns, veth = self.ns(name), self.link(name)
            _sh("ip", "netns", "add", ns)
            _sh("ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
            _sh("ip", "link", "set", veth, "master", self.bridge, "up")
            _sh("ip", "-n", ns, "addr", "add", f"{self.address[name]}/{self.net.prefixlen}", "dev", "eth0")
            _sh("ip", "-n", ns, "link", "set", "eth0", "up")
            _sh("ip", "-n", ns, "link", "set", "lo", "up")
            self.set_rate(name, self.rate[name])
        if self.management:
            self._management_network()

    def _management_network(self) -> None:
        _sh("ip", "link", "add", self.mgmt_bridge, "type", "bridge")
        _sh("ip", "link", "set", self.mgmt_bridge, "up")
        for name in self.names:
            ns, veth = self.ns(name), self.mgmt_link(name)
            _sh("ip", "link", "add", veth, "type", "veth", "peer", "name", MGMT_IFACE, "netns", ns)
            _sh("ip", "link", "set", veth, "master", self.mgmt_bridge, "up")
            _sh("ip", "-n", ns, "addr", "add", f"{self.mgmt_address[name]}/{self.mgmt_net.prefixlen}", "dev",
                MGMT_IFACE)
            _sh("ip", "-n", ns, "link", "set", MGMT_IFACE, "up")
            self.set_rate(name, self.mgmt_rate[name], MGMT_IFACE)

    def ssh_config(self) -> str:
        return "\n".join([
            f"Host {' '.join(self.names)}",
            "  User root",
            "  Port 22",
            f"  IdentityFile {self.ssh_key}",
            "  IdentitiesOnly yes",
            "  BatchMode yes",
            "  StrictHostKeyChecking no",
            "  UserKnownHostsFile /dev/null",
            "  LogLevel ERROR",
            "  ConnectTimeout 10",
            # ssh sessions to a host whose link died end after ~15 s instead of lingering (sshd too: ClientAlive).
            "  ServerAliveInterval 5",
            "  ServerAliveCountMax 3",
            ""])

    def _etc(self) -> None:
        self.ssh_config_file.write_text(self.ssh_config())
        if not NETNS_ETC.exists():
            NETNS_ETC.mkdir()
            (NETNS_ETC / MARKER).touch()
        lines = "".join(f"{self.address[n]} {n} {TAG}\n" for n in self.names)
        if self.management:
            lines += "".join(f"{self.mgmt_address[n]} {n}-mgmt {TAG}\n" for n in self.names)
        machine_hosts = Path("/etc/hosts").read_text()
        for name in self.names:
            d = NETNS_ETC / self.ns(name)
            (d / "ssh").mkdir(parents=True, exist_ok=True)
            (d / "hosts").write_text(machine_hosts.rstrip("\n") + "\n" + lines)
            (d / "ssh" / "ssh_config").write_text(self.ssh_config())
        if self.sshd and not SSHD_RUN_DIR.exists():  # marked as ours: stop(), or a later sweep, removes it
            SSHD_RUN_DIR.mkdir(mode=0o755)
            (SSHD_RUN_DIR / MARKER).touch()

    def _sshd_pidfile(self, name: str) -> Path:
        return self.base / f"sshd-{name}.pid"

    def _start_sshd(self, name: str) -> None:
        conf = self.base / f"sshd_config-{name}"
        conf.write_text("\n".join([
            "Port 22",
            f"ListenAddress {self.address[name]}",
            f"HostKey {self.base}/ssh_host_ed25519_key-{name}",
            f"PidFile {self._sshd_pidfile(name)}",
            f"AuthorizedKeysFile {self.base}/authorized_keys",
            "PermitRootLogin prohibit-password",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "UsePAM no",
            "StrictModes no",
            "UseDNS no",
            "PrintMotd no",
            "LogLevel ERROR",
            "MaxStartups 100",
            "MaxSessions 100",
            "ClientAliveInterval 5",
            "ClientAliveCountMax 3",
            ""]))
        sshd = shutil.which("sshd") or "/usr/sbin/sshd"
        log = self.base / f"sshd-{name}.log"
        self.run(name, [sshd, "-f", str(conf), "-E", str(log)], check=True, timeout=20)  # daemonizes
        deadline = time.monotonic() + 10
        while not self._sshd_pidfile(name).exists():
            if time.monotonic() > deadline:
                raise HostsError(f"sshd on {name} wrote no pid file in 10 s (log: {log})")
            time.sleep(0.05)

    def _wait_ssh(self, timeout: float) -> None:
        first = self.names[0]
        deadline = time.monotonic() + timeout
        for name in self.names:
            while True:
                p = self.ssh(first, name, "hostname", timeout=15)
                if p.returncode == 0 and p.stdout.strip() == name:
                    break
                if time.monotonic() > deadline:
                    raise HostsError(f"ssh {first} -> {name}: rc={p.returncode} {p.stdout.strip()!r} "
                                     f"{p.stderr.strip()[-300:]!r}")
                time.sleep(0.2)

    def sshd_pids(self) -> list[int]:
        pids = []
        for name in self.names:
            f = self._sshd_pidfile(name)
            if f.exists():
                try:
                    pids.append(int(f.read_text()))
                except ValueError:
                    pass
        return pids

    def stop(self) -> None:
        """Remove everything start() made, whatever state it is in: processes on the hosts (sshd first, by
        pid file), namespaces, links, the bridge (qdiscs go with their links), per-host /etc files."""
        for name in self.names:
            if name in self.down:
                _sh("ip", "link", "set", self.link(name), "up", check=False)
        for pid in self.sshd_pids():
            _kill(pid, signal.SIGTERM)
            if not _gone(pid, 5):
                _kill(pid)
        for name in self.names:
            self._sshd_pidfile(name).unlink(missing_ok=True)
            ns = self.ns(name)
            # Whatever a test left running on the host (ranks, orted, session sshds): only inside our namespace.
            for pid in _sh("ip", "netns", "pids", ns, check=False).stdout.split():
                _kill(int(pid))
            _sh("ip", "netns", "del", ns, check=False)
            _sh("ip", "link", "del", self.link(name), check=False)  # gone with the namespace, unless it failed
            if self.management:
                _sh("ip", "link", "del", self.mgmt_link(name), check=False)
            shutil.rmtree(NETNS_ETC / ns, ignore_errors=True)
        _sh("ip", "link", "del", self.bridge, check=False)
        _sh("ip", "link", "del", self.mgmt_bridge, check=False)  # made by this run or not: it has our prefix
        if NETNS_ETC.is_dir():
            _rmdir_if_ours(NETNS_ETC)
        if SSHD_RUN_DIR.is_dir():
            _rmdir_if_ours(SSHD_RUN_DIR)


def leftovers(prefix: str = PREFIX) -> list[str]:
    """What of this harness (with `prefix`) still exists on the machine (empty after a clean stop)."""
    found = [f"netns {ns}" for ns in _sh("ip", "netns", "list", check=False).stdout.split()
             if ns.startswith(f"{prefix}-")]
    for line in _sh("ip", "-o", "link", "show", check=False).stdout.splitlines():
        parts = line.split(":")
        if len(parts) >= 2 and parts[1].strip().split("@")[0].startswith(f"{prefix}-"):
            found.append(f"link {parts[1].strip()}")
    found += [str(p) for p in NETNS_ETC.glob(f"{prefix}-*")] if NETNS_ETC.is_dir() else []
    if TAG in Path("/etc/hosts").read_text():
        found.append("tagged /etc/hosts lines")
    if (SSHD_RUN_DIR / MARKER).exists():
        found.append(str(SSHD_RUN_DIR))
    return found
