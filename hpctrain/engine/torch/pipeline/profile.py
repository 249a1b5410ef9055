"""Measure what each block costs: forward and backward time on a sample micro-batch (warm-up, then
the median of repeats), parameter bytes, output bytes (what crosses a cut) and the activation bytes
autograd keeps for backward. Every rank profiles; `combine` takes the per-block median across ranks
so one slow or busy rank does not skew the plan."""
from __future__ import annotations

import contextlib
import statistics
import time

import torch

from hpctrain.pipeline.partition import LayerCost


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def profile_blocks(blocks, task, batch, device: torch.device, warmup: int = 1, repeats: int = 3,
                   autocast=None) -> list[dict]:
    """Per block: {"name", "fwd": [s...], "bwd": [s...], "param_bytes", "act_bytes", "saved_bytes"}.

    Each block runs on a detached copy of its input, exactly as a pipeline stage boundary would see it,
    so its backward can be timed alone; the last block's time includes the loss. Buffers (BatchNorm
    running statistics) and the RNG are restored afterwards: profiling leaves no trace on training."""
    buffers = [(b, b.detach().clone()) for _, blk in blocks for b in blk.buffers()]
    rng = torch.get_rng_state()
    try:
        return _profile(blocks, task, batch, device, warmup, repeats, autocast)
    finally:
        with torch.no_grad():
            for b, copy in buffers:
                b.copy_(copy)
        torch.set_rng_state(rng)


def _profile(blocks, task, batch, device, warmup, repeats, autocast) -> list[dict]:
    params = {p.data_ptr() for _, b in blocks for p in b.parameters()}
    rows = [{"name": n, "fwd": [], "bwd": [], "param_bytes": sum(_nbytes(p) for p in b.parameters()),
             "act_bytes": 0, "saved_bytes": 0} for n, b in blocks]
    for rep in range(warmup + repeats):
        x, saved_sizes, pairs = task.inputs(batch), [], []
        for k, (row, (_, block)) in enumerate(zip(rows, blocks)):
            # The first block's input is data: the pipeline never computes its gradient, so neither do we.
            x_in = x.detach().requires_grad_(k > 0 and x.is_floating_point())
            seen: dict[int, int] = {}

            def pack(t, seen=seen):  # autograd's saved tensors, minus the weights: the activation memory
                if t.data_ptr() not in params:
                    seen[t.data_ptr()] = _nbytes(t)
                return t
            _sync(device)
            start = time.perf_counter()
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), (autocast or contextlib.nullcontext)():
                y = block(x_in, batch)
            _sync(device)
            if rep >= warmup:
                row["fwd"].append(time.perf_counter() - start)
            row["act_bytes"], saved_sizes = _nbytes(y), saved_sizes + [sum(seen.values())]
            pairs.append((x_in, y))
            x = y
        loss = task.loss(x, batch)[0]
        grad = None
        for row, (x_in, y) in zip(reversed(rows), reversed(pairs)):
            _sync(device)
            start = time.perf_counter()
            torch.autograd.backward(loss if grad is None else y, None if grad is None else grad)
            _sync(device)
            if rep >= warmup:
                row["bwd"].append(time.perf_counter() - start)
            grad = x_in.grad
        for row, size in zip(rows, saved_sizes):
            row["saved_bytes"] = size
        for _, block in blocks:
            block.zero_grad(set_to_none=True)
    return rows


def combine(per_rank: list[list[dict]]) -> list[LayerCost]:
    """Median forward+backward time per block over all ranks' repeats; sizes from the first rank."""
    first = per_rank[0]
    return [LayerCost(name=row["name"],
                      time_s=statistics.median(r[i]["fwd"][k] + r[i]["bwd"][k] for r in per_rank
                                               for k in range(len(r[i]["fwd"]))),
                      param_bytes=row["param_bytes"], act_bytes=row["act_bytes"], saved_bytes=row["saved_bytes"])
            for i, row in enumerate(first)]
