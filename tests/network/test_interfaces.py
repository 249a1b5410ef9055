"""Interfaces chosen on purpose: hosts with two networks (eth0 on 10.231.7.0/24 at 10 Gbit/s, a management
network mgmt0 on 10.231.8.0/24 at 1 Gbit/s, not routed to each other), and HPCTRAIN_NET_IFACE naming the one
training traffic must take. Open MPI's TCP transport would otherwise stripe over both. The proof is in the
interfaces' byte counters: the named one moves at least the bytes the gradient allreduce was handed, the other
far less."""
from __future__ import annotations

import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

from tests.launch import metrics
from tests.network.hosts import Hosts, HostsError, ensure_installed
from tests.network.test_hosts import PY, WHERE, ok, on_host, ranks_ran_on

pytestmark = pytest.mark.network

OTHER = {"eth0": "mgmt0", "mgmt0": "eth0"}


@pytest.fixture(scope="module")
def hosts():
    """host1 and host2, each with eth0 (10 Gbit/s) and mgmt0 (1 Gbit/s)."""
    if os.geteuid() != 0 or (shutil.which("ip") is None and shutil.which("apt-get") is None):
        pytest.skip("the network tier needs root and iproute2")
    ensure_installed(log=lambda m: print(m, file=sys.stderr))
    base = tempfile.mkdtemp(prefix="hpxt-")
    h = Hosts(base, names=["host1", "host2"], management=True)
    try:
        h.start(log=lambda m: print(m, file=sys.stderr))
    except HostsError as e:
        shutil.rmtree(base, ignore_errors=True)
        pytest.fail(f"emulated hosts did not start: {e}")
    try:
        yield h
    finally:
        h.stop()
        shutil.rmtree(base, ignore_errors=True)


def test_two_networks_not_routed_to_each_other(hosts):
    addrs = hosts.run("host2", ["ip", "-o", "-4", "addr", "show"]).stdout
    assert re.findall(r"inet (\S+)", addrs) == ["127.0.0.1/8", f"{hosts.address['host2']}/24",
                                                f"{hosts.mgmt_address['host2']}/24"]
    routes = hosts.run("host2", ["ip", "-4", "route", "show"]).stdout
    assert "default" not in routes and len(routes.strip().splitlines()) == 2, routes
    assert hosts.run("host1", ["getent", "hosts", "host2-mgmt"]).stdout.split()[0] == hosts.mgmt_address["host2"]
    # Each network reaches the other host; the probe is an allreduce-free TCP connect to a listener on mgmt0.
    listener = hosts.popen("host2", [PY, "-c", "import socket,time; s=socket.socket(); "
                                     f"s.bind(('{hosts.mgmt_address['host2']}', 5301)); s.listen(1); time.sleep(20)"])
    try:
        probe = f"import socket,time\nfor i in range(50):\n    try:\n        socket.create_connection(" \
                f"('{hosts.mgmt_address['host2']}', 5301), 2).close(); break\n    except OSError: time.sleep(0.1)\n" \
                "else: raise SystemExit(1)"
        assert hosts.run("host1", [PY, "-c", probe], timeout=30).returncode == 0
    finally:
        listener.kill()
        listener.wait()


def mpirun(hosts: Hosts, iface: str, way: str, args: list[str], where: Path,
           setting: bool = True) -> tuple[list[str], dict]:
    """The launch line docs/slurm.md gives for mpirun with HPCTRAIN_NET_IFACE set in the user's shell:
    way "mca": mpirun's own daemons told on the command line (--mca oob_tcp_if_include), the setting passed to
    the ranks (-x), hpctrain sets the rest (the TCP transport) in each rank; way "export": OMPI_MCA_btl_ and
    oob_tcp_if_include exported from the setting in mpirun's environment (what slurm/env.sh does for srun), which
    mpirun passes on to the ranks, where hpctrain keeps them."""
    extra = {"HPCTRAIN_NET_IFACE": iface if setting else "", "HPXT_WHERE": str(where)}
    cmd = ["mpirun", "-np", "2", "-H", hosts.hostlist(["host1", "host2"]), "--bind-to", "none",
           "--mca", "plm_rsh_agent", f"ssh -F {hosts.ssh_config_file}", "--mca", "btl", "self,tcp"]
    if way == "mca":
        cmd += ["--mca", "oob_tcp_if_include", iface]
    else:
        extra.update(OMPI_MCA_oob_tcp_if_include=iface, OMPI_MCA_btl_tcp_if_include=iface)
    for var in ("PATH", "PYTHONPATH", "PYTHONUNBUFFERED", "OMP_NUM_THREADS", "HPCTRAIN_NET_IFACE", "HPXT_WHERE"):
        cmd += ["-x", var]
    return cmd + ["bash", "-c", WHERE, "_", PY, *args], extra


