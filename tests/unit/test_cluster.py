"""Cluster detection on patched environments, one per launcher."""
import json
import socket
import warnings

import pytest

from hpctrain.cluster import (
    ClusterEnv,
    ClusterError,
    _slurm_task_counts,
    detect,
    expand_hostlist,
    parse_tf_config,
    port_in_use,
    tf_config,
    threads_per_rank,
    visible_gpu_index,
)

OMPI = {"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "8", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
        "OMPI_COMM_WORLD_LOCAL_SIZE": "2", "OMPI_COMM_WORLD_NODE_RANK": "1"}
SLURM = {"SLURM_PROCID": "5", "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "8", "SLURM_LOCALID": "1",
         "SLURM_NODEID": "2", "SLURM_STEP_TASKS_PER_NODE": "2(x4)", "SLURM_STEP_NODELIST": "gpu[007-010]",
         "SLURM_JOB_ID": "1234", "SLURM_RESTART_COUNT": "1"}
# What horovodrun --gloo -np 8 -H a:2,b:2,c:2,d:2 gives rank 5 (horovod/runner/gloo_run.py).
GLOO = {"HOROVOD_RANK": "5", "HOROVOD_SIZE": "8", "HOROVOD_LOCAL_RANK": "1", "HOROVOD_LOCAL_SIZE": "2",
        "HOROVOD_CROSS_RANK": "2", "HOROVOD_CROSS_SIZE": "4", "HOROVOD_HOSTNAME": "c",
        "HOROVOD_GLOO_RENDEZVOUS_ADDR": "10.0.0.1", "HOROVOD_GLOO_RENDEZVOUS_PORT": "41000",
        "HOROVOD_CONTROLLER": "gloo", "HOROVOD_CPU_OPERATIONS": "gloo"}


def tf_conf(task_type="worker", index=0, worker=("a:1", "a:2", "b:1", "b:2"), chief=None) -> str:
    """A hand-written TF_CONFIG (tf.distribute's own multi-worker launch)."""
    cluster = {"worker": list(worker)} | ({"chief": list(chief)} if chief is not None else {})
    return json.dumps({"cluster": cluster, "task": {"type": task_type, "index": index}})


def test_openmpi():
    c = detect(OMPI)
    assert (c.launcher, c.rank, c.size, c.local_rank, c.local_size, c.node_rank) == ("openmpi", 3, 8, 1, 2, 1)
    assert c.num_nodes == 4 and c.rank != 0


def test_openmpi_node_rank_derived_when_missing():
    env = {k: v for k, v in OMPI.items() if k != "OMPI_COMM_WORLD_NODE_RANK"}
    assert detect(env).node_rank == 1


def test_slurm_step():
    c = detect(SLURM)
    assert (c.launcher, c.rank, c.size, c.local_rank, c.local_size, c.node_rank) == ("slurm", 5, 8, 1, 2, 2)
    assert c.master_addr == "gpu007" and c.job_id == "1234" and c.restart_count == 1


def test_slurm_uneven_tasks_per_node():
    env = dict(SLURM, SLURM_STEP_TASKS_PER_NODE="3(x2),2", SLURM_STEP_NUM_TASKS="8", SLURM_NODEID="2",
               SLURM_PROCID="7", SLURM_LOCALID="1")
    assert detect(env).local_size == 2


def test_slurm_batch_shell_is_not_a_step():
    # In the batch script itself (no srun) there is a job but no step: single process, with a warning.
    env = {"SLURM_JOB_ID": "99", "SLURM_PROCID": "0"}
    with pytest.warns(UserWarning, match="srun"):
        c = detect(env)
    assert c.launcher == "single" and c.size == 1 and c.job_id == "99"


def test_openmpi_wins_over_slurm():
    # mpirun inside an allocation: OMPI_* describe the MPI job, SLURM_* the allocation.
    c = detect({**SLURM, **OMPI})
    assert c.launcher == "openmpi" and c.rank == 3


def test_horovod_gloo():
    c = detect(GLOO)
    assert (c.launcher, c.rank, c.size, c.local_rank, c.local_size, c.node_rank) == ("horovod-gloo", 5, 8, 1, 2, 2)
    assert c.num_nodes == 4 and c.rank != 0
    assert c.master_addr is None and c.master_port is None  # the rendezvous server is Horovod's, not ours


