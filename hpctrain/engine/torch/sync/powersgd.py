"""PowerSGD (Vogels et al., NeurIPS 2019): each n x m gradient matrix crosses the network as rank-r factors P (n x r)
and Q (m x r), one power iteration per step; what compression leaves out is added to the next step's gradient
(error feedback); each step's iteration starts from the last Q (warm start). Plain allreduce for the first
`powersgd_start` steps.

    ddp            `TorchPowerSGD`: torch's own powerSGD_hook and PowerSGDState
    horovod, mpi   `PowerSGD`: the same algorithm (`Core`, written after torch's hook: the same split of tensors into
                   compressed and sent whole, the same Q initialisation for the same seed, Gram-Schmidt for r <= 2 and
                   QR above, the same error feedback) over the backend's allreduce: one call for the tensors sent
                   whole, one for every P, one for every Q. All gradients form one bucket, in the order backward
                   produces them (the parameters reversed), as DDP's single bucket after its rebuild.

Checkpoints keep the strategy's state per parameter name, so it does not depend on bucket layouts: every rank's
error-feedback residual (restored where the world size is the same; else it starts at zero) and the warm-start Q
(the same on every rank), and the seed generator."""
from __future__ import annotations

import contextlib
import math

import numpy as np
import torch
from torch.distributed.algorithms.ddp_comm_hooks.powerSGD_hook import PowerSGDState, powerSGD_hook

from hpctrain.engine.torch.backends.base import nbytes, plain_step
from hpctrain.engine.torch.sync.base import Sync

MIN_COMPRESSION_RATE = 2  # torch's default: compress a matrix only where it at least halves what is sent


def layout(shapes, rank: int, min_rate: float = MIN_COMPRESSION_RATE):
    """torch's split of one bucket's tensors (given in bucket order): (indices sent whole, compressed ones as (index,
    n, m, r) in the order the hook lays out their P and Q: grouped by matrix shape, first shape first)."""
    whole, groups = [], {}
    for i, shape in enumerate(shapes):
        n = shape[0]
        m = math.prod(shape[1:])
        r = min(n, m, rank)
        if (n + m) * r * min_rate < n * m:
            groups.setdefault((n, m), []).append((i, n, m, r))
        else:
            whole.append(i)
    return whole, [entry for group in groups.values() for entry in group]


def orthogonalize(matrices: torch.Tensor, epsilon: float = 0.0) -> None:
    """Orthonormal columns for a batch of n x r matrices, in place, as torch's hook does it: Gram-Schmidt up to rank 2
    (and in half precision), QR above."""
    rank = matrices.shape[2]
    if rank > 2 and matrices.dtype not in (torch.float16, torch.bfloat16):
        matrices.copy_(torch.linalg.qr(matrices).Q)
        return
    for i in range(rank):
        col = matrices[:, :, i:i + 1]
        col /= torch.norm(col, dim=1, keepdim=True) + epsilon
        if i + 1 < rank:
            rest = matrices[:, :, i + 1:]
            rest -= torch.sum(col * rest, dim=1, keepdim=True) * col