@pytest.mark.parametrize("iface, way, backend", [
    ("eth0", "mca", "horovod"),
    ("mgmt0", "mca", "horovod"),
    ("mgmt0", "export", "horovod"),
    ("mgmt0", "mca", "ddp"),  # torch.distributed gloo: GLOO_SOCKET_IFNAME and the rendezvous address
    ("mgmt0", "mca", "multiworker"),  # TF: the interface's address in the TF_CONFIG hpctrain builds
])
def test_training_traffic_takes_the_named_interface(hosts, tmp_path, iface, way, backend):
    where, run_dir, steps = tmp_path / "where", tmp_path / "run", 3
    where.mkdir()
    framework = ["--framework", "tf"] if backend == "multiworker" else []
    cmd, extra = mpirun(hosts, iface, way, [
        "-m", "hpctrain.resnet", "--config", "configs/tiny.toml", "--max-steps", str(steps), *framework,
        "--backend", backend, "--run-dir", str(run_dir), "--tensorboard", "false"], where)
    before = {i: hosts.counters("host2", i) for i in ("eth0", "mgmt0")}
    out = ok(on_host(hosts, "host1", cmd, timeout=180, **extra))
    after = {i: hosts.counters("host2", i) for i in ("eth0", "mgmt0")}
    assert ranks_ran_on(where) == {0: "host1", 1: "host2"}, out[-2000:]
    line = [m for m in out.splitlines() if "(HPCTRAIN_NET_IFACE)" in m]
    assert len(line) == 1 and f"network interface {iface} (HPCTRAIN_NET_IFACE)" in line[0], out[-3000:]
    if way == "export":
        assert f"kept the environment's own OMPI_MCA_btl_tcp_if_include={iface}" in line[0], line
    records = metrics(run_dir, "train")
    assert records and records[-1]["step"] == steps
    handed = sum(r.get("sent_bytes", 0) for r in records)
    if backend == "multiworker":
        # The host names resolve to eth0 addresses: gRPC's ring takes mgmt0 only through the addresses in TF_CONFIG.
        handed = handed or steps * 40e6  # resnet18's 44.7 MB of float32 gradients a step
    assert handed > 10e6, records[-1]
    moved = {i: {w: after[i][w] - before[i][w] for w in ("tx", "rx")} for i in after}
    mb = {i: " ".join(f"{d} {moved[i][d] / 1e6:.1f}" for d in ("tx", "rx")) for i in moved}
    print(f"\n{iface}/{way}/{backend}: allreduce handed {handed / 1e6:.1f} MB; host2 eth0 {mb['eth0']} MB, "
          f"mgmt0 {mb['mgmt0']} MB", file=sys.stderr)
    for d in ("tx", "rx"):
        assert moved[iface][d] >= 0.9 * handed, (iface, moved, handed)
        assert moved[OTHER[iface]][d] <= 0.05 * handed, (iface, moved, handed)


def test_without_the_setting_open_mpi_stripes_over_both_interfaces(hosts, tmp_path):
    """The question is real: with no interface named, Open MPI's TCP transport uses both networks."""
    where, run_dir = tmp_path / "where", tmp_path / "run"
    where.mkdir()
    cmd, extra = mpirun(hosts, "eth0", "mca", [
        "-m", "hpctrain.resnet", "--config", "configs/tiny.toml", "--max-steps", "3", "--run-dir", str(run_dir),
        "--tensorboard", "false"], where, setting=False)
    before = {i: hosts.counters("host2", i) for i in ("eth0", "mgmt0")}
    out = ok(on_host(hosts, "host1", cmd, timeout=180, **extra))
    after = {i: hosts.counters("host2", i) for i in ("eth0", "mgmt0")}
    assert "(HPCTRAIN_NET_IFACE)" not in out
    handed = sum(r.get("sent_bytes", 0) for r in metrics(run_dir, "train"))
    tx = {i: after[i]["tx"] - before[i]["tx"] for i in after}
    print(f"\nno setting: allreduce handed {handed / 1e6:.1f} MB; host2 sent eth0 {tx['eth0'] / 1e6:.1f} MB, mgmt0 "
          f"{tx['mgmt0'] / 1e6:.1f} MB", file=sys.stderr)
    assert tx["eth0"] + tx["mgmt0"] >= 0.9 * handed and min(tx.values()) >= 0.1 * handed, (tx, handed)
