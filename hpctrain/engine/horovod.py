"""Horovod, the same way for both frameworks (`hvd` is horovod.torch or horovod.tensorflow): start-up and the
object broadcast. Framework-neutral: the caller hands in the module."""
from __future__ import annotations

import os

from hpctrain.cluster import ClusterEnv
from hpctrain.engine.runtime import check_world


def start_horovod(hvd, cfg, cluster: ClusterEnv, on_gpu: bool) -> None:
    """hvd.init() with hpctrain's cycle time, and a check that Horovod sees the launcher's world. Horovod reads
    its tuning from the environment at init. Measured on 2 CPU cores, 2 ranks: cycle 1 ms (default) 39
    img/s/rank, 5 ms 80, 10 ms 78, 20 ms 89 (ResNet-18, 32 px). An explicit --hvd-cycle-time-ms wins; else a
    value set by the user/horovodrun; else ours on CPU."""
    if cfg.hvd_cycle_time_ms:
        os.environ["HOROVOD_CYCLE_TIME"] = str(cfg.hvd_cycle_time_ms)
    elif not on_gpu:
        os.environ.setdefault("HOROVOD_CYCLE_TIME", "10")
    hvd.init()
    check_world(hvd.rank(), hvd.size(), cluster, "Horovod")


class ObjectBroadcast:
    """Rank 0's picklable value to every rank. Horovod names the collective after type(obj) unless told: None on
    the receivers and a dict on rank 0 would never match (deadlock). A per-call counter keeps names equal on
    every rank and unique."""

    def __init__(self, hvd):
        self.hvd, self.calls = hvd, 0

    def __call__(self, obj):
        self.calls += 1
        return self.hvd.broadcast_object(obj, root_rank=0, name=f"hpctrain.object.{self.calls}")
