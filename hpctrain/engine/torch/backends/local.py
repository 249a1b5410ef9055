"""Single process: no communication."""
from __future__ import annotations

import torch

from hpctrain.engine.torch.backends.base import Backend


class LocalBackend(Backend):
    name = "none"

    def broadcast_state(self, model, optimizer) -> None:
        pass  # one process: its state is everyone's

    def broadcast_object(self, obj):
        return obj

    def allreduce(self, tensor: torch.Tensor, op: str = "mean") -> torch.Tensor:
        return tensor

    def barrier(self) -> None:
        pass
