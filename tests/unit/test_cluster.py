"""Cluster detection on patched environments, one per launcher."""
import warnings

import pytest

from hpctrain.cluster import ClusterEnv, ClusterError, detect, threads_per_rank, visible_gpu_index

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


def test_openmpi():
    c = detect(OMPI)
    assert (c.launcher, c.rank, c.size, c.local_rank, c.local_size, c.node_rank) == ("openmpi", 3, 8, 1, 2, 1)
    assert c.num_nodes == 4 and not c.is_root


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
    assert c.num_nodes == 4 and not c.is_root
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
