"""Process set-up for the torch engine: device by local rank, threads, seed, backend."""
from __future__ import annotations

import os

import torch

from hpctrain import watchdog
from hpctrain.cluster import ClusterEnv, threads_per_rank, visible_gpu_index
from hpctrain.config import ConfigError, TrainConfig
from hpctrain.engine.base import Runtime
from hpctrain.engine.torch.backends import build_backend


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
    return rt
