"""Horovod: ring-allreduce over MPI (or Gloo under horovodrun --gloo), hooked into the optimizer."""
from __future__ import annotations

import horovod.torch as hvd
import torch

from hpctrain.engine.horovod import ObjectBroadcast, start_horovod
from hpctrain.engine.torch.backends.base import Backend


class HorovodBackend(Backend):
    name = "horovod"

    def __init__(self, cfg, cluster, device):
        super().__init__(cfg, cluster, device)
        start_horovod(hvd, cfg, cluster, on_gpu=device.type == "cuda")
        self.broadcast_object = ObjectBroadcast(hvd)

    def wrap(self, model, optimizer):
        # Horovod: gradients are allreduced by hooks as backward produces them, overlapping compute.
        optimizer = hvd.DistributedOptimizer(
            optimizer, named_parameters=model.named_parameters(),
            compression=hvd.Compression.fp16 if self.cfg.fp16_allreduce else hvd.Compression.none,
            op=hvd.Adasum if self.cfg.adasum else hvd.Average,
            backward_passes_per_step=self.cfg.accumulate)
        return model, optimizer

    def broadcast_tensors(self, tensors: dict) -> None:
        hvd.broadcast_parameters(tensors, root_rank=0)

    def allreduce(self, tensor: torch.Tensor, op: str = "mean") -> torch.Tensor:
        return hvd.allreduce(tensor, op=hvd.Average if op == "mean" else hvd.Sum)

    def step(self, optimizer, scaler=None) -> None:
        if scaler is None:
            optimizer.step()
            return
        # Horovod + loss scaling: finish the allreduce before unscaling, then step without re-syncing.
        optimizer.synchronize()
        scaler.unscale_(optimizer)
        with optimizer.skip_synchronize():
            scaler.step(optimizer)
        scaler.update()

    def barrier(self) -> None:
        hvd.barrier()

    def shutdown(self) -> None:
        hvd.shutdown()
