"""ZeRO stage 1 (Rajbhandari et al., SC20): the optimizer state sharded over the data-parallel ranks; each rank
updates the parameters it owns, then every rank gets every parameter back.

    ddp            `TorchZero`: torch's ZeroRedundancyOptimizer (gradients allreduced by DDP; each rank steps its
                   share of the parameters, which it then broadcasts)
    horovod, mpi   `Zero` with `ShardedOptimizer`: one reduce-scatter of the flat gradient (this rank keeps the mean
                   of its contiguous share), the wrapped optimizer's step on that share, one allgather of the flat
                   parameters (Horovod: hvd.reducescatter + hvd.allgather; mpi: Reduce_scatter + Allgatherv, the
                   latter in place)

SGD and AdamW update each element on its own, so the sharded update equals the unsharded one. Checkpoints hold the
optimizer state consolidated into the unsharded optimizer's state_dict format (rank 0 writes it), so a ZeRO run
resumes on any world size, or without ZeRO, and the other way round."""
from __future__ import annotations

import contextlib
import inspect

import torch
from torch.distributed.optim import ZeroRedundancyOptimizer

from hpctrain.config import ConfigError
from hpctrain.engine.torch.backends.base import nbytes, plain_step, split_counts
from hpctrain.engine.torch.sync.base import Sync

ELEMENTWISE = "<per element>"  # the marker of a state entry shaped like its parameter


def elementwise(value) -> bool:
    return isinstance(value, str) and value == ELEMENTWISE


def hyper(group: dict) -> dict:
    return {k: v for k, v in group.items() if k != "params"}


def constructor_defaults(optimizer) -> dict:
    """The optimizer's defaults its constructor takes (AdamW's defaults hold Adam's decoupled_weight_decay, which
    AdamW's constructor does not take; the groups carry it)."""
    takes = inspect.signature(type(optimizer)).parameters
    return {k: v for k, v in optimizer.defaults.items() if k in takes}


