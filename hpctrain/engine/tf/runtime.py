"""Process set-up for the TensorFlow engine: one GPU per local rank (memory growth) or the rank's share
of the CPU cores, mixed precision policy, seeds, backend."""
from __future__ import annotations

import os

from hpctrain import quiet, watchdog
from hpctrain.cluster import ClusterEnv, threads_per_rank, visible_gpu_index
from hpctrain.config import ConfigError, TrainConfig
from hpctrain.engine.base import Runtime


def setup(cfg: TrainConfig, cluster: ClusterEnv) -> Runtime:
    import keras
    import tensorflow as tf

    d = cfg.dist
    with quiet.captured():  # the first device query logs "failed call to cuInit" on every machine without a GPU
        gpus = tf.config.list_physical_devices("GPU") if d.device != "cpu" else []
    if d.device == "cuda" and not gpus:
        raise ConfigError("dist.device (--device): 'cuda' requested but no GPU is visible (allowed here: auto, cpu)")
    strategy = d.backend in ("mirrored", "multiworker")
    if strategy and gpus and cluster.local_size == 1:  # one process per node: all its GPUs are its replicas
        for g in gpus:
            tf.config.experimental.set_memory_growth(g, True)
        device = f"{len(gpus)} x GPU"
    else:
        gpu = visible_gpu_index(cluster, len(gpus))
        if gpu is not None:  # one GPU per rank, chosen by local rank; grow memory instead of taking it all
            tf.config.set_visible_devices(gpus[gpu], "GPU")
            tf.config.experimental.set_memory_growth(gpus[gpu], True)
        else:
            tf.config.set_visible_devices([], "GPU")
        gpus = [gpus[gpu]] if gpu is not None else []
        device = "GPU:0" if gpus else "CPU:0"
    if d.backend == "mirrored" and not gpus and d.cpu_devices > 1:  # logical CPUs: before TF's runtime starts
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * d.cpu_devices)
        device = f"{d.cpu_devices} x CPU"
    if d.amp == "fp16" and not gpus:
        raise ConfigError("dist.amp (--amp): 'fp16' needs a GPU (allowed on CPU: none, bf16)")
    threads = d.threads or threads_per_rank(cluster)
    tf.config.threading.set_intra_op_parallelism_threads(threads)  # ranks sharing a node split its cores
    tf.config.threading.set_inter_op_parallelism_threads(min(2, threads))
    if d.amp != "none":
        keras.mixed_precision.set_global_policy({"bf16": "mixed_bfloat16", "fp16": "mixed_float16"}[d.amp])
    keras.utils.set_random_seed(cfg.run.seed)
    if cfg.run.deterministic:
        tf.config.experimental.enable_op_determinism()
    for name, value in watchdog.launcher_defaults(cfg.run.hang_timeout).items():
        os.environ.setdefault(name, value)  # read by Horovod at init; the user's own settings win
    backend = build_backend(d, cluster, gpus)
    rt = Runtime(cluster, device, threads, backend, backend.data_rank, backend.data_size,
                 local_replicas=backend.local_replicas)
    return rt


def build_backend(cfg, cluster, gpus: list):
    """The backend --backend names (here, not in backends.py: the strategies build on backends.py)."""
    from hpctrain.engine.tf.backends import HorovodBackend, LocalBackend
    if cfg.backend in ("mirrored", "multiworker"):
        from hpctrain.engine.tf.strategies import MirroredBackend, MultiWorkerBackend
        return (MirroredBackend if cfg.backend == "mirrored" else MultiWorkerBackend)(cfg, cluster, gpus)
    if cfg.backend == "horovod":
        return HorovodBackend(cfg, cluster)
    if cfg.backend == "none":
        if cluster.size > 1:
            raise ConfigError(f"dist.backend (--backend): 'none' runs one process, but the launcher started "
                              f"{cluster.size} ranks (allowed with several ranks and --framework tf: horovod, multiworker)")
        return LocalBackend(cfg, cluster)
    raise ConfigError(f"dist.backend (--backend): {cfg.backend!r} is not allowed with --framework tf "
                      "(allowed: horovod, multiworker, mirrored, none)")
