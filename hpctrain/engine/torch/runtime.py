"""Process set-up for the torch engine: device by local rank, threads, seed, backend, run-dir lock."""
from __future__ import annotations

import atexit
import os
from dataclasses import dataclass

import torch

from hpctrain import watchdog
from hpctrain.cluster import ClusterEnv, threads_per_rank, visible_gpu_index
from hpctrain.config import ConfigError, TrainConfig
from hpctrain.engine.torch.backends import build_backend
from hpctrain.runlock import RunLock, RunLockError


@dataclass
class Runtime:
    cluster: ClusterEnv
    device: torch.device
    threads: int
    backend: object
    data_rank: int = 0  # this rank's data-parallel replica (its rank, unless pipeline stages share a replica)
    data_size: int = 1  # number of data-parallel replicas (world size / pipeline stages)
    run_lock: RunLock | None = None  # rank 0's lock on run_dir


def setup(cfg: TrainConfig, cluster: ClusterEnv) -> Runtime:
    """Pin the device by local rank, size the thread pool, seed, and start the backend."""
    d = cfg.dist
    gpus = torch.cuda.device_count() if d.device != "cpu" else 0
    if d.device == "cuda" and gpus == 0:
        raise ConfigError("dist.device (--device): 'cuda' requested but no GPU is visible (allowed here: auto, cpu)")
    gpu = visible_gpu_index(cluster, gpus)
    if gpu is not None:
        torch.cuda.set_device(gpu)  # one GPU per rank, chosen by local rank
    device = torch.device("cuda", gpu) if gpu is not None else torch.device("cpu")
    if d.amp == "fp16" and device.type != "cuda":
        raise ConfigError("dist.amp (--amp): 'fp16' needs a GPU (allowed on CPU: none, bf16)")
    threads = d.threads or threads_per_rank(cluster)
    torch.set_num_threads(threads)  # ranks sharing a node split its cores instead of oversubscribing
    torch.manual_seed(cfg.run.seed)
    if cfg.run.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    for name, value in watchdog.launcher_defaults(cfg.run.hang_timeout).items():
        os.environ.setdefault(name, value)  # read by Horovod / NCCL at init; the user's own settings win
    backend = build_backend(d, cluster, device, cfg.pipeline.stages)
    rt = Runtime(cluster, device, threads, backend, backend.data_rank, backend.data_size)
    rt.run_lock = lock_run_dir(cfg.run.run_dir, rt)
    return rt


def lock_run_dir(run_dir: str, rt: Runtime) -> RunLock | None:
    """Rank 0 holds run_dir's lock for the run's lifetime (released by Trainer.close, at exit on an
    error, or found stale after a crash); every rank learns the verdict, so a second run into the same
    directory stops whole."""
    lock, error = None, None
    if rt.cluster.rank == 0:
        try:
            lock = RunLock(run_dir, job_id=rt.cluster.job_id, restart=rt.cluster.restart_count,
                           step=rt.cluster.step_id).acquire()
            atexit.register(lock.release)
        except RunLockError as e:
            error = str(e)
    error = rt.backend.broadcast_object(error)
    if error:
        raise RunLockError(error)
    return lock
