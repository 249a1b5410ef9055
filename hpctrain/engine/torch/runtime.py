"""Process set-up for the torch engine: device by local rank, threads, seed, backend."""
from __future__ import annotations

import torch

from hpctrain import watchdog
from hpctrain.cluster import ClusterEnv, visible_gpu_index
from hpctrain.engine.runtime import Runtime, check_devices, set_library_environment, threads
from hpctrain.engine.torch.backends import build_backend


def setup(cfg, cluster: ClusterEnv) -> Runtime:
    """Pin the device by local rank, size the thread pool, seed, and start the backend."""
    d = cfg.dist
    gpus = torch.cuda.device_count() if d.device != "cpu" else 0
    gpu = visible_gpu_index(cluster, gpus)
    check_devices(cfg, gpus, on_gpu=gpu is not None)
    if gpu is not None:
        torch.cuda.set_device(gpu)  # one GPU per rank, chosen by local rank
    device = torch.device("cuda", gpu) if gpu is not None else torch.device("cpu")
    n = threads(cfg, cluster)
    torch.set_num_threads(n)  # ranks sharing a node split its cores instead of oversubscribing
    torch.manual_seed(cfg.run.seed)
    if cfg.run.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    set_library_environment(cfg)
    with watchdog.collective(f"{d.backend} start-up"):  # MPI/Horovod/torch.distributed init: every rank
        backend = build_backend(d, cluster, device, cfg.pipeline.stages)
    if cfg.sync.strategy == "ps":  # the data goes over the workers only
        from hpctrain.engine.torch.sync.ps import assign_roles
        assign_roles(backend, cfg.sync.ps_servers)
    return Runtime(cluster, device, n, backend, backend.data_rank, backend.data_size)
