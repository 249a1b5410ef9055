"""Process set-up for the TensorFlow engine: one GPU per local rank (memory growth) or the rank's share
of the CPU cores, mixed precision policy, seeds, backend."""
from __future__ import annotations

from hpctrain import quiet, watchdog
from hpctrain.choices import STRATEGY_BACKENDS
from hpctrain.cluster import ClusterEnv, visible_gpu_index
from hpctrain.engine.runtime import Runtime, check_devices, set_library_environment, single_process_only, threads


def setup(cfg, cluster: ClusterEnv) -> Runtime:
    import keras
    import tensorflow as tf

    d = cfg.dist
    with quiet.captured():  # the first device query logs "failed call to cuInit" on every machine without a GPU
        found = tf.config.list_physical_devices("GPU") if d.device != "cpu" else []
    gpus, device = use_devices(tf, cfg, cluster, found)
    check_devices(cfg, len(found), on_gpu=bool(gpus))
    n = threads(cfg, cluster)
    tf.config.threading.set_intra_op_parallelism_threads(n)  # ranks sharing a node split its cores
    tf.config.threading.set_inter_op_parallelism_threads(min(2, n))
    if d.amp != "none":
        keras.mixed_precision.set_global_policy({"bf16": "mixed_bfloat16", "fp16": "mixed_float16"}[d.amp])
    keras.utils.set_random_seed(cfg.run.seed)
    if cfg.run.deterministic:
        tf.config.experimental.enable_op_determinism()
    set_library_environment(cfg)
    with watchdog.collective(f"{d.backend} start-up"):  # Horovod init / the strategy's cluster: every rank
        backend = build_backend(d, cluster, gpus)
    return Runtime(cluster, device, n, backend, backend.data_rank, backend.data_size,
                   local_replicas=backend.local_replicas)


def use_devices(tf, cfg, cluster: ClusterEnv, found: list) -> tuple[list, str]:
    """(the GPUs this process trains on, the device for the start line): all of the node's GPUs for a
    tf.distribute process alone on its node, else one GPU by local rank, else the CPU (or --cpu-devices logical
    CPUs for mirrored). Must run before TensorFlow's runtime starts."""
    d = cfg.dist
    if d.backend in STRATEGY_BACKENDS and found and cluster.local_size == 1:
        for g in found:
            tf.config.experimental.set_memory_growth(g, True)
        return found, f"{len(found)} x GPU"
    gpu = visible_gpu_index(cluster, len(found))
    if gpu is not None:  # one GPU per rank, chosen by local rank; grow memory instead of taking it all
        tf.config.set_visible_devices(found[gpu], "GPU")
        tf.config.experimental.set_memory_growth(found[gpu], True)
        return [found[gpu]], "GPU:0"
    tf.config.set_visible_devices([], "GPU")
    if d.backend == "mirrored" and d.cpu_devices > 1:
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * d.cpu_devices)
        return [], f"{d.cpu_devices} x CPU"
    return [], "CPU:0"


def build_backend(cfg, cluster, gpus: list):
    """The backend --backend names (config.py checked it is one of the TF engine's)."""
    from hpctrain.engine.tf.backends import HorovodBackend, LocalBackend
    if cfg.backend in STRATEGY_BACKENDS:
        from hpctrain.engine.tf.strategies import MirroredBackend, MultiWorkerBackend
        return (MirroredBackend if cfg.backend == "mirrored" else MultiWorkerBackend)(cfg, cluster, gpus)
    if cfg.backend == "horovod":
        return HorovodBackend(cfg, cluster)
    single_process_only(cluster, "tf")
    return LocalBackend(cfg, cluster)