class Core:
    """One bucket's PowerSGD over `allreduce_(flat, op)` (in place, "sum" or "mean"); the state torch's PowerSGDState
    holds for it: the residual, the P and Q memories, the seed generator."""

    def __init__(self, rank: int, error_feedback: bool, warm_start: bool, seed: int = 0,
                 min_rate: float = MIN_COMPRESSION_RATE):
        self.rank, self.error_feedback, self.warm_start, self.min_rate = rank, error_feedback, warm_start, min_rate
        self.rng = np.random.RandomState(seed)
        self.error = self.p = self.q = None

    def reduce(self, buffer: torch.Tensor, shapes, allreduce_) -> None:
        """Replace the flat `buffer` (this rank's gradients, `shapes` in order) by the decompressed average."""
        if self.error_feedback:
            if self.error is None:
                self.error = torch.zeros_like(buffer)
            buffer.add_(self.error)
            before = buffer.clone()
        tensors, offset = [], 0
        for shape in shapes:
            n = math.prod(shape)
            tensors.append(buffer[offset:offset + n].view(shape))
            offset += n
        whole, compressed = layout(shapes, self.rank, self.min_rate)
        mats, ps, qs = self._factors(tensors, compressed, buffer)
        for m, q, p in zip(mats, qs, ps):
            torch.bmm(m, q, out=p)
        if whole:  # the tensors not worth compressing: one allreduce
            sent_whole = torch.cat([tensors[i].reshape(-1) for i in whole])
            allreduce_(sent_whole, "mean")
            offset = 0
            for i in whole:
                tensors[i].copy_(sent_whole[offset:offset + tensors[i].numel()].view_as(tensors[i]))
                offset += tensors[i].numel()
        if compressed:
            self._power_iteration(mats, ps, qs, allreduce_)
        if self.error_feedback:
            self.error = before - buffer
        if not self.warm_start:
            self.p = self.q = None

    def _power_iteration(self, mats, ps, qs, allreduce_) -> None:
        """P = M Q summed over ranks, orthogonalized; Q = M^T P averaged; M ~ P Q^T. One allreduce for every P, one
        for every Q."""
        allreduce_(self.p, "sum")  # no division: P is orthogonalized next
        for p in ps:
            orthogonalize(p)
        for m, p, q in zip(mats, ps, qs):
            torch.bmm(m.transpose(1, 2), p, out=q)
        allreduce_(self.q, "mean")
        for p, q, m in zip(ps, qs, mats):
            torch.bmm(p, q.transpose(1, 2), out=m)

    def _factors(self, tensors, compressed, buffer):
        """The matrices to compress (views into the buffer) and their P and Q (views into the two memories); Q drawn
        and orthogonalized as torch does (a fresh seed from the generator each time it is drawn) unless warm."""
        fresh = not self.warm_start or self.p is None
        if fresh:
            self.p = buffer.new_empty(sum(n * r for _, n, _, r in compressed))
            self.q = buffer.new_empty(sum(m * r for _, _, m, r in compressed))
        mats, ps, qs, pi, qi = [], [], [], 0, 0
        for i, n, m, r in compressed:
            mats.append(tensors[i].view(1, n, m))
            ps.append(self.p[pi:pi + n * r].view(1, n, r))
            qs.append(self.q[qi:qi + m * r].view(1, m, r))
            pi, qi = pi + n * r, qi + m * r
        if not fresh:
            for q in qs:
                orthogonalize(q)
            return mats, ps, qs
        with torch.random.fork_rng(devices=[]):  # the same draw on every rank, the global generator untouched
            torch.manual_seed(self.rng.randint(1_000_000_000))
            for q in qs:
                q.copy_(torch.randn(*q.shape, device="cpu", dtype=buffer.dtype))
                orthogonalize(q)
        return mats, ps, qs


# ---- the strategy's checkpoint state, per parameter name ----------------------------------------------------
def rng_state(rng: np.random.RandomState) -> dict:
    kind, keys, pos, has_gauss, gauss = rng.get_state()
    return {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
            "gauss": float(gauss)}


def set_rng_state(rng: np.random.RandomState, saved: dict) -> None:
    rng.set_state(("MT19937", saved["keys"].numpy().astype(np.uint32), saved["pos"], saved["has_gauss"],
                   saved["gauss"]))


def split_error(flat, names, shapes) -> dict:
    out, offset = {}, 0
    for name, shape in zip(names, shapes):
        n = math.prod(shape)
        out[name] = flat[offset:offset + n].view(shape).clone()
        offset += n
    return out


def split_q(flat, names, shapes, rank: int, min_rate: float) -> dict:
    out, offset = {}, 0
    for i, _, m, r in layout(shapes, rank, min_rate)[1]:
        out[names[i]] = flat[offset:offset + m * r].view(m, r).clone()
        offset += m * r
    return out


def join_error(errors: dict, names, shapes, like) -> torch.Tensor | None:
    if not all(n in errors for n in names):
        return None
    return torch.cat([errors[n].reshape(-1) for n in names]).to(like)


def join_q(qs: dict, names, shapes, rank: int, min_rate: float, like) -> torch.Tensor | None:
    compressed = layout(shapes, rank, min_rate)[1]
    if not compressed or not all(names[i] in qs for i, *_ in compressed):
        return None
    return torch.cat([qs[names[i]].reshape(-1) for i, *_ in compressed]).to(like)