class ShardedOptimizer:
    """ZeRO-1 over a backend's reduce-scatter and allgather. The model's parameters and their gradients become views
    of one flat buffer each; this rank owns elements [lo, hi) (split as Horovod splits a reduce-scatter), and the
    wrapped optimizer type steps views of the parameter buffer over that range, one per parameter it meets (so the
    per-parameter rules hold: a parameter without a gradient is skipped, Adam's step counts are per parameter).
    `param_groups` are the local optimizer's: learning-rate updates and an AMP loss scaler reach it."""

    def __init__(self, optimizer: torch.optim.Optimizer, backend, split=None):
        """`split(total) -> counts`: the elements each rank owns (default: Horovod's even split over every rank)."""
        self.backend, self.groups = backend, optimizer.param_groups
        self.params = [p for g in self.groups for p in g["params"]]
        if len({(p.dtype, p.device) for p in self.params}) != 1:
            raise ConfigError("sync.zero (--zero): the parameters differ in dtype or device; the sharded optimizer "
                              "needs one flat buffer (allowed: --zero off)")
        self.offsets, total = [], 0
        for p in self.params:
            self.offsets.append(total)
            total += p.numel()
        first = self.params[0]
        self.flat = torch.empty(total, dtype=first.dtype, device=first.device)
        self.grads = torch.zeros_like(self.flat)
        for p, at in zip(self.params, self.offsets):
            self.flat[at:at + p.numel()].copy_(p.detach().reshape(-1))
            p.data = self.flat[at:at + p.numel()].view_as(p)
        self.counts = split(total) if split else split_counts(total, backend.size)
        self.lo = sum(self.counts[:backend.rank])
        self.hi = self.lo + self.counts[backend.rank]
        self.local = type(optimizer)(self._local_groups(), **constructor_defaults(optimizer))
        self.param_groups = self.local.param_groups
        self.touched: set[int] = set()  # parameters that received a gradient in this step's backward passes
        for i, p in enumerate(self.params):
            p.register_post_accumulate_grad_hook(lambda _p, i=i: self.touched.add(i))
        self.zero_grad()

    def _local_groups(self) -> list[dict]:
        """One group per group of the wrapped optimizer (its hyperparameters), holding this rank's views."""
        self.pieces = []  # (parameter index, start within it, the view, start within this rank's range)
        groups, i = [], 0
        for g in self.groups:
            views = []
            for p in g["params"]:
                a, b = max(self.offsets[i], self.lo), min(self.offsets[i] + p.numel(), self.hi)
                if a < b:
                    views.append(self.flat[a:b])
                    self.pieces.append((i, a - self.offsets[i], views[-1], a - self.lo))
                i += 1
            groups.append({**hyper(g), "params": views})
        return groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.grads.zero_()
        for p, at in zip(self.params, self.offsets):
            p.grad = self.grads[at:at + p.numel()].view_as(p)  # backward accumulates into the flat buffer
        for _, _, view, _ in self.pieces:
            view.grad = None
        self.touched.clear()

    def reduce_gradients(self) -> None:
        """The mean gradient of this rank's range: one reduce-scatter of the flat gradient buffer."""
        mine = self.backend.reduce_scatter(self.grads, self.counts)
        for i, _, view, at in self.pieces:
            view.grad = mine[at:at + view.numel()] if i in self.touched else None

    def poison(self) -> None:
        """Another rank's share held inf/NaN: make the loss scaler skip this step here too."""
        for _, _, view, _ in self.pieces:
            if view.grad is not None:
                view.grad.fill_(float("nan"))

    def step(self, closure=None):
        self.local.step()
        # Every rank's updated range, gathered into the flat parameter buffer (the model's parameters).
        self.backend.allgather(self.flat[self.lo:self.hi], self.counts, out=self.flat)

    def state_bytes(self) -> int:
        return sum(nbytes([v]) for s in self.local.state.values() for v in s.values() if torch.is_tensor(v))

    def consolidated(self) -> dict | None:
        """The unsharded optimizer's state_dict, on rank 0 (None elsewhere); a collective: the per-element entries
        are gathered to rank 0 one state key at a time. Rank 0 holds the whole state while the checkpoint is
        written (the whole-model format); the others never do (on mpi and ddp; Horovod has no gather: its
        allgather hands every rank one entry at a time, dropped at once)."""
        mine = {}
        for i, _, view, _ in self.pieces:
            for k, v in self.local.state.get(view, {}).items():
                mine.setdefault(i, {})[k] = ELEMENTWISE if torch.is_tensor(v) and v.ndim > 0 else v
        with self.backend.traffic.paused():
            described = {}
            for theirs in self.backend.allgather_object(mine):
                for i, entries in theirs.items():
                    described.setdefault(i, {}).update(entries)
            keys = sorted({k for entries in described.values() for k, v in entries.items() if elementwise(v)})
            gathered = {k: self._gather_key(k) for k in keys}
        if self.backend.rank != 0:
            return None
        state = {}
        for i, entries in sorted(described.items()):
            p, at = self.params[i], self.offsets[i]
            state[i] = {k: gathered[k][at:at + p.numel()].view_as(p).clone() if elementwise(v) else v
                        for k, v in entries.items()}
        groups, first = [], 0
        for g, local in zip(self.groups, self.local.param_groups):
            groups.append({**hyper(local), "params": list(range(first, first + len(g["params"])))})
            first += len(g["params"])
        return {"state": state, "param_groups": groups}

    def _gather_key(self, key: str) -> torch.Tensor | None:
        """One state entry of every rank's share, concatenated on rank 0 (rows padded to the largest share)."""
        mine = torch.zeros(max(self.counts), dtype=self.flat.dtype, device=self.flat.device)
        for _, _, view, at in self.pieces:
            v = self.local.state.get(view, {}).get(key)
            if torch.is_tensor(v) and v.ndim > 0:
                mine[at:at + view.numel()] = v.reshape(-1)
        rows = self.backend.gather_rows(mine)
        return None if rows is None else torch.cat([row[:n] for row, n in zip(rows, self.counts)])

    def load_whole(self, whole: dict) -> None:
        """This rank's share of an unsharded optimizer state_dict (every rank calls it with the whole one)."""
        state, local_state, index = whole["state"], {}, {id(v): n for n, (_, _, v, _) in enumerate(self.pieces)}
        for i, start, view, _ in self.pieces:
            entries = state.get(i, state.get(str(i)))
            if entries:
                local_state[index[id(view)]] = {
                    k: v.reshape(-1)[start:start + view.numel()].clone() if torch.is_tensor(v) and v.ndim > 0 else v
                    for k, v in entries.items()}
        if len(whole["param_groups"]) != len(self.local.param_groups):
            raise ConfigError(f"the checkpoint's optimizer has {len(whole['param_groups'])} parameter groups, this one "
                              f"{len(self.local.param_groups)}")
        groups = [{**hyper(saved), "params": [index[id(v)] for v in local["params"]]}
                  for saved, local in zip(whole["param_groups"], self.local.param_groups)]
        self.local.load_state_dict({"state": local_state, "param_groups": groups})
        # load_state_dict replaces the local optimizer's group dicts: point ours at the new ones, or the trainer's
        # per-step learning rate would go to the old dicts and the run go on at the checkpoint's rate
        self.param_groups = self.local.param_groups


