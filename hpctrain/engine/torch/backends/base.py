"""The backend protocol: how one engine combines gradients and talks to the other ranks.

    wrap(model, optimizer) -> (model, optimizer)   apply DistributedOptimizer / DDP from outside the model
    unwrap(model)                                the plain module (for state dicts and exports)
    broadcast_state(model, optimizer)            rank 0's parameters, buffers and optimizer state to all:
                                                 broadcast_tensors (the backend's own) + the optimizer state
    broadcast_object(obj)                        any picklable value from rank 0
    allreduce(tensor, op="mean"|"sum")           across all ranks
    accumulation(model, last)                    context for a backward pass that must not sync yet
    step(optimizer, scaler)                      optimizer step (with AMP loss scaling if given)
    barrier(), shutdown()

The collectives a synchronization strategy asks for (hpctrain/engine/torch/sync), each counted in `traffic` (the
bytes this rank hands to it; hpctrain.metrics.Traffic):

    allreduce_(flat, op)                  in place, one call
    average_(tensors)                     one fused allreduce of many tensors (mean), written back in place
    reduce_scatter(flat, counts) -> mine  the mean, this rank's `counts[rank]` elements (split like Horovod's)
    allgather(mine, counts) -> flat       every rank's part, concatenated (into `out` where given)
    gather_rows(tensor) -> [size x n]     on rank 0 (None elsewhere), for checkpoints: not counted
    allgather_object(obj) -> list

`Backend` holds what every backend shares; the collectives are each backend's own.
"""
from __future__ import annotations

import contextlib

import torch

from hpctrain.metrics import Traffic


class Backend:
    name = "?"
    data_rank: int  # this rank's data-parallel replica and the number of replicas (the world,
    data_size: int  # unless pipeline stages share a replica)

    def __init__(self, cfg, cluster, device):
        self.cfg, self.cluster, self.device = cfg, cluster, device
        self.rank, self.size = cluster.rank, cluster.size
        self.data_rank, self.data_size = cluster.rank, cluster.size
        self.traffic = Traffic()

    def wrap(self, model, optimizer):
        return model, optimizer

    def unwrap(self, model):
        return model

    def accumulation(self, model, last: bool):
        return contextlib.nullcontext()

    def step(self, optimizer, scaler=None) -> None:
        plain_step(optimizer, scaler)

    def broadcast_state(self, model, optimizer) -> None:
        """Every rank starts from rank 0's weights (random init or a checkpoint) and optimizer state."""
        self.broadcast_tensors(self.unwrap(model).state_dict())
        # The optimizer state goes as one object (Horovod's broadcast_optimizer_state takes a dummy step on
        # ranks whose state is empty, which moves weights under weight decay).
        state = self.broadcast_object(optimizer.state_dict() if self.rank == 0 else None)
        if self.rank != 0:
            optimizer.load_state_dict(state)

    def broadcast_tensors(self, tensors: dict) -> None:
        """Rank 0's values of these tensors (a state dict: views of parameters and buffers) into every rank's."""
        raise NotImplementedError

    def broadcast_object(self, obj):
        raise NotImplementedError

    def allreduce(self, tensor, op: str = "mean"):
        raise NotImplementedError

    def barrier(self) -> None:
        raise NotImplementedError

    def shutdown(self) -> None:
        pass

    # ---- the collectives of the synchronization strategies (counted) -------------------------------------
    def allreduce_(self, flat: torch.Tensor, op: str = "mean") -> None:
        raise NotImplementedError(f"the {self.name} backend has no in-place allreduce")

    def average_(self, tensors: list) -> None:
        """The mean over ranks of every tensor, in place, through ONE allreduce of a fused buffer."""
        if not tensors:
            return
        flat = torch.cat([t.detach().reshape(-1).to(tensors[0].dtype) for t in tensors])
        self.allreduce_(flat, "mean")
        offset = 0
        for t in tensors:
            t.detach().copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()

    def reduce_scatter(self, flat: torch.Tensor, counts: list[int]) -> torch.Tensor:
        raise NotImplementedError(f"the {self.name} backend has no reduce-scatter")

    def allgather(self, mine: torch.Tensor, counts: list[int], out: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError(f"the {self.name} backend has no allgather")

    def gather_rows(self, tensor: torch.Tensor) -> torch.Tensor | None:
        raise NotImplementedError(f"the {self.name} backend has no gather")

    def allgather_object(self, obj) -> list:
        raise NotImplementedError(f"the {self.name} backend has no object allgather")


def plain_step(optimizer, scaler=None) -> None:
    """The optimizer step, through the AMP loss scaler if there is one."""
    if scaler is None:
        optimizer.step()
    else:
        scaler.step(optimizer)
        scaler.update()


def split_counts(total: int, size: int) -> list[int]:
    """Elements per rank of a buffer of `total` split over `size` ranks, as Horovod's reducescatter splits it: the
    first total % size ranks one more."""
    base, extra = divmod(total, size)
    return [base + (1 if r < extra else 0) for r in range(size)]


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)