class PowerSGD(Sync):
    """Horovod and mpi: the gradients of one step as one bucket through `Core` and the backend's allreduce."""
    name = "powersgd"

    def __init__(self, backend, policy, seed: int = 0, min_rate: float = MIN_COMPRESSION_RATE):
        super().__init__(backend, policy)
        self.core = Core(policy.powersgd_rank, policy.error_feedback, policy.warm_start, seed, min_rate)
        self.bucket = None  # (names, shapes) of the last step's gradients
        self.pending = {"error": {}, "q": {}}  # restored per-name state not yet placed in a bucket

    def wrap(self, model, optimizer):
        self.names = {id(p): name for name, p in model.named_parameters()}
        return model, optimizer

    def accumulation(self, model, last: bool):
        return contextlib.nullcontext()  # nothing hooks the backward pass: step() sends the gradients

    def step(self, model, optimizer, scaler, step: int) -> None:
        params = [p for p in reversed(list(model.parameters())) if p.grad is not None]
        grads = [p.grad for p in params]
        if grads:
            buffer = torch.cat([g.reshape(-1) for g in grads])
            if step < self.policy.powersgd_start:
                self.backend.allreduce_(buffer, "mean")
            else:
                self._place([self.names[id(p)] for p in params], [tuple(g.shape) for g in grads], buffer)
                self.core.reduce(buffer, self.bucket[1], self.backend.allreduce_)
            offset = 0
            for g in grads:
                g.copy_(buffer[offset:offset + g.numel()].view_as(g))
                offset += g.numel()
        plain_step(optimizer, scaler)

    def _place(self, names, shapes, like) -> None:
        """This step's bucket; where it differs from the last one, the state moves through its per-name form."""
        if self.bucket is not None and self.bucket[0] == names:
            return
        if self.bucket is not None:
            self._lift()
        self.bucket = (names, shapes)
        core = self.core
        core.error = join_error(self.pending["error"], names, shapes, like)
        core.q = join_q(self.pending["q"], names, shapes, core.rank, core.min_rate, like)
        core.p = like.new_empty(sum(n * r for _, n, _, r in layout(shapes, core.rank, core.min_rate)[1])) \
            if core.q is not None else None
        self.pending = {"error": {}, "q": {}}

    def _lift(self) -> None:
        """The core's state into its per-name form (pending)."""
        names, shapes = self.bucket
        if self.core.error is not None:
            self.pending["error"].update(split_error(self.core.error, names, shapes))
        if self.core.q is not None:
            self.pending["q"].update(split_q(self.core.q, names, shapes, self.core.rank, self.core.min_rate))
        self.core.error = self.core.p = self.core.q = None

    def per_name(self) -> dict:
        if self.bucket is not None:
            self._lift()
            self.bucket = None
        return self.pending

    def state(self) -> dict | None:
        """Every rank's residual (gathered to rank 0, row per rank), rank 0's Q and seed generator; a collective."""
        mine = self.per_name()
        names = sorted(mine["error"])
        with self.traffic.paused():
            rows = self.backend.gather_rows(torch.cat([mine["error"][n].reshape(-1) for n in names])) \
                if names else None
        if self.rank != 0:
            return None
        errors = []
        if rows is not None:
            shapes = [tuple(mine["error"][n].shape) for n in names]
            errors = [split_error(row, names, shapes) for row in rows]
        return {"strategy": self.name, "errors": errors, "q": mine["q"], "rng": rng_state(self.core.rng)}

    def load_state(self, state, world_size, log) -> None:
        self.restored = restorable(state, world_size, self.backend.size, log)

    def broadcast(self, model, optimizer) -> None:
        super().broadcast(model, optimizer)
        restored = self.backend.broadcast_object(getattr(self, "restored", None) if self.rank == 0 else None)
        self.restored = None
        if restored is not None:
            errors = restored["errors"]
            self.pending = {"error": errors[self.rank] if errors else {}, "q": restored["q"]}
            self.bucket = None
            set_rng_state(self.core.rng, restored["rng"])


def restorable(state, world_size, size: int, log) -> dict | None:
    """The PowerSGD part of a checkpoint as this run can use it (rank 0): residuals only from the same world size."""
    if not state or state.get("strategy") != "powersgd":
        return None
    if state["errors"] and len(state["errors"]) != size:
        log(f"note: PowerSGD's error feedback was kept for {len(state['errors'])} rank(s), now {size}: it restarts at "
            "zero (the warm-start Q is kept)")
        state = {**state, "errors": []}
    return state


