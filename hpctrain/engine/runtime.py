"""Process set-up every engine shares, framework-neutral: the runtime record, the device and thread rules, the
environment the launchers' libraries read, the launch checks, and the run directory (lock + hpctrain.rundir)."""
from __future__ import annotations

import atexit
import os
from dataclasses import dataclass

from hpctrain import rundir, watchdog
from hpctrain.choices import BACKENDS
from hpctrain.cluster import ClusterEnv, threads_per_rank
from hpctrain.config import ConfigError
from hpctrain.errors import ExitError, UserError, rebuild
from hpctrain.runlock import RunLock


@dataclass
class Runtime:
    cluster: ClusterEnv
    device: object      # torch.device, or a TF device string
    threads: int
    backend: object
    data_rank: int = 0  # this rank's data-parallel replica (its rank, unless pipeline stages share a replica)
    data_size: int = 1  # number of data-parallel replicas (world size / pipeline stages)
    run_lock: RunLock | None = None  # rank 0's lock on run_dir
    local_replicas: int = 1  # replicas this rank feeds (tf.distribute: its devices); the sampler deals it their batches
    opened: rundir.Opened | None = None  # rank 0: the run found in run_dir and the resume mode to apply


class LaunchError(UserError):
    """The job was launched in a way this run cannot use (exit 2: a relaunch would fail the same way)."""


def check_devices(cfg, gpus: int, on_gpu: bool) -> None:
    """The device flags against what this rank sees: `gpus` visible, `on_gpu` whether it trains on one."""
    d = cfg.dist
    if d.device == "cuda" and gpus == 0:
        raise ConfigError("dist.device (--device): 'cuda' requested but no GPU is visible (allowed here: auto, cpu)")
    if d.amp == "fp16" and not on_gpu:
        raise ConfigError("dist.amp (--amp): 'fp16' needs a GPU (allowed on CPU: none, bf16)")


def threads(cfg, cluster: ClusterEnv) -> int:
    """Intra-op threads: --threads, else the node's cores shared by the ranks on it (no oversubscription)."""
    return cfg.dist.threads or threads_per_rank(cluster)


def set_library_environment(cfg) -> None:
    """Horovod's stall inspector and PyTorch's NCCL watchdog in line with the hang watchdog; read at their init,
    so before the backend starts. The user's own settings win."""
    for name, value in watchdog.launcher_defaults(cfg.run.hang_timeout).items():
        os.environ.setdefault(name, value)


def single_process_only(cluster: ClusterEnv, framework: str, backend: str = "none") -> None:
    if cluster.size > 1:
        several = [b for b in BACKENDS[framework] if b not in ("none", "mirrored")]
        raise ConfigError(f"dist.backend (--backend): {backend!r} runs one process, but the launcher started "
                          f"{cluster.size} ranks (allowed with several ranks and --framework {framework}: "
                          f"{', '.join(several)})")


def check_world(rank: int, size: int, cluster: ClusterEnv, who: str) -> None:
    """`who` (Horovod, mpi4py) must see the world the launcher started, or every rank trains alone."""
    if (rank, size) != (cluster.rank, cluster.size):
        raise LaunchError(f"{who} sees rank {rank} of {size} but the launcher says {cluster.rank} of {cluster.size} "
                          f"({cluster.launcher}): {who} is built against another MPI than the launcher's "
                          "(`python -m hpctrain.doctor` under the same launcher names both)")


def open_run_dir(recipe, cfg, rt: Runtime) -> None:
    """Rank 0 takes run_dir's lock for the run's lifetime (released by close, at exit on an error, or found
    stale after a crash) and applies the run-directory rules (hpctrain.rundir) before anything is written;
    every rank learns the verdict, so a refused run stops whole."""
    error = None
    if rt.cluster.rank == 0:
        r, c = cfg.run, rt.cluster
        try:
            rt.run_lock = RunLock(r.run_dir, job_id=c.job_id, restart=c.restart_count, step=c.step_id).acquire()
            atexit.register(rt.run_lock.release)
            rt.opened = rundir.open_run(r.run_dir, recipe.identity(cfg), r.resume, r.new_run, c.job_id, log=print)
        except ExitError as e:
            error = (e.exit_code, str(e))
    with watchdog.collective("the run directory's verdict"):
        error = rt.backend.broadcast_object(error)
    if error:
        raise rebuild(*error)
