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

    # One rank: every collective of the strategies is the identity (nothing is sent, nothing counted).
    def allreduce_(self, flat: torch.Tensor, op: str = "mean") -> None:
        pass

    def reduce_scatter(self, flat: torch.Tensor, counts: list[int]) -> torch.Tensor:
        return flat.clone()

    def allgather(self, mine: torch.Tensor, counts: list[int], out: torch.Tensor | None = None) -> torch.Tensor:
        return mine.clone() if out is None else out.copy_(mine)

    def gather_rows(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.reshape(1, -1).clone()

    def allgather_object(self, obj) -> list:
        return [obj]
