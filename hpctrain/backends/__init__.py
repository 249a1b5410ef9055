"""How gradients are combined across ranks. The trainer talks to this interface only:

    wrap(model, optimizer) -> (model, optimizer)   apply DistributedOptimizer / DDP from outside the model
    broadcast_state(model, optimizer)            rank 0's parameters, buffers and optimizer state to all
    broadcast_object(obj)                        any picklable value from rank 0
    allreduce(tensor, op="mean"|"sum")           across all ranks
    accumulation(model, last)                    context for a backward pass that must not sync yet
    step(optimizer, scaler)                      optimizer step (with AMP loss scaling if given)
    shutdown()
"""
from __future__ import annotations

from hpctrain.cluster import ClusterEnv
from hpctrain.config import ConfigError, DistConfig


def build_backend(cfg: DistConfig, cluster: ClusterEnv, device):
    if cfg.backend == "horovod":
        from hpctrain.backends.horovod import HorovodBackend
        return HorovodBackend(cfg, cluster, device)
    if cfg.backend == "ddp":
        from hpctrain.backends.ddp import DDPBackend
        return DDPBackend(cfg, cluster, device)
    if cfg.backend == "none":
        if cluster.size > 1:
            raise ConfigError(f"dist.backend (--backend): 'none' runs one process, but the launcher started {cluster.size} ranks "
                             "(allowed with several ranks: horovod, ddp)")
        from hpctrain.backends.local import LocalBackend
        return LocalBackend(cfg, cluster, device)
    raise ConfigError(f"dist.backend (--backend): {cfg.backend!r} is not allowed (allowed: horovod, ddp, none)")
