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

`Backend` holds what every backend shares; the collectives are each backend's own.
"""
from __future__ import annotations

import contextlib


class Backend:
    name = "?"
    data_rank: int  # this rank's data-parallel replica and the number of replicas (the world,
    data_size: int  # unless pipeline stages share a replica)

    def __init__(self, cfg, cluster, device):
        self.cfg, self.cluster, self.device = cfg, cluster, device
        self.rank, self.size = cluster.rank, cluster.size
        self.data_rank, self.data_size = cluster.rank, cluster.size

    def wrap(self, model, optimizer):
        return model, optimizer

    def unwrap(self, model):
        return model

    def accumulation(self, model, last: bool):
        return contextlib.nullcontext()

    def step(self, optimizer, scaler=None) -> None:
        if scaler is None:
            optimizer.step()
        else:
            scaler.step(optimizer)
            scaler.update()

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
