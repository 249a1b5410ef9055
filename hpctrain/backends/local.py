"""Single process: no communication. Also the base for the other backends' shared behaviour."""
from __future__ import annotations

import contextlib

import torch


class LocalBackend:
    name = "none"

    def __init__(self, cfg, cluster, device):
        self.cfg, self.cluster, self.device = cfg, cluster, device
        self.rank, self.size = cluster.rank, cluster.size

    def wrap(self, model, optimizer):
        return model, optimizer

    def unwrap(self, model):
        return model

    def broadcast_state(self, model, optimizer) -> None:
        pass

    def broadcast_object(self, obj):
        return obj

    def allreduce(self, tensor: torch.Tensor, op: str = "mean") -> torch.Tensor:
        return tensor

    def accumulation(self, model, last: bool):
        return contextlib.nullcontext()

    def step(self, optimizer, scaler=None) -> None:
        if scaler is None:
            optimizer.step()
        else:
            scaler.step(optimizer)
            scaler.update()

    def barrier(self) -> None:
        pass

    def shutdown(self) -> None:
        pass
