"""hpctrain.netiface: HPCTRAIN_NET_IFACE handed to each library's own variable, the environment's own setting
kept, an unknown interface a one-line error, the interface's address for TF_CONFIG."""
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from hpctrain import netiface
from hpctrain.cluster import ClusterEnv, tf_config
from hpctrain.errors import EXIT_USER_ERROR, UserError

ROOT = Path(__file__).resolve().parents[2]
NODE = ["lo", "eth0", "mgmt0", "ib0"]


def test_each_library_gets_the_interface():
    env = {"HPCTRAIN_NET_IFACE": "eth0"}
    done = netiface.apply(env, existing=NODE)
    assert {k: env[k] for k in netiface.LIBRARIES} == {
        "OMPI_MCA_btl_tcp_if_include": "eth0", "OMPI_MCA_oob_tcp_if_include": "eth0",
        "HOROVOD_GLOO_IFACE": "eth0", "GLOO_SOCKET_IFNAME": "eth0", "NCCL_SOCKET_IFNAME": "=eth0"}
    assert done.added == list(netiface.LIBRARIES) and done.kept == {}
    assert done.line() == ("network interface eth0 (HPCTRAIN_NET_IFACE) for Open MPI, Horovod Gloo, torch gloo, "
                           "NCCL")


def test_a_list_goes_whole_to_the_libraries_that_take_one_and_its_first_to_horovod_gloo():
    env = {"HPCTRAIN_NET_IFACE": " ib0, eth0 "}
    netiface.apply(env, existing=NODE)
    assert env["OMPI_MCA_btl_tcp_if_include"] == env["GLOO_SOCKET_IFNAME"] == "ib0,eth0"
    assert env["NCCL_SOCKET_IFNAME"] == "=ib0,eth0" and env["HOROVOD_GLOO_IFACE"] == "ib0"


@pytest.mark.parametrize("value", [None, "", " , "])
def test_unset_or_empty_changes_nothing(value):
    env = {} if value is None else {"HPCTRAIN_NET_IFACE": value}
    before = dict(env)
    done = netiface.apply(env, existing=[])  # not even checked against the node's interfaces
    assert env == before and done.line() is None


def test_the_users_own_setting_wins_and_one_line_says_so():
    env = {"HPCTRAIN_NET_IFACE": "mgmt0", "OMPI_MCA_btl_tcp_if_include": "10.231.7.0/24",
           "HOROVOD_GLOO_IFACE": "eth0"}  # mpirun --mca btl_tcp_if_include, horovodrun --network-interface
    done = netiface.apply(env, existing=NODE)
    assert env["OMPI_MCA_btl_tcp_if_include"] == "10.231.7.0/24" and env["HOROVOD_GLOO_IFACE"] == "eth0"
    assert env["OMPI_MCA_oob_tcp_if_include"] == env["GLOO_SOCKET_IFNAME"] == "mgmt0"
    assert done.kept == {"OMPI_MCA_btl_tcp_if_include": "10.231.7.0/24", "HOROVOD_GLOO_IFACE": "eth0"}
    line = done.line()
    assert "\n" not in line and line.endswith(
        "; kept the environment's own OMPI_MCA_btl_tcp_if_include=10.231.7.0/24, HOROVOD_GLOO_IFACE=eth0")


def test_an_unknown_interface_is_one_line_naming_the_value_and_the_interfaces_there():
    env = {"HPCTRAIN_NET_IFACE": "eth0,ib1"}
    with pytest.raises(UserError) as e:
        netiface.apply(env, existing=NODE)
    assert e.value.exit_code == EXIT_USER_ERROR
    assert str(e.value) == (f"HPCTRAIN_NET_IFACE='eth0,ib1': no interface ib1 on node {socket.gethostname()} "
                            "(its interfaces: eth0, ib0, lo, mgmt0)")
    assert "OMPI_MCA_btl_tcp_if_include" not in env  # nothing half-applied


def test_this_nodes_interfaces_and_loopback_address():
    assert "lo" in netiface.interfaces()
    assert netiface.ipv4("lo") == "127.0.0.1"
    with pytest.raises(OSError):
        netiface.ipv4("hpxt-nosuch0")