class TorchPowerSGD(PowerSGD):
    """ddp: torch's powerSGD_hook on DDP's buckets (one bucket on CPU). A wrapper around the hook counts what it
    hands to the allreduce (torch's own count of the elements after compression) and keeps the state in its
    per-name form across DDP's bucket rebuild and a resume (torch's state is per bucket index, and the buckets are
    laid out again after the first step of every process)."""

    def wrap(self, model, optimizer):
        self.names = {id(p): name for name, p in model.named_parameters()}
        options = {}
        if self.backend.device.type == "cpu":
            # gloo runs the hook's chained allreduces (the P's, then the Q's) from its completion callbacks, whose
            # order across several buckets differs between ranks: a collective mismatch (seen with ResNet-18).
            # One bucket on CPU, as the horovod and mpi PowerSGD send it.
            options["bucket_cap_mb"] = sum(q.numel() * q.element_size() for q in model.parameters()) // 2**20 + 1
        model = self.backend.ddp(model, **options)
        p = self.policy
        self.hook_state = PowerSGDState(process_group=None, matrix_approximation_rank=p.powersgd_rank,
                                        start_powerSGD_iter=p.powersgd_start, min_compression_rate=MIN_COMPRESSION_RATE,
                                        use_error_feedback=p.error_feedback, warm_start=p.warm_start,
                                        random_seed=0)
        self.core.rng = self.hook_state.rng  # one seed generator: torch's, kept and restored through ours
        self.buckets = {}  # bucket index -> (names, shapes) as last seen
        model.register_comm_hook(self.hook_state, self.hook)
        return model, optimizer

    def begin(self, step: int) -> None:
        self.hook_state.iter = step

    def accumulation(self, model, last: bool):
        return self.backend.accumulation(model, last)

    def step(self, model, optimizer, scaler, step: int) -> None:
        plain_step(optimizer, scaler)

    def hook(self, state, bucket):
        b = bucket.index()
        seen = ([self.names[id(p)] for p in bucket.parameters()], [tuple(p.shape) for p in bucket.parameters()])
        if self.buckets.get(b, (None,))[0] != seen[0]:  # a new layout (the first step, DDP's rebuild, a resume)
            self._lift()
            self.buckets = {b: seen}  # every other bucket is placed again from the per-name form at its next call
            self._install(b, bucket.buffer())
        if state.iter < state.start_powerSGD_iter:
            self.traffic.add(nbytes([bucket.buffer()]))
            return powerSGD_hook(state, bucket)
        before = state.total_numel_after_compression
        future = powerSGD_hook(state, bucket)
        self.traffic.add((state.total_numel_after_compression - before) * bucket.buffer().element_size())
        return future

    def _lift(self) -> None:
        """Every bucket's state into the per-name form, by the layouts it was made with."""
        s = self.hook_state
        for b, (names, shapes) in self.buckets.items():
            if b in s.error_dict:
                self.pending["error"].update(split_error(s.error_dict.pop(b), names, shapes))
            if b in s.q_memory_dict:
                self.pending["q"].update(split_q(s.q_memory_dict.pop(b), names, shapes, s.matrix_approximation_rank,
                                                 s.min_compression_rate))
            s.p_memory_dict.pop(b, None)

    def _install(self, b: int, like) -> None:
        """The per-name state of this bucket's parameters into torch's state for bucket index b."""
        s, (names, shapes) = self.hook_state, self.buckets[b]
        error = join_error(self.pending["error"], names, shapes, like)
        if error is not None:
            s.error_dict[b] = error
        q = join_q(self.pending["q"], names, shapes, s.matrix_approximation_rank, s.min_compression_rate, like)
        if q is not None:
            s.q_memory_dict[b] = q
            compressed = layout(shapes, s.matrix_approximation_rank, s.min_compression_rate)[1]
            s.p_memory_dict[b] = like.new_empty(sum(n * r for _, n, _, r in compressed))
        for name in names:
            self.pending["error"].pop(name, None)
            self.pending["q"].pop(name, None)

    def per_name(self) -> dict:
        self._lift()
        self.buckets = {}
        return self.pending

    def broadcast(self, model, optimizer) -> None:
        super().broadcast(model, optimizer)
        # At the start (resume): the per-name state restored, if any, is all there is; torch's is placed from it.
        for memory in (self.hook_state.error_dict, self.hook_state.p_memory_dict, self.hook_state.q_memory_dict):
            memory.clear()
        self.buckets = {}
