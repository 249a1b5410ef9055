"""Where am I running? The ONLY module that reads launcher environment variables.

Everything else receives a `ClusterEnv`. Detection order (first match wins): horovodrun --gloo
(HOROVOD_RANK), horovodrun/mpirun (Open MPI), srun (Slurm step), PMI/PMIx (MPICH, Intel MPI,
srun --mpi=pmix without Open MPI), torchrun, a TF_CONFIG set by hand (tf.distribute's own launch: one
process per entry), single process (with a warning if a scheduler allocation is visible but no launcher is).
`tf_config` turns any of them into the TF_CONFIG of tf.distribute's MultiWorkerMirroredStrategy.
"""
from __future__ import annotations

import json
import os
import re
import socket
import warnings
from collections.abc import Mapping
from dataclasses import dataclass

from hpctrain.errors import UserError


class ClusterError(UserError, RuntimeError):
    """Launcher variables that contradict each other."""


@dataclass(frozen=True)
class ClusterEnv:
    rank: int
    local_rank: int
    size: int
    local_size: int
    node_rank: int
    launcher: str  # "horovod-gloo" | "openmpi" | "slurm" | "pmi" | "torchrun" | "tf-config" | "single"
    hostname: str = ""
    master_addr: str | None = None  # set by torchrun / Slurm; used by torch.distributed when present
    master_port: int | None = None
    job_id: str | None = None
    restart_count: int = 0  # Slurm requeue count: > 0 means this job was restarted
    node_name: str = ""  # Slurm's name of this node (SLURMD_NODENAME), else the host name: what a report blames
    step_id: int | None = None  # Slurm job step: a relaunch in the same allocation gets a new one

    @property
    def num_nodes(self) -> int:
        return max(1, self.size // max(1, self.local_size))


def _int(env: Mapping[str, str], *names: str) -> int | None:
    for name in names:
        value = env.get(name)
        if value is None or value == "":
            continue
        try:
            return int(value)
        except ValueError:
            raise ClusterError(f"{name}={value!r} is not an integer") from None
    return None


def _first_slurm_host(nodelist: str | None) -> str | None:
    """First host of a Slurm nodelist like 'gpu[003-010,12]-ib,login1' -> 'gpu003-ib'."""
    hosts = expand_hostlist(nodelist) if nodelist else []
    return hosts[0] if hosts else None


def _detect_horovod_gloo(env):
    # horovodrun --gloo (horovod/runner/gloo_run.py) gives each worker HOROVOD_RANK, _SIZE, _LOCAL_RANK,
    # _LOCAL_SIZE, _CROSS_RANK, _CROSS_SIZE and _HOSTNAME, no OMPI_*. horovodrun without --gloo goes
    # through mpirun and sets no HOROVOD_RANK, so MPI launches are unaffected.
    if "HOROVOD_RANK" not in env:
        return None
    rank = _int(env, "HOROVOD_RANK")
    size = _int(env, "HOROVOD_SIZE")
    local_rank = _int(env, "HOROVOD_LOCAL_RANK")
    local_size = _int(env, "HOROVOD_LOCAL_SIZE")
    # Cross rank = index of this host among the hosts that have this local rank: the node index
    # whenever every host has the same slot count (-H a:4,b:4), Horovod's usual layout.
    node_rank = _int(env, "HOROVOD_CROSS_RANK")
    if node_rank is None and local_size and rank is not None:
        node_rank = rank // local_size
    # The rendezvous address is Horovod's own driver, not a torch.distributed master: not master_addr.
    extra = {"job_id": env.get("SLURM_JOB_ID"), "restart_count": _int(env, "SLURM_RESTART_COUNT") or 0}
    return "horovod-gloo", rank, size, local_rank, local_size, node_rank, extra


def _detect_openmpi(env):
    if "OMPI_COMM_WORLD_RANK" not in env:
        return None
    rank = _int(env, "OMPI_COMM_WORLD_RANK")
    size = _int(env, "OMPI_COMM_WORLD_SIZE")
    local_rank = _int(env, "OMPI_COMM_WORLD_LOCAL_RANK")
    local_size = _int(env, "OMPI_COMM_WORLD_LOCAL_SIZE")
    node_rank = _int(env, "OMPI_COMM_WORLD_NODE_RANK")
    if node_rank is None and local_size:
        node_rank = rank // local_size
    # mpirun inside a Slurm allocation (sbatch): the job's id and requeue count still name this run's job.
    extra = {"job_id": env.get("SLURM_JOB_ID"), "restart_count": _int(env, "SLURM_RESTART_COUNT") or 0}
    return "openmpi", rank, size, local_rank, local_size, node_rank, extra


def _detect_slurm(env):
    # SLURM_PROCID exists only inside a job step (srun), not in the batch shell itself.
    if "SLURM_PROCID" not in env or ("SLURM_STEP_ID" not in env and "SLURM_STEPID" not in env):
        return None
    rank = _int(env, "SLURM_PROCID")
    size = _int(env, "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "SLURM_NPROCS")
    local_rank = _int(env, "SLURM_LOCALID")
    node_rank = _int(env, "SLURM_NODEID")
    local_size = _slurm_tasks_on_node(env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE"),
                                      node_rank or 0)
    extra = {"master_addr": _first_slurm_host(env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")),
             "job_id": env.get("SLURM_JOB_ID"),
             "restart_count": _int(env, "SLURM_RESTART_COUNT") or 0}
    return "slurm", rank, size, local_rank, local_size, node_rank, extra


def _slurm_tasks_on_node(spec: str | None, node: int) -> int | None:
    """'2(x3),1' -> per node counts [2,2,2,1]; return the count for `node`."""
    if not spec:
        return None
    counts = _slurm_task_counts(spec)
    return counts[node] if node < len(counts) else counts[-1]


def _detect_pmi(env):
    # PMIx (OpenPMIx-based launchers) and PMI-1/2 (MPICH Hydra, Intel MPI).
    if "PMIX_RANK" in env:
        rank = _int(env, "PMIX_RANK")
        size = _int(env, "PMIX_SIZE", "PMI_SIZE")
        local_rank = _int(env, "PMIX_LOCAL_RANK", "MPI_LOCALRANKID")
        local_size = _int(env, "PMIX_LOCAL_SIZE", "MPI_LOCALNRANKS")
    elif "PMI_RANK" in env:
        rank = _int(env, "PMI_RANK")
        size = _int(env, "PMI_SIZE")
        local_rank = _int(env, "MPI_LOCALRANKID", "PMI_LOCAL_RANK")
        local_size = _int(env, "MPI_LOCALNRANKS", "PMI_LOCAL_SIZE")
    else:
        return None
    if size is None:
        return None  # PMIx servers set PMIX_RANK for singletons too; without a size we know nothing
    node_rank = rank // local_size if local_size else None
    return "pmi", rank, size, local_rank, local_size, node_rank, {}


def _detect_torchrun(env):
    if "RANK" not in env or "WORLD_SIZE" not in env:
        return None
    rank = _int(env, "RANK")
    size = _int(env, "WORLD_SIZE")
    local_rank = _int(env, "LOCAL_RANK")
    local_size = _int(env, "LOCAL_WORLD_SIZE")
    node_rank = _int(env, "GROUP_RANK", "NODE_RANK")
    extra = {"master_addr": env.get("MASTER_ADDR"), "master_port": _int(env, "MASTER_PORT")}
    return "torchrun", rank, size, local_rank, local_size, node_rank, extra


TF_CONFIG_SHAPE = '{"cluster": {"worker": ["host:port", ...]}, "task": {"type": "worker", "index": i}}'


def parse_tf_config(text: str) -> tuple[list[str], int]:
    """TF_CONFIG -> (every task's "host:port" in rank order: the chief first if there is one, then the
    workers; this task's rank). A malformed one raises a ClusterError that says what is wrong."""
    def bad(why):
        return ClusterError(f"TF_CONFIG: {why} (expected {TF_CONFIG_SHAPE})")
    try:
        conf = json.loads(text)
    except ValueError as e:
        raise bad(f"not JSON: {e}") from None
    if not (isinstance(conf, dict) and isinstance(conf.get("cluster"), dict) and isinstance(conf.get("task"), dict)):
        raise bad("needs a 'cluster' object and a 'task' object")
    cluster, task = conf["cluster"], conf["task"]
    unknown = set(cluster) - {"chief", "worker"}
    if unknown:
        raise bad(f"cluster has job(s) {sorted(unknown)}; only 'chief' and 'worker' are used by "
                  "MultiWorkerMirroredStrategy")
    jobs = {job: cluster.get(job, []) for job in ("chief", "worker")}
    for job, addresses in jobs.items():
        if not isinstance(addresses, list) or not all(isinstance(a, str) and re.fullmatch(r"[^:\s]+:\d+", a)
                                                      for a in addresses):
            raise bad(f"cluster.{job} must be a list of 'host:port' strings, got {addresses!r}")
    if len(jobs["chief"]) > 1:
        raise bad(f"{len(jobs['chief'])} chiefs; at most 1")
    addresses = jobs["chief"] + jobs["worker"]
    if not addresses:
        raise bad("cluster lists no worker")
    kind, index = task.get("type"), task.get("index", 0)
    if kind not in ("chief", "worker") or not isinstance(index, int) or not 0 <= index < len(jobs.get(kind, [])):
        raise bad(f"task {task!r} is not one of the cluster's {len(jobs['chief'])} chief(s) and "
                  f"{len(jobs['worker'])} worker(s)")
    return addresses, index + (len(jobs["chief"]) if kind == "worker" else 0)


def _detect_tf_config(env):
    # tf.distribute's own multi-worker launch: the user starts one process per TF_CONFIG entry, each with its task.
    if "TF_CONFIG" not in env:
        return None
    addresses, rank = parse_tf_config(env["TF_CONFIG"])
    hosts = [a.rsplit(":", 1)[0] for a in addresses]
    mine = hosts[rank]
    local = [i for i, h in enumerate(hosts) if h == mine]
    node_rank = list(dict.fromkeys(hosts)).index(mine)
    return "tf-config", rank, len(addresses), local.index(rank), len(local), node_rank, {}


def expand_hostlist(nodelist: str) -> list[str]:
    """A Slurm node list -> host names, as Slurm expands it (python-hostlist): 'gpu[003-005,12],rack[1-2]-n[1-2]'
    -> gpu003 gpu004 gpu005 gpu12 rack1-n1 rack1-n2 rack2-n1 rack2-n2. A malformed list is a ClusterError."""
    import hostlist
    try:
        return hostlist.expand_hostlist(nodelist)
    except hostlist.BadHostlist as e:
        raise ClusterError(f"Slurm node list {nodelist!r} cannot be expanded ({e})") from None


def _slurm_task_counts(spec: str) -> list[int]:
    """'2(x3),1' -> tasks per node [2, 2, 2, 1]."""
    counts: list[int] = []
    for part in spec.split(","):
        if "(x" in part:
            n, reps = part.rstrip(")").split("(x")
            counts += [int(n)] * int(reps)
        else:
            counts.append(int(part))
    return counts


def tf_config(c: ClusterEnv, port_base: int, env: Mapping[str, str] | None = None,
              hosts: list[str] | None = None) -> dict:
    """The TF_CONFIG for MultiWorkerMirroredStrategy: the user's own if set (it must describe this launch),
    else one worker per rank at its host and port `port_base + rank` (unique even when several ranks
    share a host). Hosts: `hosts` (one per rank, e.g. gathered over MPI), else
    localhost when every rank is on this node, else Slurm's step node list (block distribution)."""
    env = os.environ if env is None else env
    if "TF_CONFIG" in env:
        addresses, rank = parse_tf_config(env["TF_CONFIG"])
        if (len(addresses), rank) != (c.size, c.rank):
            raise ClusterError(f"TF_CONFIG: task is rank {rank} of {len(addresses)}, but the launcher ({c.launcher}) "
                               f"started rank {c.rank} of {c.size}: unset TF_CONFIG or launch one process per entry")
        conf = json.loads(env["TF_CONFIG"])
        conf["task"].setdefault("index", 0)  # parse_tf_config's default; the strategy reads conf["task"]["index"]
        return conf
    if c.size < 2:
        raise ClusterError("--backend multiworker: one worker and no TF_CONFIG; launch one process per node or GPU "
                           "(`srun --ntasks-per-node=1 python -m ...`, `mpirun -np N python -m ...`) or set TF_CONFIG "
                           f"in each ({TF_CONFIG_SHAPE}); one process: --backend mirrored or none")
    if port_base + c.size - 1 > 65535:
        raise ClusterError(f"dist.port_base (--port-base): {port_base} + {c.size} workers passes port 65535")
    if hosts is None:
        if c.local_size == c.size:
            hosts = ["localhost"] * c.size
        elif c.launcher == "slurm":
            nodes = expand_hostlist(env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST", ""))
            counts = _slurm_task_counts(env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE", ""))
            counts = (counts + counts[-1:] * len(nodes))[:len(nodes)]
            hosts = [node for node, n in zip(nodes, counts) for _ in range(n)]
        else:
            raise ClusterError(f"--backend multiworker: {c.num_nodes} nodes under {c.launcher} and no host list; "
                               "set TF_CONFIG in each process")
    if len(hosts) != c.size:
        raise ClusterError(f"--backend multiworker: {len(hosts)} worker host(s) for {c.size} ranks")
    return {"cluster": {"worker": [f"{h}:{port_base + i}" for i, h in enumerate(hosts)]},
            "task": {"type": "worker", "index": c.rank}}


def port_in_use(port: int) -> bool:
    """True when another process listens on `port` here. gRPC binds with SO_REUSEPORT, so a second TF server
    on a taken port would start without an error and steal half the connections: ask first. SO_REUSEADDR
    lets closed connections in TIME_WAIT (a previous run) pass, as they do for the server."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("", port))
        except OSError:
            return True
    return False


# horovodrun --gloo comes first: HOROVOD_RANK is set per worker by the launcher that started this
# very process, and horovodrun copies its whole environment into every worker (over ssh too). So
# OMPI_*/SLURM_*/PMI* next to HOROVOD_RANK were inherited from an outer launcher and describe the one
# horovodrun process: `srun -n1 horovodrun --gloo -np 8 ...` hands every worker SLURM_PROCID=0,
# SLURM_STEP_ID and SLURM_STEP_NUM_TASKS=1, which _detect_slurm would read as "rank 0 of 1"; in the
# batch shell (no srun) only SLURM_JOB_ID & co. are there and would give "single". Horovod's own
# get_env_rank_and_size() uses the same order (HOROVOD_RANK before OMPI_COMM_WORLD_RANK).
DETECTORS = (_detect_horovod_gloo, _detect_openmpi, _detect_slurm, _detect_pmi, _detect_torchrun, _detect_tf_config)


def detect(env: Mapping[str, str] | None = None) -> ClusterEnv:
    """Build the ClusterEnv from launcher variables (os.environ by default)."""
    env = os.environ if env is None else env
    for detector in DETECTORS:
        found = detector(env)
        if found is not None:
            break
    else:
        if "SLURM_JOB_ID" in env:
            warnings.warn("inside a Slurm allocation but not launched by srun/mpirun: running a single process "
                          "(use `srun python -m ...` to start one rank per task)", stacklevel=2)
        found = ("single", 0, 1, 0, 1, 0, {"job_id": env.get("SLURM_JOB_ID"),
                                           "restart_count": _int(env, "SLURM_RESTART_COUNT") or 0})
    launcher, rank, size, local_rank, local_size, node_rank, extra = found
    if rank is None or size is None:
        raise ClusterError(f"{launcher}: rank or world size missing (rank={rank}, size={size})")
    local_rank = 0 if local_rank is None and size == 1 else local_rank
    if local_rank is None:
        raise ClusterError(f"{launcher}: local rank missing for rank {rank} of {size}")
    local_size = local_size if local_size is not None else (1 if size == 1 else None)
    if local_size is None:
        raise ClusterError(f"{launcher}: local size missing for rank {rank} of {size}")
    node_rank = node_rank if node_rank is not None else 0
    env_obj = ClusterEnv(rank=rank, local_rank=local_rank, size=size, local_size=local_size,
                         node_rank=node_rank, launcher=launcher, hostname=socket.gethostname(),
                         master_addr=extra.get("master_addr"), master_port=extra.get("master_port"),
                         job_id=extra.get("job_id"), restart_count=extra.get("restart_count", 0),
                         node_name=env.get("SLURMD_NODENAME") or socket.gethostname(),
                         step_id=_step_id(env))
    validate(env_obj)
    return env_obj


def _step_id(env: Mapping[str, str]) -> int | None:
    """The Slurm step number; None outside a step or for the batch/extern steps' non-numeric ids."""
    value = env.get("SLURM_STEP_ID", env.get("SLURM_STEPID", ""))
    return int(value) if value.isdigit() else None


def validate(c: ClusterEnv) -> None:
    if c.size < 1:
        raise ClusterError(f"{c.launcher}: world size {c.size} must be >= 1")
    if not 0 <= c.rank < c.size:
        raise ClusterError(f"{c.launcher}: rank {c.rank} is outside 0..{c.size - 1} (world size {c.size})")
    if not 1 <= c.local_size <= c.size:
        raise ClusterError(f"{c.launcher}: local size {c.local_size} must be in 1..{c.size} (world size)")
    if not 0 <= c.local_rank < c.local_size:
        raise ClusterError(f"{c.launcher}: local rank {c.local_rank} is outside 0..{c.local_size - 1} "
                           f"(local size {c.local_size})")
    if c.node_rank < 0:
        raise ClusterError(f"{c.launcher}: node rank {c.node_rank} must be >= 0")


def threads_per_rank(cluster: ClusterEnv, cores: int | None = None, env: Mapping[str, str] | None = None) -> int:
    """Cores on this node shared by the ranks on it; an explicit OMP_NUM_THREADS or Slurm's
    --cpus-per-task wins (the user or the scheduler knows the binding)."""
    env = os.environ if env is None else env
    explicit = _int(env, "OMP_NUM_THREADS") or _int(env, "SLURM_CPUS_PER_TASK")
    if explicit:
        return explicit
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        # An MPI launcher may have bound each rank to a core already: that affinity *is* our share.
        if cores <= max(1, (os.cpu_count() or 1) // cluster.local_size):
            return max(1, cores)
    return max(1, cores // cluster.local_size)


def visible_gpu_index(cluster: ClusterEnv, num_gpus: int) -> int | None:
    """GPU this rank should use: one rank per GPU, by local rank. None without GPUs."""
    if num_gpus <= 0:
        return None
    if cluster.local_size > num_gpus:
        raise ClusterError(f"{cluster.local_size} ranks on this node but only {num_gpus} GPU(s) visible; "
                           "launch one rank per GPU or use --device cpu")
    return cluster.local_rank % num_gpus
