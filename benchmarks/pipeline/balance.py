"""Part A, one process: the partitioner's plans for each P and method, predicted from the block profile and
re-measured stage by stage (see the package docstring)."""
from __future__ import annotations

import random
import statistics
import time

from benchmarks.pipeline.models import block_io, build, time_stage
from benchmarks.pipeline.options import METHODS


def profile_costs(label: str, blocks, task, batch, a) -> list:
    """Per-block costs (hpctrain's profiler, median of a.repeats after a.warmup) on one process."""
    import torch

    from hpctrain.engine.torch.pipeline.profile import combine, profile_blocks
    t = time.perf_counter()
    rows = profile_blocks(blocks, task, batch, torch.device("cpu"), warmup=a.warmup, repeats=a.repeats)
    costs = combine([rows])
    print(f"[A] {label}: profiled {len(blocks)} blocks in {time.perf_counter() - t:.1f}s "
          f"(sum {sum(c.time_s for c in costs) * 1e3:.0f} ms/micro-batch)", flush=True)
    return costs


def plan_all(costs: list, stages: list[int]) -> tuple[dict, list[int]]:
    """{P: {method: Plan}} for every P the model has enough blocks for, and the P skipped."""
    from hpctrain.pipeline.partition import partition
    plans, skipped = {}, []
    for P in stages:
        if P > len(costs):
            skipped.append(P)
            continue
        plans[P] = {m: partition(costs, P, m) for m in METHODS}
    return plans, skipped


def measure_ranges(label: str, blocks, task, batch, ranges: list[tuple[int, int]], repeats: int) -> dict:
    """{(s, e): [forward + backward seconds of blocks s..e-1 as one stage, per repeat]}. No warm-up round:
    profiling just ran every block. All ranges run inside each repeat, in a new order every round, so a
    change of machine load does not always hit the same stages."""
    L = len(blocks)
    xs, grads = block_io(blocks, task, batch)
    samples = {r: [] for r in ranges}
    t = time.perf_counter()
    order = random.Random(0)
    for _ in range(repeats):
        for s, e in order.sample(ranges, len(ranges)):
            f, b = time_stage([blk for _, blk in blocks[s:e]], task, batch, xs[s], grads[e - 1], s == 0, e == L, 0, 1)
            samples[(s, e)].append(f[0] + b[0])
    print(f"[A] {label}: measured {len(ranges)} distinct stages x {repeats} in {time.perf_counter() - t:.1f}s",
          flush=True)
    return samples


def method_entry(plan, names: list[str], costs: list, measured: dict, raw: dict, lower: float) -> dict:
    """One method's plan: its stages, predicted figures and the same figures from the measured stages."""
    mt = [measured[r] for r in plan.stages]
    return {"stages": [[s, e] for s, e in plan.stages],
            "stage_blocks": [f"{names[s]}..{names[e - 1]}" if e - s > 1 else names[s] for s, e in plan.stages],
            "stage_param_bytes": [sum(c.param_bytes for c in costs[s:e]) for s, e in plan.stages],
            "predicted_stage_ms": [x * 1e3 for x in plan.stage_times],
            "predicted_bottleneck_ms": plan.bottleneck * 1e3,
            "predicted_lower_bound_ms": plan.lower_bound * 1e3, "predicted_balance": plan.balance,
            "measured_stage_ms": [x * 1e3 for x in mt], "measured_bottleneck_ms": max(mt) * 1e3,
            "measured_stage_samples_ms": [raw[r] for r in plan.stages],
            "measured_lower_bound_ms": lower * 1e3, "measured_balance": max(mt) / lower,
            "measured_over_predicted_bottleneck": max(mt) / plan.bottleneck}


def bottleneck_ratios(entry: dict) -> dict:
    """Bottleneck of the params and uniform plans over the time plan's, predicted and measured."""
    ratios = {}
    for m in ("params", "uniform"):
        for kind in ("predicted", "measured"):
            key = f"{kind}_bottleneck_ms"
            ratios[f"{kind}_{m}_vs_time"] = entry[m][key] / entry["time"][key]
    return ratios


def partition_balance(label: str, model, task, batch, stages: list[int], a) -> dict:
    """Part A's result for one model: its blocks' costs and, per P, every method's plan and ratios."""
    blocks = task.blocks(model)
    names = [n for n, _ in blocks]
    costs = profile_costs(label, blocks, task, batch, a)
    plans, skipped = plan_all(costs, stages)
    # every distinct planned stage and every single block, measured the same way
    L = len(blocks)
    planned = {r for by in plans.values() for plan in by.values() for r in plan.stages}
    ranges = sorted({(i, i + 1) for i in range(L)} | planned)
    samples = measure_ranges(label, blocks, task, batch, ranges, a.stage_repeats)
    measured = {r: statistics.median(v) for r, v in samples.items()}
    raw = {r: [round(x * 1e3, 3) for x in v] for r, v in samples.items()}
    single = [measured[(i, i + 1)] for i in range(L)]
    whole = sum(single)
    biggest = max(single)  # measured like the stages (no profiler hooks), so the bound is like for like
    out = {"blocks": [{"name": c.name, "profiled_ms": c.time_s * 1e3, "measured_ms": s * 1e3,
                       "measured_samples_ms": raw[(i, i + 1)],
                       "param_bytes": c.param_bytes, "act_bytes": c.act_bytes, "saved_bytes": c.saved_bytes}
                      for i, (c, s) in enumerate(zip(costs, single))],
           "profiled_sum_ms": sum(c.time_s for c in costs) * 1e3, "measured_block_sum_ms": whole * 1e3,
           "skipped_P": skipped, "P": {}}
    for P, by in plans.items():
        lower = max(whole / P, biggest)
        entry = {m: method_entry(plan, names, costs, measured, raw, lower) for m, plan in by.items()}
        out["P"][str(P)] = {"methods": entry, "ratios": bottleneck_ratios(entry)}
    return out


def part_a(a) -> dict:
    """{label: part A's result} for the ResNet and the BERT preset of the settings."""
    import torch
    torch.set_num_threads(a.threads)
    res = {}
    specs = [("resnet", a.resnet, dict(image_size=a.image_size, micro_batch=a.resnet_micro_batch)),
             ("bert", a.bert, dict(micro_batch=a.bert_micro_batch, seq_len=a.seq_len, vocab=a.vocab))]
    stages = [int(x) for x in a.stages.split(",")]
    for kind, name, kw in specs:
        torch.manual_seed(0)
        model, task, make_batch = build(kind, name, **kw)
        batch = make_batch(torch.Generator().manual_seed(1))
        label = name if kind == "resnet" else f"bert-{name}"
        res[label] = {"kind": kind, "config": {"model": name, **kw},
                      **partition_balance(label, model, task, batch, stages, a)}
        del model
    return res
