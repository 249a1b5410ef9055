"""Backends of the torch engine (the protocol: backends/base.py) and the one factory that builds them."""
from __future__ import annotations

from hpctrain.choices import BACKENDS
from hpctrain.cluster import ClusterEnv
from hpctrain.config import ConfigError, DistConfig
from hpctrain.engine.runtime import single_process_only


def build_backend(cfg: DistConfig, cluster: ClusterEnv, device, pipeline_stages: int = 1):
    """Pipeline stages > 1: the mpi4py grid backend (gradients are combined per stage, see
    engine/torch/pipeline); else the data-parallel backend named by --backend."""
    if pipeline_stages > 1:
        from hpctrain.engine.torch.backends.pipeline import PipelineBackend
        try:
            return PipelineBackend(cfg, cluster, device, pipeline_stages)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    if cfg.backend == "horovod":
        from hpctrain.engine.torch.backends.horovod import HorovodBackend
        return HorovodBackend(cfg, cluster, device)
    if cfg.backend == "mpi":
        from hpctrain.engine.torch.backends.mpi import MPIBackend
        return MPIBackend(cfg, cluster, device)
    if cfg.backend == "ddp":
        from hpctrain.engine.torch.backends.ddp import DDPBackend
        return DDPBackend(cfg, cluster, device)
    if cfg.backend == "none":
        single_process_only(cluster, "torch")
        from hpctrain.engine.torch.backends.local import LocalBackend
        return LocalBackend(cfg, cluster, device)
    raise ConfigError(f"dist.backend (--backend): {cfg.backend!r} is not allowed with the torch engine "
                      f"(allowed: {', '.join(BACKENDS['torch'])})")