class Zero(Sync):
    """ZeRO-1 on horovod and mpi: `ShardedOptimizer` in place of the optimizer."""
    name = "zero"

    def wrap(self, model, optimizer):
        return model, ShardedOptimizer(optimizer, self.backend)

    def accumulation(self, model, last: bool):
        return contextlib.nullcontext()  # gradients stay local until the step's reduce-scatter

    def step(self, model, optimizer, scaler, step: int) -> None:
        optimizer.reduce_gradients()
        if scaler is not None:  # each rank sees its share only: skip the step everywhere if any share is not finite
            bad = [0.0 if all(torch.isfinite(v.grad).all() for _, _, v, _ in optimizer.pieces
                              if v.grad is not None) else 1.0]
            if self.backend.allreduce(torch.tensor(bad, device=optimizer.flat.device), "sum").item():
                optimizer.poison()
        plain_step(optimizer, scaler)

    def optimizer_state(self, optimizer) -> dict | None:
        return optimizer.consolidated()

    def load_optimizer_state(self, optimizer, state: dict) -> None:
        self.loaded = state  # rank 0: every rank takes its share in broadcast()

    def broadcast(self, model, optimizer) -> None:
        """Rank 0's weights to every rank; the whole optimizer state it loaded (if any) too, each rank keeping its
        share."""
        self.backend.broadcast_tensors(self.backend.unwrap(model).state_dict())
        whole = self.backend.broadcast_object(getattr(self, "loaded", None) if self.rank == 0 else None)
        self.loaded = None
        if whole is not None:
            self.load_whole(optimizer, whole)

    def load_whole(self, optimizer, whole: dict) -> None:
        optimizer.load_whole(whole)


class TorchZero(Zero):
    """ddp: torch's ZeroRedundancyOptimizer over the wrapped optimizer's type and parameter groups."""

    def wrap(self, model, optimizer):
        groups = [{**hyper(g), "params": g["params"]} for g in optimizer.param_groups]
        zero = ZeroRedundancyOptimizer(groups, optimizer_class=type(optimizer), **constructor_defaults(optimizer))
        return self.backend.ddp(model), zero

    def accumulation(self, model, last: bool):
        return self.backend.accumulation(model, last)

    def step(self, model, optimizer, scaler, step: int) -> None:
        self.backend.step(optimizer, scaler)  # counts DDP's gradient allreduce
        self.traffic.add(nbytes(p for g in optimizer.optim.param_groups for p in g["params"]))  # the owned ones sent

    def optimizer_state(self, optimizer) -> dict | None:
        with self.traffic.paused():
            optimizer.consolidate_state_dict(to=0)
        return optimizer.state_dict() if self.rank == 0 else None

    def load_whole(self, optimizer, whole: dict) -> None:
        optimizer.load_state_dict(whole)


def state_bytes(optimizer) -> int:
    """Bytes of optimizer-state tensors this rank holds (the sharded ones: its share)."""
    if isinstance(optimizer, ShardedOptimizer):
        return optimizer.state_bytes()
    inner = optimizer.optim if isinstance(optimizer, ZeroRedundancyOptimizer) else optimizer
    return sum(nbytes([v]) for s in inner.state.values() for v in s.values() if torch.is_tensor(v))