def test_horovod_gloo_without_size_is_an_error():
    env = {k: v for k, v in GLOO.items() if k != "HOROVOD_SIZE"}
    with pytest.raises(ClusterError, match="horovod-gloo: rank or world size missing"):
        detect(env)


def test_horovod_gloo_in_slurm_batch_shell():
    # sbatch script running horovodrun --gloo: the workers see the allocation, no step, and no warning.
    batch = {"SLURM_JOB_ID": "99", "SLURM_PROCID": "0", "SLURM_JOB_NODELIST": "gpu[001-004]",
             "SLURM_TASKS_PER_NODE": "2(x4)", "SLURM_RESTART_COUNT": "2"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        c = detect({**batch, **GLOO})
    assert (c.launcher, c.rank, c.size, c.job_id, c.restart_count) == ("horovod-gloo", 5, 8, "99", 2)


def test_horovod_gloo_wins_over_an_outer_srun_step():
    # srun -n1 horovodrun --gloo -np 8 ...: every worker inherits the one-task step's SLURM_* variables.
    step = dict(SLURM, SLURM_PROCID="0", SLURM_STEP_NUM_TASKS="1", SLURM_LOCALID="0", SLURM_NODEID="0")
    c = detect({**step, **GLOO})
    assert (c.launcher, c.rank, c.size, c.local_rank) == ("horovod-gloo", 5, 8, 1)


def test_mpi_launch_is_not_horovod_gloo():
    # horovodrun without --gloo is mpirun underneath: HOROVOD_CONTROLLER may be set, HOROVOD_RANK is not.
    c = detect({**OMPI, "HOROVOD_CONTROLLER": "mpi", "HOROVOD_CPU_OPERATIONS": "mpi"})
    assert c.launcher == "openmpi" and c.rank == 3


def test_pmix():
    c = detect({"PMIX_RANK": "2", "PMIX_SIZE": "4", "PMIX_LOCAL_RANK": "0", "PMIX_LOCAL_SIZE": "2"})
    assert (c.launcher, c.rank, c.size, c.local_rank, c.node_rank) == ("pmi", 2, 4, 0, 1)


def test_pmi_hydra():
    c = detect({"PMI_RANK": "1", "PMI_SIZE": "2", "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "2"})
    assert (c.launcher, c.rank, c.size, c.local_rank) == ("pmi", 1, 2, 1)


def test_torchrun():
    c = detect({"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "GROUP_RANK": "0",
                "MASTER_ADDR": "n1", "MASTER_PORT": "29500"})
    assert (c.launcher, c.rank, c.size, c.local_size, c.master_addr, c.master_port) == \
        ("torchrun", 1, 4, 2, "n1", 29500)


def test_single():
    c = detect({})
    assert c == ClusterEnv(rank=0, local_rank=0, size=1, local_size=1, node_rank=0, launcher="single",
                           hostname=c.hostname, node_name=c.hostname, step_id=None)


def test_node_name_is_slurms_name_for_the_node():
    assert detect({"SLURMD_NODENAME": "gpu017"}).node_name == "gpu017"  # what a hang report blames
    assert detect({"SLURM_STEP_ID": "batch"}).step_id is None


@pytest.mark.parametrize("env, words", [
    (dict(OMPI, OMPI_COMM_WORLD_RANK="8"), "rank 8 is outside 0..7"),
    (dict(OMPI, OMPI_COMM_WORLD_LOCAL_RANK="2"), "local rank 2 is outside 0..1"),
    (dict(OMPI, OMPI_COMM_WORLD_LOCAL_SIZE="9"), "local size 9 must be in 1..8"),
    (dict(OMPI, OMPI_COMM_WORLD_SIZE="zero"), "'zero' is not an integer"),
    ({"RANK": "0", "WORLD_SIZE": "2"}, "local rank missing"),
    (dict(GLOO, HOROVOD_LOCAL_RANK="2"), "horovod-gloo: local rank 2 is outside 0..1"),
    (dict(GLOO, HOROVOD_RANK="x"), "HOROVOD_RANK='x' is not an integer"),
])
def test_inconsistent_values_are_clear_errors(env, words):
    with pytest.raises(ClusterError, match=words):
        detect(env)


def test_threads_per_rank():
    c = detect(OMPI)  # 2 ranks on this node
    assert threads_per_rank(c, cores=16, env={}) == 8
    assert threads_per_rank(c, cores=1, env={}) == 1
    assert threads_per_rank(c, cores=16, env={"OMP_NUM_THREADS": "3"}) == 3
    assert threads_per_rank(c, cores=16, env={"SLURM_CPUS_PER_TASK": "4"}) == 4


def test_gpu_pinning_by_local_rank():
    c = detect(OMPI)
    assert visible_gpu_index(c, 0) is None
    assert visible_gpu_index(c, 4) == 1
    with pytest.raises(ClusterError, match="2 ranks on this node but only 1 GPU"):
        visible_gpu_index(c, 1)


def test_only_cluster_module_reads_launcher_variables():
    # The architecture's rule: everything else receives a ClusterEnv.
    import pathlib
    import re
    root = pathlib.Path(__file__).resolve().parents[2] / "hpctrain"
    pattern = re.compile(r"(OMPI_COMM_WORLD|SLURM_PROCID|PMIX_RANK|HOROVOD_RANK|LOCAL_RANK\"|WORLD_SIZE\")")
    offenders = [str(p.relative_to(root)) for p in root.rglob("*.py")
                 if p.name != "cluster.py" and pattern.search(p.read_text())]
    assert offenders == []


@pytest.mark.parametrize("nodelist, hosts", [
    ("gpu[003-005,12],login1", ["gpu003", "gpu004", "gpu005", "gpu12", "login1"]),  # the docstring's example
    ("node7", ["node7"]),
    ("login1,login2", ["login1", "login2"]),
    ("n[8-11]", ["n8", "n9", "n10", "n11"]),  # no padding: the width is the low end's
    ("n[098-101]", ["n098", "n099", "n100", "n101"]),  # padding kept past a digit boundary
    ("gpu[7]", ["gpu7"]),
    ("gpu[07]", ["gpu07"]),
    ("node[1-2]-ib", ["node1-ib", "node2-ib"]),  # suffix after the brackets
    ("a[1-2],b[01-02],c", ["a1", "a2", "b01", "b02", "c"]),
    ("x1,gpu[3,5-6]-ib0,y", ["x1", "gpu3-ib0", "gpu5-ib0", "gpu6-ib0", "y"]),
    ("", []),
])
def test_expand_hostlist(nodelist, hosts):
    assert expand_hostlist(nodelist) == hosts


def test_expand_hostlist_agrees_with_master_addr():
    assert expand_hostlist(SLURM["SLURM_STEP_NODELIST"]) == ["gpu007", "gpu008", "gpu009", "gpu010"]
    assert expand_hostlist(SLURM["SLURM_STEP_NODELIST"])[0] == detect(SLURM).master_addr


@pytest.mark.parametrize("spec, counts", [("2(x3),1", [2, 2, 2, 1]), ("4", [4]), ("1,3(x2)", [1, 3, 3]),
                                          ("2(x1)", [2])])
def test_slurm_task_counts(spec, counts):
    assert _slurm_task_counts(spec) == counts


def test_tf_config_detected_without_a_chief():
    # Four workers, two per host: worker 2 is the first on the second host.
    c = detect({"TF_CONFIG": tf_conf(index=2)})
    assert (c.launcher, c.rank, c.size, c.local_rank, c.local_size, c.node_rank) == ("tf-config", 2, 4, 0, 2, 1)
    assert c.num_nodes == 2 and c.rank != 0
    c = detect({"TF_CONFIG": tf_conf(index=3)})
    assert (c.rank, c.local_rank, c.local_size, c.node_rank) == (3, 1, 2, 1)
    c = detect({"TF_CONFIG": tf_conf(index=0)})
    assert (c.rank, c.local_rank, c.node_rank) == (0, 0, 0) and c.rank == 0


def test_tf_config_detected_with_a_chief():
    # The chief is rank 0, the workers follow: worker i is rank i + 1.
    worker, chief = ("a:2", "b:1"), ("a:1",)
    c = detect({"TF_CONFIG": tf_conf("chief", 0, worker, chief)})
    assert (c.rank, c.size, c.local_rank, c.local_size, c.node_rank) == (0, 3, 0, 2, 0) and c.rank == 0
    c = detect({"TF_CONFIG": tf_conf("worker", 0, worker, chief)})
    assert (c.rank, c.size, c.local_rank, c.local_size, c.node_rank) == (1, 3, 1, 2, 0)
    c = detect({"TF_CONFIG": tf_conf("worker", 1, worker, chief)})
    assert (c.rank, c.size, c.local_rank, c.local_size, c.node_rank) == (2, 3, 0, 1, 1)


def test_tf_config_hosts_need_not_be_contiguous():
    # Ranks on a node are counted by host name, wherever they stand; nodes in order of first appearance.
    c = detect({"TF_CONFIG": tf_conf(index=2, worker=("b:1", "a:1", "b:2"))})
    assert (c.rank, c.local_rank, c.local_size, c.node_rank) == (2, 1, 2, 0)
    c = detect({"TF_CONFIG": tf_conf(index=1, worker=("b:1", "a:1", "b:2"))})
    assert (c.rank, c.local_rank, c.local_size, c.node_rank) == (1, 0, 1, 1)


def test_tf_config_task_index_defaults_to_0():
    text = json.dumps({"cluster": {"worker": ["a:1", "b:1"]}, "task": {"type": "worker"}})
    assert parse_tf_config(text) == (["a:1", "b:1"], 0)


@pytest.mark.parametrize("outer", [OMPI, SLURM], ids=["openmpi", "slurm"])
def test_launchers_win_over_tf_config(outer):
    # mpirun/srun started this process: TF_CONFIG (even a broken one) is for tf_config to check, not for detect.
    for text in (tf_conf(index=1), "not json"):
        c = detect({**outer, "TF_CONFIG": text})
        assert c.launcher == ("openmpi" if outer is OMPI else "slurm") and c.rank == int(
            outer.get("OMPI_COMM_WORLD_RANK", outer.get("SLURM_PROCID")))


@pytest.mark.parametrize("text, words", [
    ("not json", "not JSON"),
    ("{\"cluster\": {", "not JSON"),
    ("[]", "needs a 'cluster' object and a 'task' object"),
    ('{"cluster": {"worker": ["a:1"]}}', "needs a 'cluster' object and a 'task' object"),  # no task
    ('{"task": {"type": "worker", "index": 0}}', "needs a 'cluster' object and a 'task' object"),  # no cluster
    ('{"cluster": ["a:1"], "task": {"type": "worker", "index": 0}}', "needs a 'cluster' object"),
    ('{"cluster": {"worker": ["a:1"], "ps": ["b:1"]}, "task": {"type": "worker", "index": 0}}',
     "cluster has job(s) ['ps']; only 'chief' and 'worker'"),
    ('{"cluster": {"worker": ["a:1"], "evaluator": ["b:1"]}, "task": {"type": "worker", "index": 0}}',
     "cluster has job(s) ['evaluator']"),
    (tf_conf(worker=("a",)), "cluster.worker must be a list of 'host:port' strings, got ['a']"),
    (tf_conf(worker=("a:http",)), "cluster.worker must be a list of 'host:port' strings"),
    (tf_conf(worker=("a b:1",)), "cluster.worker must be a list of 'host:port' strings"),
    (tf_conf(worker=("a:1", 7)), "cluster.worker must be a list of 'host:port' strings"),
    ('{"cluster": {"worker": "a:1"}, "task": {"type": "worker", "index": 0}}',
     "cluster.worker must be a list of 'host:port' strings, got 'a:1'"),
    (tf_conf("chief", 0, ("a:1",), ("c",)), "cluster.chief must be a list of 'host:port' strings"),
    (tf_conf("chief", 0, ("a:1",), ("c:1", "d:1")), "2 chiefs; at most 1"),
    (tf_conf(worker=()), "cluster lists no worker"),
    (tf_conf(index=4), "is not one of the cluster's 0 chief(s) and 4 worker(s)"),
    (tf_conf(index=-1), "is not one of the cluster's 0 chief(s) and 4 worker(s)"),
    (tf_conf(index="0"), "is not one of the cluster's"),
    (tf_conf("chief", 0), "is not one of the cluster's 0 chief(s)"),  # a chief task but no chief job
    (tf_conf("chief", 1, chief=("c:1",)), "is not one of the cluster's 1 chief(s) and 4 worker(s)"),
    (tf_conf("ps", 0), "'type': 'ps'"),
    (tf_conf("work\ner", 0), "is not one of the cluster's"),  # a newline in the value stays escaped
])
def test_malformed_tf_config_is_a_one_line_error(text, words):
    with pytest.raises(ClusterError) as e:
        parse_tf_config(text)
    message = str(e.value)
    assert message.startswith("TF_CONFIG: ") and words in message, message
    assert '"task": {"type": "worker", "index": i}' in message  # says what it should look like
    assert "\n" not in message


def test_malformed_tf_config_stops_detect():
    # Alone, a hand-written TF_CONFIG is the launcher: a broken one is an error, not a silent single process.
    with pytest.raises(ClusterError, match="TF_CONFIG: 2 chiefs"):
        detect({"TF_CONFIG": tf_conf("chief", 0, ("a:1",), ("c:1", "d:1"))})


def test_tf_config_keeps_a_users_consistent_tf_config():
    text = tf_conf(index=3, worker=[f"h{i}:9{i}" for i in range(8)])
    c = detect({**OMPI, "TF_CONFIG": text})  # mpirun rank 3 of 8
    assert tf_config(c, 65535, env={"TF_CONFIG": text}) == json.loads(text)  # port_base unused (would overflow)
    text = tf_conf(index=2)  # hand-written, no launcher
    assert tf_config(detect({"TF_CONFIG": text}), 23456, env={"TF_CONFIG": text}) == json.loads(text)
    text = tf_conf("worker", 0, ("a:2", "b:1"), ("a:1",))  # with a chief: worker 0 is rank 1
    c = ClusterEnv(rank=1, local_rank=1, size=3, local_size=2, node_rank=0, launcher="openmpi")
    assert tf_config(c, 23456, env={"TF_CONFIG": text}) == json.loads(text)
    text = tf_conf("worker", 2, [f"h{i}:1" for i in range(7)], ["c:1"])  # chief + 7 workers: worker 2 is rank 3
    assert tf_config(detect(OMPI), 23456, env={"TF_CONFIG": text}) == json.loads(text)


def test_tf_config_fills_in_the_default_task_index():
    text = json.dumps({"cluster": {"worker": ["a:1", "b:1"]}, "task": {"type": "worker"}})
    c = detect({"TF_CONFIG": text})
    assert tf_config(c, 23456, env={"TF_CONFIG": text})["task"] == {"type": "worker", "index": 0}


def test_tf_config_reads_os_environ_by_default(monkeypatch):
    text = tf_conf(index=1)
    monkeypatch.setenv("TF_CONFIG", text)
    assert tf_config(detect({"TF_CONFIG": text}), 23456) == json.loads(text)


@pytest.mark.parametrize("text, words", [
    (tf_conf(index=1), "TF_CONFIG: task is rank 1 of 4, but the launcher (openmpi) started rank 3 of 8"),
    (tf_conf(index=3, worker=[f"h{i}:1" for i in range(9)]), "rank 3 of 9, but the launcher (openmpi) started"),
    (tf_conf(index=2, worker=[f"h{i}:1" for i in range(8)]), "rank 2 of 8, but the launcher (openmpi) started"),
    (tf_conf("worker", 3, [f"h{i}:1" for i in range(7)], ["c:1"]), "rank 4 of 8, but"),  # the chief counts first
])
def test_tf_config_inconsistent_with_the_launcher(text, words):
    c = detect(OMPI)  # rank 3 of 8
    with pytest.raises(ClusterError) as e:
        tf_config(c, 23456, env={"TF_CONFIG": text})
    assert words in str(e.value) and "unset TF_CONFIG" in str(e.value) and "\n" not in str(e.value)


def test_tf_config_one_worker_says_how_to_launch():
    with pytest.raises(ClusterError) as e:
        tf_config(detect({}), 23456, env={})
    message = str(e.value)
    assert "one worker and no TF_CONFIG" in message and "srun" in message and "mpirun" in message, message
    assert "--backend mirrored" in message and "\n" not in message


def test_tf_config_single_node_is_localhost_at_base_plus_rank():
    env = dict(OMPI, OMPI_COMM_WORLD_SIZE="4", OMPI_COMM_WORLD_LOCAL_SIZE="4", OMPI_COMM_WORLD_LOCAL_RANK="3",
               OMPI_COMM_WORLD_NODE_RANK="0")
    c = detect(env)
    assert tf_config(c, 30000, env={}) == {
        "cluster": {"worker": ["localhost:30000", "localhost:30001", "localhost:30002", "localhost:30003"]},
        "task": {"type": "worker", "index": 3}}


def test_tf_config_slurm_block_distribution():
    env = {"SLURM_PROCID": "2", "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "4", "SLURM_LOCALID": "0",
           "SLURM_NODEID": "1", "SLURM_STEP_TASKS_PER_NODE": "2(x2)", "SLURM_STEP_NODELIST": "node[1-2]"}
    c = detect(env)
    assert tf_config(c, 23456, env=env) == {
        "cluster": {"worker": ["node1:23456", "node1:23457", "node2:23458", "node2:23459"]},
        "task": {"type": "worker", "index": 2}}


def test_tf_config_slurm_uneven_and_job_variables():
    # Step variables win over the job's; without them the job's are used. Uneven counts: 3 then 1.
    env = {"SLURM_PROCID": "3", "SLURM_STEP_ID": "0", "SLURM_NTASKS": "4", "SLURM_LOCALID": "0",
           "SLURM_NODEID": "1", "SLURM_TASKS_PER_NODE": "3,1", "SLURM_JOB_NODELIST": "gpu[09-10]"}
    c = detect(env)
    assert (c.size, c.local_size) == (4, 1)
    assert tf_config(c, 100, env=env)["cluster"]["worker"] == ["gpu09:100", "gpu09:101", "gpu09:102", "gpu10:103"]
    step = dict(env, SLURM_STEP_TASKS_PER_NODE="2(x2)", SLURM_STEP_NODELIST="n[1-2]")
    assert tf_config(detect(step), 100, env=step)["cluster"]["worker"] == ["n1:100", "n1:101", "n2:102", "n2:103"]


def test_tf_config_slurm_on_one_node_is_localhost():
    env = dict(SLURM, SLURM_PROCID="1", SLURM_STEP_NUM_TASKS="2", SLURM_NODEID="0", SLURM_STEP_TASKS_PER_NODE="2",
               SLURM_STEP_NODELIST="gpu007")
    assert tf_config(detect(env), 23456, env=env)["cluster"]["worker"] == ["localhost:23456", "localhost:23457"]


def test_tf_config_explicit_hosts():
    c = detect(OMPI)  # rank 3 of 8 on 4 nodes: the hosts would come from MPI
    hosts = [h for h in "abcd" for _ in range(2)]
    assert tf_config(c, 23456, env={}, hosts=hosts) == {
        "cluster": {"worker": [f"{h}:{23456 + i}" for i, h in enumerate(hosts)]},
        "task": {"type": "worker", "index": 3}}
    with pytest.raises(ClusterError, match="3 worker host\\(s\\) for 8 ranks"):
        tf_config(c, 23456, env={}, hosts=["a", "b", "c"])


def test_tf_config_port_overflow():
    c = detect(OMPI)  # 8 workers: ports base..base+7
    assert tf_config(c, 65528, env={}, hosts=["h"] * 8)["cluster"]["worker"][-1] == "h:65535"
    with pytest.raises(ClusterError) as e:
        tf_config(c, 65529, env={}, hosts=["h"] * 8)
    assert "dist.port_base (--port-base): 65529 + 8 workers passes port 65535" in str(e.value)


def test_tf_config_multi_node_mpi_needs_hosts():
    with pytest.raises(ClusterError) as e:
        tf_config(detect(OMPI), 23456, env={})
    assert "--backend multiworker: 4 nodes under openmpi and no host list" in str(e.value)
    assert "TF_CONFIG" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("address", ["127.0.0.1", ""])
def test_port_in_use_while_a_socket_listens(address):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((address, 0))
        s.listen()
        port = s.getsockname()[1]
        assert port_in_use(port)
    assert not port_in_use(port)


@pytest.mark.skipif(not hasattr(socket, "SO_REUSEPORT"), reason="no SO_REUSEPORT on this platform")
def test_port_in_use_sees_a_reuseport_listener():
    # gRPC listens with SO_REUSEPORT: a second server on the port would start silently; the probe must see it.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        s.bind(("", 0))
        s.listen()
        assert port_in_use(s.getsockname()[1])


@pytest.mark.parametrize("nodelist, hosts", [
    ("rack[1-2]-n[1-2]", ["rack1-n1", "rack1-n2", "rack2-n1", "rack2-n2"]),  # two bracket groups in one name
    ("node[01-02]-ib,login1", ["node01-ib", "node02-ib", "login1"]),
])
def test_expand_hostlist_as_slurm_does(nodelist, hosts):
    assert expand_hostlist(nodelist) == hosts


def test_master_addr_keeps_the_suffix():
    env = {**SLURM, "SLURM_STEP_NODELIST": "node[1-2]-ib"}
    assert detect(env).master_addr == "node1-ib"  # the old parser dropped '-ib'
    with pytest.raises(ClusterError, match="cannot be expanded"):
        expand_hostlist("node[1-")
