"""What every synchronization strategy of the torch engine does, and the default one: allreduce.

A strategy (hpctrain.sync) decides WHAT crosses the network and WHEN; the backend (engine/torch/backends) moves the
bytes and counts them. The data-parallel step plan (engine/torch/data_parallel.py) drives a strategy through:

    wrap(model, optimizer) -> (model, optimizer)   before training: hooks, wrappers, a sharded optimizer
    begin(step)                                    a step starts (0-based index): torch's hook states follow it
    accumulation(model, last)                      context of one backward pass
    step(model, optimizer, scaler, step)           combine what must be combined, update the weights
    settle(model, optimizer, scaler) -> bool       before a save or an evaluation: every rank the same model
                                                   (True: buffers included); a collective
    optimizer_state(optimizer) -> dict | None      the whole-model optimizer state on rank 0; a collective
    load_optimizer_state(optimizer, state)         rank 0, from a whole-model state
    broadcast(model, optimizer)                    rank 0's weights and optimizer state (and its own) to all
    state() -> dict | None, load_state(state, world_size, log)   what the strategy itself keeps in a checkpoint
"""
from __future__ import annotations

from hpctrain.sync import Policy


class Sync:
    """Every gradient, every step, the backend's own way: Horovod's DistributedOptimizer (hooks, fusion), DDP's
    buckets, or one fused mpi4py Allreduce."""
    name = "allreduce"
    serves = False  # a parameter server's server rank: trains on no data (ps.py)

    def __init__(self, backend, policy: Policy):
        self.backend, self.policy = backend, policy

    @property
    def rank(self) -> int:
        return self.backend.rank

    @property
    def traffic(self):
        return self.backend.traffic

    def wrap(self, model, optimizer):
        return self.backend.wrap(model, optimizer)

    def begin(self, step: int) -> None:
        pass

    def accumulation(self, model, last: bool):
        return self.backend.accumulation(model, last)

    def step(self, model, optimizer, scaler, step: int) -> None:
        self.backend.step(optimizer, scaler)

    def settle(self, model, optimizer, scaler) -> bool:
        return False  # every rank already holds the same weights and optimizer state

    def optimizer_state(self, optimizer) -> dict | None:
        return optimizer.state_dict() if self.rank == 0 else None

    def load_optimizer_state(self, optimizer, state: dict) -> None:
        optimizer.load_state_dict(state)

    def broadcast(self, model, optimizer) -> None:
        self.backend.broadcast_state(model, optimizer)

    def state(self) -> dict | None:
        return None

    def load_state(self, state: dict | None, world_size: int | None, log) -> None:
        pass


def gradients(optimizer) -> list:
    return [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]


def optimizer_tensors(optimizer) -> list:
    """The optimizer's per-element state (momentum, Adam's moments); not the step counts, equal on every rank."""
    return [v for state in optimizer.state.values() for v in state.values()
            if hasattr(v, "is_floating_point") and v.is_floating_point() and v.ndim > 0]


def model_tensors(model) -> list:
    """Parameters and floating-point buffers (BatchNorm's running statistics; not its step counter)."""
    return [*model.parameters(), *(b for b in model.buffers() if b.is_floating_point())]


def same_loss_scale(backend, scaler) -> None:
    """Every rank takes rank 0's AMP loss scale (what a checkpoint keeps), e.g. after ranks stepped alone."""
    if scaler is not None:
        scaler.load_state_dict(backend.broadcast_object(scaler.state_dict() if backend.rank == 0 else None))