def test_tf_config_holds_the_interfaces_address_instead_of_the_host_name():
    addresses = {"host1": {"eth0": "10.231.7.11", "mgmt0": "10.231.8.11"},
                 "host2": {"eth0": "10.231.7.12", "mgmt0": "10.231.8.12"}}
    c = ClusterEnv(rank=1, local_rank=0, size=2, local_size=1, node_rank=1, launcher="openmpi")
    for iface in ("eth0", "mgmt0"):
        # What each rank contributes to the gather over MPI (hpctrain.engine.tf.strategies.mpi_hosts).
        hosts = [netiface.node_address({"HPCTRAIN_NET_IFACE": iface}, lookup=addresses[h].__getitem__)
                 for h in ("host1", "host2")]
        conf = tf_config(c, 23456, env={}, hosts=hosts)
        assert conf["cluster"]["worker"] == [f"{addresses['host1'][iface]}:23456",
                                             f"{addresses['host2'][iface]}:23457"]
    assert netiface.node_address({}) == socket.gethostname()  # without the setting: the host name, as before
    assert netiface.node_address({"HPCTRAIN_NET_IFACE": "lo"}) == "127.0.0.1"


def test_node_address_of_an_interface_without_ipv4_is_a_user_error():
    def no_address(name):
        raise OSError(99, "Cannot assign requested address")
    with pytest.raises(UserError, match=r"HPCTRAIN_NET_IFACE='ib0': interface ib0 has no IPv4 address on node "):
        netiface.node_address({"HPCTRAIN_NET_IFACE": "ib0"}, lookup=no_address)


def test_training_with_an_unknown_interface_exits_2_with_one_line(tmp_path):
    env = {**os.environ, "HPCTRAIN_NET_IFACE": "hpxt-nosuch0", "PYTHONPATH": str(ROOT)}
    for k in [k for k in env if k.startswith(("OMPI_", "PMIX_", "SLURM_", "HOROVOD_"))]:
        del env[k]
    p = subprocess.run([sys.executable, "-m", "hpctrain.resnet", "--config", "configs/tiny.toml", "--max-steps", "1",
                        "--run-dir", str(tmp_path / "run")], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == EXIT_USER_ERROR, p.stderr[-2000:]
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        "hpctrain.resnet: error: HPCTRAIN_NET_IFACE='hpxt-nosuch0': no interface hpxt-nosuch0 on node "), p.stderr
    assert "(its interfaces: " in lines[0] and "lo" in lines[0]


def _env_sh(extra: dict, script: str) -> subprocess.CompletedProcess:
    """Source slurm/env.sh as a batch script does (the test cluster's site), then run `script`."""
    e = {k: v for k, v in os.environ.items() if not k.startswith(("OMPI_MCA_", "HPCTRAIN_", "SLURM_"))}
    e.update(HPCTRAIN_SITE="testcluster", **extra)
    return subprocess.run(["bash", "-c", f'HPCTRAIN_ROOT="$1"; source "$1/slurm/env.sh" || exit $?; {script}', "_",
                           str(ROOT)], env=e, capture_output=True, text=True, timeout=30)


SHOW = 'bash -c \'echo "$HPCTRAIN_NET_IFACE|$OMPI_MCA_btl_tcp_if_include|$OMPI_MCA_oob_tcp_if_include"\''


@pytest.mark.parametrize("extra, seen", [
    ({}, "||"),
    ({"HPCTRAIN_NET_IFACE": "ib0,eth2"}, "ib0,eth2|ib0,eth2|ib0,eth2"),
    ({"HPCTRAIN_NET_IFACE": "ib0", "OMPI_MCA_btl_tcp_if_include": "10.0.0.0/8"}, "ib0|10.0.0.0/8|ib0"),
])
def test_env_sh_exports_the_setting_and_open_mpis_variables_for_the_step(extra, seen):
    p = _env_sh(extra, SHOW)  # a child process sees what srun's ranks (and mpirun) would inherit
    assert p.returncode == 0 and p.stdout.splitlines()[-1] == seen, p.stdout + p.stderr


def test_env_sh_refuses_a_value_that_is_no_interface_name():
    p = _env_sh({"HPCTRAIN_NET_IFACE": "ib0 $(id)"}, "echo reached")
    assert p.returncode == 2 and "reached" not in p.stdout
    assert p.stderr.strip().splitlines()[-1].startswith("hpctrain: error: HPCTRAIN_NET_IFACE='ib0 $(id)' is not an "
                                                        "interface name"), p.stderr
