"""Pipeline parallelism: how well the partitioner balances stages, how close a real 2-stage pipeline
gets to its ideal, and mpi4py vs Horovod process sets for a stage's replica gradient average.

    python benchmarks/pipeline.py [--quick] [--out DIR] [--parts abc]

A. Partition balance (one process). Profile the blocks of ResNet and BERT (hpctrain.engine.torch.pipeline.profile),
   partition for each P with the time / params / uniform methods and record the predicted stage times,
   bottleneck, lower bound and balance = bottleneck / lower bound, plus bottleneck(params) / bottleneck(time)
   and bottleneck(uniform) / bottleneck(time). Then every planned stage is run for real (its blocks
   forward + backward on the sample micro-batch, median of repeats, all stages interleaved inside each
   repeat, beside every single block measured the same way; the profile's run is the warm-up) and the same
   figures are recorded from those measurements: measured lower bound = max(sum of measured blocks / P,
   largest measured block), the partitioner's bound on measured rather than profiled block times.
B. Pipeline throughput (mpirun -np P, D = 1, one torch thread per rank). Time-balanced plan (profiled on
   every rank, median, as PipelineTrainer does); for each schedule and M, the pipelined step
   (PipelineStage.step, then the optimizer step) beside the sequential step (rank 0 runs the same M
   micro-batches through the whole model, forward+backward+optimizer, while the other ranks sleep), both
   inside every repeat. speedup = sequential / pipelined (paired per repeat), efficiency = speedup / P,
   ideal = M / (M + P - 1) x mean / max of the stage times measured alone, and the makespan ideal of
   hpctrain.pipeline.schedule.simulate on the measured forward / backward times. The stages are also
   timed all at once ("concurrent"); the contended ideal uses those (the sequential peer runs alone),
   which is what a machine whose cores or memory are shared (here: with other users) allows.
C. Replica gradient averaging (mpirun -np 4: P = 2 stages x D = 2 replicas): MPIReducer (one mpi4py
   Allreduce) vs HorovodReducer (one process set per stage) on flat float32 buffers, both stages
   reducing at once as in training; engines alternate inside each repeat; algbw = bytes / time.
   Pass 1 sets HOROVOD_CYCLE_TIME to hpctrain's CPU default (10 ms, hpctrain/engine/torch/backends/horovod.py);
   pass 2 (--hvd-default-pass 1; off with --quick) leaves it unset (Horovod's own default), which is what a
   pipelined run with --pipeline-allreduce horovod gets (that path never sets the variable). Each pass is
   its own mpirun with its own mpi peer: re-initialising Horovod in one process is not reliable (see
   worker_reduce).

Writes DIR/pipeline.json and DIR/pipeline.png (DIR: benchmarks/results; --quick: a new temp directory).
Statistics: mean +/- 1.96 sd over repeats.
"""
from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.common import machine_info, parse_bytes, stats  # noqa: E402

METHODS = ("time", "params", "uniform")

DEFAULTS = dict(resnet="resnet50", image_size=64, resnet_micro_batch=8, bert="base", seq_len=128, bert_micro_batch=4,
                vocab=8000, stages="2,4,8", warmup=1, repeats=3, stage_repeats=3,
                pipe_arch="resnet50", pipe_image_size=64, pipe_micro_batch=8, micro_batches="2,4,8",
                schedules="1f1b,gpipe", pipe_stages=2, pipe_repeats=4, pipe_steps=1,
                reduce_sizes="1M,16M", reduce_repeats=5, reduce_budget_s=1.0, hvd_cycle_ms=10.0,
                hvd_default_pass=1)
QUICK = dict(resnet="resnet18", image_size=32, resnet_micro_batch=4, bert="tiny", seq_len=64, bert_micro_batch=4,
             vocab=8000, stages="2,4", warmup=1, repeats=2, stage_repeats=2,
             pipe_arch="resnet18", pipe_image_size=32, pipe_micro_batch=4, micro_batches="2,4",
             schedules="1f1b,gpipe", pipe_stages=2, pipe_repeats=2, pipe_steps=1,
             reduce_sizes="256K,1M", reduce_repeats=2, reduce_budget_s=0.1, hvd_cycle_ms=10.0,
             hvd_default_pass=0)


# ---------------------------------------------------------------------------------------------------- models


def build(kind: str, name: str, image_size: int = 64, micro_batch: int = 8, seq_len: int = 128, vocab: int = 8000):
    """(model, task, make_batch(generator)) for a ResNet or a BERT preset; the model is in train mode."""
    import torch
    if kind == "resnet":
        from hpctrain.engine.torch import Classification
        from hpctrain.models.resnet import build_resnet
        model = build_resnet(name, 10)

        def make_batch(gen):
            return (torch.randn(micro_batch, 3, image_size, image_size, generator=gen),
                    torch.randint(0, 10, (micro_batch,), generator=gen))
        return model.train(), Classification(), make_batch
    from hpctrain.models.bert import MaskedLM, build_bert
    model = build_bert(name, vocab, seq_len)

    def make_batch(gen):
        ids = torch.randint(5, vocab, (micro_batch, seq_len), generator=gen)
        masked = torch.rand(micro_batch, seq_len, generator=gen) < 0.15
        masked[:, 1] = True  # never an empty selection
        labels = torch.where(masked, ids, torch.full_like(ids, -100))
        return {"input_ids": torch.where(masked, torch.full_like(ids, 4), ids),
                "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids), "labels": labels}
    return model.train(), MaskedLM(), make_batch


def time_stage(blocks, task, batch, x, grad, first: bool, last: bool, warmup: int, repeats: int):
    """Forward and backward seconds of `blocks` run in order on a detached copy of x, as a pipeline stage
    runs them: the first stage computes no input gradient, the last computes the loss and backs it up,
    the others back up `grad`, the gradient the next stage would send for this batch."""
    fwd, bwd = [], []
    for rep in range(warmup + repeats):
        x_in = x.detach()
        if not first and x_in.is_floating_point():
            x_in.requires_grad_(True)
        t0 = time.perf_counter()
        y = x_in
        for block in blocks:
            y = block(y, batch)
        if last:
            y = task.loss(y, batch)[0]
        t1 = time.perf_counter()
        y.backward(None if last else grad)
        t2 = time.perf_counter()
        if rep >= warmup:
            fwd.append(t1 - t0)
            bwd.append(t2 - t1)
        for block in blocks:
            block.zero_grad(set_to_none=True)
    return fwd, bwd


def block_io(blocks, task, batch):
    """Per block: its input on this batch and the gradient of the loss with respect to its output (None for
    the last block), from one forward + backward of the whole model with a cut after every block."""
    ins, outs = [], []
    x = task.inputs(batch)
    for i, (_, block) in enumerate(blocks):
        x = x.detach()
        if i and x.is_floating_point():
            x.requires_grad_(True)
        ins.append(x)
        x = block(x, batch)
        outs.append(x)
    task.loss(x, batch)[0].backward()  # stops at the last cut; walk the rest back cut by cut
    for i in range(len(blocks) - 1, 0, -1):
        if i < len(blocks) - 1:
            outs[i].backward(ins[i + 1].grad)
    grads = [ins[i + 1].grad for i in range(len(blocks) - 1)] + [None]
    for _, block in blocks:
        block.zero_grad(set_to_none=True)
    return [x.detach() for x in ins], [g if g is None else g.detach() for g in grads]


# ---------------------------------------------------------------------------------------------------- A


def partition_balance(label: str, model, task, batch, stages: list[int], a) -> dict:
    import torch

    from hpctrain.engine.torch.pipeline.profile import combine, profile_blocks
    from hpctrain.pipeline.partition import partition
    blocks = task.blocks(model)
    names = [n for n, _ in blocks]
    t = time.perf_counter()
    rows = profile_blocks(blocks, task, batch, torch.device("cpu"), warmup=a.warmup, repeats=a.repeats)
    costs = combine([rows])
    print(f"[A] {label}: profiled {len(blocks)} blocks in {time.perf_counter() - t:.1f}s "
          f"(sum {sum(c.time_s for c in costs) * 1e3:.0f} ms/micro-batch)", flush=True)
    plans = {}
    skipped = []
    for P in stages:
        if P > len(blocks):
            skipped.append(P)
            continue
        plans[P] = {m: partition(costs, P, m) for m in METHODS}
    # Measure every distinct stage and every single block, interleaved inside each repeat.
    L = len(blocks)
    ranges = sorted({(i, i + 1) for i in range(L)} | {r for ps in plans.values() for p in ps.values() for r in p.stages})
    xs, grads = block_io(blocks, task, batch)
    samples = {r: [] for r in ranges}
    t = time.perf_counter()
    order = random.Random(0)
    for rep in range(a.stage_repeats):  # no warm-up round: profiling just ran every block
        # a new order every round, so a change of machine load does not always hit the same stages
        for (s, e) in order.sample(ranges, len(ranges)):
            f, b = time_stage([blk for _, blk in blocks[s:e]], task, batch, xs[s], grads[e - 1], s == 0, e == L, 0, 1)
            samples[(s, e)].append(f[0] + b[0])
    measured = {r: statistics.median(v) for r, v in samples.items()}
    print(f"[A] {label}: measured {len(ranges)} distinct stages x {a.stage_repeats} in {time.perf_counter() - t:.1f}s",
          flush=True)
    single = [measured[(i, i + 1)] for i in range(L)]
    whole = sum(single)
    biggest = max(single)  # measured like the stages (no profiler hooks), so the bound is like for like
    raw = {r: [round(x * 1e3, 3) for x in v] for r, v in samples.items()}
    out = {"blocks": [{"name": c.name, "profiled_ms": c.time_s * 1e3, "measured_ms": t * 1e3,
                       "measured_samples_ms": raw[(i, i + 1)],
                       "param_bytes": c.param_bytes, "act_bytes": c.act_bytes, "saved_bytes": c.saved_bytes}
                      for i, (c, t) in enumerate(zip(costs, single))],
           "profiled_sum_ms": sum(c.time_s for c in costs) * 1e3, "measured_block_sum_ms": sum(single) * 1e3,
           "skipped_P": skipped, "P": {}}
    for P, by in plans.items():
        entry = {}
        for m, plan in by.items():
            mt = [measured[r] for r in plan.stages]
            lower = max(whole / P, biggest)
            entry[m] = {"stages": [[a_, b_] for a_, b_ in plan.stages],
                        "stage_blocks": [f"{names[s]}..{names[e - 1]}" if e - s > 1 else names[s] for s, e in plan.stages],
                        "stage_param_bytes": [sum(c.param_bytes for c in costs[s:e]) for s, e in plan.stages],
                        "predicted_stage_ms": [x * 1e3 for x in plan.stage_times],
                        "predicted_bottleneck_ms": plan.bottleneck * 1e3,
                        "predicted_lower_bound_ms": plan.lower_bound * 1e3, "predicted_balance": plan.balance,
                        "measured_stage_ms": [x * 1e3 for x in mt], "measured_bottleneck_ms": max(mt) * 1e3,
                        "measured_stage_samples_ms": [raw[r] for r in plan.stages],
                        "measured_lower_bound_ms": lower * 1e3, "measured_balance": max(mt) / lower,
                        "measured_over_predicted_bottleneck": max(mt) / plan.bottleneck}
        ratios = {}
        for m in ("params", "uniform"):
            ratios[f"predicted_{m}_vs_time"] = entry[m]["predicted_bottleneck_ms"] / entry["time"]["predicted_bottleneck_ms"]
            ratios[f"measured_{m}_vs_time"] = entry[m]["measured_bottleneck_ms"] / entry["time"]["measured_bottleneck_ms"]
        out["P"][str(P)] = {"methods": entry, "ratios": ratios}
    return out


def part_a(a) -> dict:
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
        label = f"{name}" if kind == "resnet" else f"bert-{name}"
        res[label] = {"kind": kind, "config": {"model": name, **kw}, **partition_balance(label, model, task, batch,
                                                                                           stages, a)}
        del model
    return res


# ---------------------------------------------------------------------------------------------------- B (worker)


def _sleep_barrier(comm) -> None:
    """A barrier that sleeps instead of spinning, so an idle rank leaves its core to the working one."""
    req = comm.Ibarrier()
    while not req.Test():
        time.sleep(0.0005)


def worker_pipe(a, result_path: str) -> None:
    import torch
    from mpi4py import MPI

    from hpctrain.engine.torch.pipeline.profile import combine, profile_blocks
    from hpctrain.engine.torch.pipeline.runtime import Grid, PipelineStage
    from hpctrain.pipeline.partition import partition
    from hpctrain.pipeline.schedule import simulate

    comm = MPI.COMM_WORLD
    rank, P = comm.Get_rank(), comm.Get_size()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    cpu = torch.device("cpu")
    model, task, make_batch = build("resnet", a.pipe_arch, image_size=a.pipe_image_size, micro_batch=a.pipe_micro_batch)
    blocks = task.blocks(model)
    Ms = [int(x) for x in a.micro_batches.split(",")]
    schedules = a.schedules.split(",")
    gen = torch.Generator().manual_seed(1)
    batches = [make_batch(gen) for _ in range(max(Ms))]
    sample = batches[0]

    # The plan, as PipelineTrainer makes it: every rank profiles, median per block, time method.
    rows = profile_blocks(blocks, task, sample, cpu, warmup=a.warmup, repeats=a.repeats)
    costs = combine(comm.allgather(rows))
    plan = partition(costs, P, "time")
    grid = Grid(comm, P)
    s0, s1 = plan.stages[grid.stage]
    mine = [blk for _, blk in blocks[s0:s1]]
    xs, grads = block_io(blocks, task, sample)
    x_in, g_out = xs[s0], grads[s1 - 1]
    first, last = s0 == 0, s1 == len(blocks)

    alone_f, alone_b, conc_f, conc_b = [], [], [], []

    def measure_stages(keep: bool, times: int = 1) -> None:
        """This rank's stage forward / backward on the sample: alone (each stage in turn, the others asleep:
        the ideal's stage times), then all stages at once (what they cost while sharing the machine)."""
        for s in range(P):
            if s == grid.stage:
                f, b = time_stage(mine, task, sample, x_in, g_out, first, last, 0 if keep else 1, times)
                if keep:
                    alone_f.extend(f)
                    alone_b.extend(b)
            _sleep_barrier(comm)
        f, b = time_stage(mine, task, sample, x_in, g_out, first, last, 0 if keep else 1, times)
        if keep:
            conc_f.extend(f)
            conc_b.extend(b)
        _sleep_barrier(comm)

    measure_stages(True, max(1, a.stage_repeats))  # then one more sample of each inside every repeat below

    # Sequential peer: rank 0, the whole model (its own copy), same micro-batches, forward+backward+optimizer.
    if rank == 0:
        ref = copy.deepcopy(model)
        ref_blocks = [blk for _, blk in task.blocks(ref)]
        ref_opt = torch.optim.SGD(ref.parameters(), lr=0.0, momentum=0.9)

    def seq_step(M):
        ref_opt.zero_grad(set_to_none=False)
        for batch in batches[:M]:
            x = task.inputs(batch)
            for blk in ref_blocks:
                x = blk(x, batch)
            (task.loss(x, batch)[0] / M).backward()
        ref_opt.step()

    runtimes = {(sch, M): PipelineStage(mine, grid, task, cpu, sch, M) for sch in schedules for M in Ms}
    params = runtimes[(schedules[0], Ms[0])].params
    opt = torch.optim.SGD(params, lr=0.0, momentum=0.9)  # lr 0: the work of a step, weights unchanged

    def pipe_step(M, sch):
        st = runtimes[(sch, M)]
        st.zero_grad()
        st.step(batches[:M])
        opt.step()

    def timed(fn, only_rank0: bool) -> float:
        _sleep_barrier(comm)
        t = time.perf_counter()
        if rank == 0 or not only_rank0:
            for _ in range(a.pipe_steps):
                fn()
        el = (time.perf_counter() - t) / a.pipe_steps
        _sleep_barrier(comm)  # the step ends when the last rank is done
        return max(comm.allgather(el if (rank == 0 or not only_rank0) else 0.0))

    seq = {M: [] for M in Ms}
    pipe = {k: [] for k in runtimes}
    t_all = time.perf_counter()
    for rep in range(1 + a.pipe_repeats):  # round 0 is the warm-up (smallest M: every code path, least time)
        if rep:
            measure_stages(True)
        for M in (Ms if rep else [min(Ms)]):
            v = timed(lambda: seq_step(M), only_rank0=True)
            if rep:
                seq[M].append(v)
            for sch in schedules:
                v = timed(lambda: pipe_step(M, sch), only_rank0=False)
                if rep:
                    pipe[(sch, M)].append(v)
        if rank == 0:
            print(f"[B] repeat {rep}/{a.pipe_repeats} done ({time.perf_counter() - t_all:.0f}s)", flush=True)
    med = statistics.median
    alone = comm.allgather((med(alone_f), med(alone_b)))
    concurrent = comm.allgather((med(conc_f), med(conc_b)))
    peaks = comm.gather({f"{k[0]},{k[1]}": st.peak_in_flight for k, st in runtimes.items()}, root=0)
    grad_bytes = comm.allgather(runtimes[(schedules[0], Ms[0])].flat.numel() * 4)
    if rank != 0:
        return

    fwd = [f for f, _ in alone]
    bwd = [b for _, b in alone]
    tot = [f + b for f, b in alone]
    ctot = [f + b for f, b in concurrent]
    rows_out = []
    for (sch, M), times in pipe.items():
        speed = [sq / pp for sq, pp in zip(seq[M], times)]
        sp, sp_ci = stats(speed)
        rate, rate_ci = stats([1 / x for x in times])
        ideal = M / (M + P - 1) * (sum(tot) / P) / max(tot)
        # Stages slowed by running at the same time (shared cores, memory, other users' jobs) while the
        # sequential peer runs alone: the pipeline can at best reach this.
        ideal_conc = M * sum(tot) / ((M + P - 1) * max(ctot)) / P
        makespan = simulate(sch, P, M, fwd, bwd)
        sim_ideal = M * sum(tot) / makespan / P
        sim_conc = M * sum(tot) / simulate(sch, P, M, [f for f, _ in concurrent], [b for _, b in concurrent]) / P
        eff = sp / P
        rows_out.append({"schedule": sch, "M": M, "pipelined_step_s": stats(times)[0], "pipelined_step_ci95": stats(times)[1],
                         "steps_per_s": rate, "steps_per_s_ci95": rate_ci,
                         "samples_per_s": rate * M * a.pipe_micro_batch,
                         "sequential_step_s": stats(seq[M])[0], "sequential_step_ci95": stats(seq[M])[1],
                         "speedup": sp, "speedup_ci95": sp_ci, "efficiency": eff, "efficiency_ci95": sp_ci / P,
                         "ideal_efficiency": ideal, "simulated_makespan_s": makespan,
                         "simulated_ideal_efficiency": sim_ideal,
                         "efficiency_vs_ideal": eff / ideal, "efficiency_vs_simulated_ideal": eff / sim_ideal,
                         "contended_ideal_efficiency": ideal_conc, "contended_simulated_ideal_efficiency": sim_conc,
                         "efficiency_vs_contended_simulated_ideal": eff / sim_conc,
                         "peak_in_flight_per_stage": [p[f"{sch},{M}"] for p in peaks],
                         "raw_pipelined_s": times, "raw_sequential_s": seq[M]})
    names = [n for n, _ in blocks]
    Path(result_path).write_text(json.dumps({
        "model": a.pipe_arch, "image_size": a.pipe_image_size, "micro_batch": a.pipe_micro_batch, "P": P, "D": 1,
        "threads_per_rank": 1, "steps_per_repeat": a.pipe_steps, "repeats": a.pipe_repeats,
        "plan": {"method": "time", "stages": [[s, e] for s, e in plan.stages],
                 "stage_blocks": [f"{names[s]}..{names[e - 1]}" for s, e in plan.stages],
                 "predicted_stage_ms": [x * 1e3 for x in plan.stage_times], "predicted_balance": plan.balance},
        "stage_grad_bytes": grad_bytes,
        "cut_activation_bytes": [costs[e - 1].act_bytes for _, e in plan.stages[:-1]],
        "stage_fwd_ms_alone": [x * 1e3 for x in fwd], "stage_bwd_ms_alone": [x * 1e3 for x in bwd],
        "stage_ms_alone": [x * 1e3 for x in tot], "stage_ms_concurrent": [x * 1e3 for x in ctot],
        "stage_time_samples": len(alone_f),
        "rows": rows_out}))


# ---------------------------------------------------------------------------------------------------- C (worker)


def worker_reduce(a, result_path: str, stage_sizes: list[int]) -> None:
    """One Horovod configuration per launch: in Horovod 0.28.1 a shutdown + init in the same process keeps
    the previous cycle time when HOROVOD_CYCLE_TIME is removed, and with process sets the new instance
    sometimes fails at once with "Horovod has been shut down" (both seen here), so each pass is its own mpirun."""
    import numpy as np
    import torch
    from mpi4py import MPI  # first: MPI belongs to mpi4py, Horovod initialises on top of it

    from hpctrain.engine.torch.pipeline.runtime import Grid, HorovodReducer, MPIReducer

    comm = MPI.COMM_WORLD
    rank = comm.Get_rank()
    torch.set_num_threads(1)
    grid = Grid(comm, 2)
    points = [(s, [parse_bytes(s)] * 2) for s in a.reduce_sizes.split(",") if s]
    if stage_sizes:
        points.append((f"{a.pipe_arch} stages", list(stage_sizes)))
    mpi = MPIReducer(grid)
    if a.hvd_cycle_ms:
        hname = "horovod_cycle%gms" % a.hvd_cycle_ms
        os.environ["HOROVOD_CYCLE_TIME"] = "%g" % a.hvd_cycle_ms
    else:  # what --pipeline-allreduce horovod runs with: the pipeline path never sets the variable
        hname = "horovod_default_cycle"
        os.environ.pop("HOROVOD_CYCLE_TIME", None)
    red, err = None, None
    try:
        red = HorovodReducer(grid)
        probe = torch.ones(16) * (grid.replica + 1)
        red(probe)
        if not torch.allclose(probe, torch.full_like(probe, (grid.replicas + 1) / 2)):
            raise RuntimeError(f"HorovodReducer averaged to {probe[0].item()}, expected {(grid.replicas + 1) / 2}")
    except Exception as e:
        err = f"{type(e).__name__}: {e}"
    errs = sorted({e for e in comm.allgather(err) if e})
    if errs:
        red = None
        if rank == 0:
            print(f"[C] {hname}: {'; '.join(errs)}", flush=True)
    rows = []

    def write():
        ratios = []
        for label, _ in points:
            m = next((r for r in rows if r["point"] == label and r["engine"] == "mpi"), None)
            h = next((r for r in rows if r["point"] == label and r["engine"] == "horovod"), None)
            if m and h:
                ratios.append({"pass": hname, "point": label, "bytes_per_stage": m["bytes_per_stage"],
                               "horovod_vs_mpi": h["algbw_GBps"] / m["algbw_GBps"]})
        Path(result_path).write_text(json.dumps({
            "np": comm.Get_size(), "P": 2, "D": grid.replicas, "threads_per_rank": 1, "repeats": a.reduce_repeats,
            "horovod_cycle_time_env": {hname: os.environ.get("HOROVOD_CYCLE_TIME")},
            "horovod_errors": {hname: "; ".join(errs)} if errs else {}, "rows": rows, "ratios": ratios}))

    def calls_for(fn, budget_s):
        fn()
        comm.Barrier()
        t = time.perf_counter()
        fn()
        one = max(time.perf_counter() - t, 1e-6)
        return comm.allreduce(max(1, min(200, int(budget_s / one))), op=MPI.MIN)

    for label, sizes in points:
        nbytes = sizes[grid.stage]
        buf = torch.ones(nbytes // 4, dtype=torch.float32)
        fns = {"mpi": lambda: mpi(buf)}
        if red is not None:
            fns[hname] = lambda: red(buf)
        per_repeat = a.reduce_budget_s / a.reduce_repeats
        calls = {n: calls_for(f, per_repeat) for n, f in fns.items()}
        times = {n: [] for n in fns}
        for _ in range(a.reduce_repeats):
            for n, f in fns.items():  # engines take turns inside every repeat
                comm.Barrier()
                t = time.perf_counter()
                for _ in range(calls[n]):
                    f()
                times[n].append((time.perf_counter() - t) / calls[n])
        everyone = comm.gather((grid.stage, nbytes, times), root=0)
        if rank != 0:
            continue
        for n in fns:
            per_stage = {}
            for st, nb, tm in everyone:
                per_stage.setdefault(st, (nb, []))[1].extend(tm[n])
            stage_bw = {str(st): stats([nb / x / 1e9 for x in v]) for st, (nb, v) in per_stage.items()}
            # both stages reduce at once: total bytes of both / the slower stage's mean time
            slow = max(float(np.mean(v)) for _, v in per_stage.values())
            total = sum(nb for nb, _ in per_stage.values())
            bw, ci = stats([nb / x / 1e9 for nb, v in per_stage.values() for x in v])
            rows.append({"pass": hname, "engine": "mpi" if n == "mpi" else "horovod", "variant": n, "point": label,
                         "bytes_per_stage": [per_stage[k][0] for k in sorted(per_stage)], "time_s": slow,
                         "algbw_GBps": bw, "algbw_ci95": ci, "per_stage_algbw_GBps": stage_bw,
                         "aggregate_GBps": total / slow / 1e9, "calls_per_repeat": calls[n]})
            print(f"[C] {hname:>22} {n:>22} {label:>16}  {bw:7.3f} +/- {ci:.3f} GB/s", flush=True)
        write()  # after every point: a later failure still leaves these
    if red is not None:
        red.hvd.shutdown()
    if rank == 0:
        write()


# ---------------------------------------------------------------------------------------------------- driver


def mpirun(np_: int, args: list[str], timeout: int) -> tuple[bool, str]:
    cmd = ["mpirun", "-np", str(np_), "--oversubscribe", "--bind-to", "none", sys.executable, *args]
    env = {**os.environ, "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1", "OMP_NUM_THREADS": "1",
           "PYTHONUNBUFFERED": "1", "PYTHONPATH": f"{ROOT}:{os.environ.get('PYTHONPATH', '')}"}
    for k in [k for k in env if k.startswith(("OMPI_COMM_WORLD", "PMIX_", "PMI_"))]:
        del env[k]
    try:
        p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        return False, f"timed out after {timeout}s: {' '.join(cmd)}\n{(e.stderr or b'')[-2000:]!r}"
    for line in p.stdout.splitlines():
        if line.startswith(("[B]", "[C]")):
            print("   " + line, flush=True)
    if p.returncode != 0:
        err = p.stderr
        first = err.find("Traceback")  # the first error says why; the tail is often other ranks' echoes
        head = err[first:first + 2500] if first >= 0 else ""
        return False, f"{' '.join(cmd)} failed (rc {p.returncode}):\n{head}\n...\n{err[-1500:]}"
    return True, p.stdout


def worker_args(a) -> list[str]:
    keys = list(DEFAULTS)
    return [x for k in keys for x in (f"--{k.replace('_', '-')}", str(getattr(a, k)))]


def part_b(a) -> dict:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "b.json"
        ok, text = mpirun(a.pipe_stages, [__file__, "--worker", "pipe", "--result", str(path), *worker_args(a)],
                          timeout=a.timeout)
        if not ok or not path.is_file():
            print(f"[B] failed: {text[-1500:]}", flush=True)
            return {"error": text}
        return json.loads(path.read_text())


def part_c(a, stage_sizes: list[int]) -> dict:
    merged = {"np": 4, "P": 2, "D": 2, "threads_per_rank": 1, "repeats": a.reduce_repeats, "horovod_cycle_time_env": {},
              "horovod_errors": {}, "rows": [], "ratios": [],
              "note": "one mpirun per Horovod configuration; horovod_default_cycle = HOROVOD_CYCLE_TIME unset, what "
                      "--pipeline-allreduce horovod runs with (the pipeline path never sets it)"}
    for cycle in [a.hvd_cycle_ms] + ([0.0] if a.hvd_default_pass and a.hvd_cycle_ms else []):
        with tempfile.TemporaryDirectory() as d:
            path = Path(d) / "c.json"
            args = [__file__, "--worker", "reduce", "--result", str(path),
                    "--stage-sizes", ",".join(map(str, stage_sizes)), *worker_args(a)]
            args[args.index("--hvd-cycle-ms") + 1] = str(cycle)
            ok, text = mpirun(4, args, timeout=a.timeout)
            part = json.loads(path.read_text()) if path.is_file() else {}
        name = "horovod_cycle%gms" % cycle if cycle else "horovod_default_cycle"
        if not ok:
            print(f"[C] {name} failed: {text[-1500:]}", flush=True)
            merged["horovod_errors"][name + " (run)"] = text
            merged.setdefault("errors", {})[name] = text
        for k in ("rows", "ratios"):
            merged[k] += part.get(k, [])
        for k in ("horovod_cycle_time_env", "horovod_errors"):
            merged[k].update(part.get(k, {}))
    return merged


def summary(result: dict) -> str:
    out = []
    A = result.get("partition", {})
    if A:
        out.append("A. partition balance (bottleneck / lower bound; predicted | measured) and bottleneck ratios vs time")
        out.append(f"{'model':>12} {'P':>2} | {'time':>11} {'params':>11} {'uniform':>11} | "
                   f"{'params/time':>11} {'uniform/time':>12} | time-plan stages")
        for model, r in A.items():
            for P, e in r["P"].items():
                m, q = e["methods"], e["ratios"]
                cells = " ".join(f"{m[k]['predicted_balance']:5.2f}/{m[k]['measured_balance']:<5.2f}" for k in METHODS)
                out.append(f"{model:>12} {P:>2} | {cells} | {q['predicted_params_vs_time']:5.2f}/"
                           f"{q['measured_params_vs_time']:<5.2f} {q['predicted_uniform_vs_time']:6.2f}/"
                           f"{q['measured_uniform_vs_time']:<5.2f} | {' | '.join(m['time']['stage_blocks'])}")
    B = result.get("pipeline", {})
    if B.get("rows"):
        out.append(f"B. {B['model']} {B['image_size']}px x{B['micro_batch']}, P={B['P']} (plan "
                   f"{' | '.join(B['plan']['stage_blocks'])}; stage ms alone {[round(x) for x in B['stage_ms_alone']]}, "
                   f"concurrent {[round(x) for x in B['stage_ms_concurrent']]})")
        out.append(f"{'schedule':>8} {'M':>2} {'steps/s':>14} {'seq s':>7} {'pipe s':>7} {'speedup':>13} "
                   f"{'eff':>6} {'ideal':>6} {'sim':>6} {'eff/ideal':>9} {'eff/sim':>8} {'contended sim':>13}")
        for r in B["rows"]:
            out.append(f"{r['schedule']:>8} {r['M']:>2} {r['steps_per_s']:7.3f}+-{r['steps_per_s_ci95']:5.3f} "
                       f"{r['sequential_step_s']:7.2f} {r['pipelined_step_s']:7.2f} "
                       f"{r['speedup']:6.2f}+-{r['speedup_ci95']:4.2f} {r['efficiency']:6.3f} "
                       f"{r['ideal_efficiency']:6.3f} {r['simulated_ideal_efficiency']:6.3f} "
                       f"{r['efficiency_vs_ideal']:9.3f} {r['efficiency_vs_simulated_ideal']:8.3f} "
                       f"{r['contended_simulated_ideal_efficiency']:13.3f}")
    elif "error" in B:
        out.append(f"B. failed: {B['error'].splitlines()[-1] if B['error'] else ''}")
    C = result.get("reducers", {})
    if C.get("rows") or C.get("horovod_errors"):
        out.append("C. stage gradient average, P=2 x D=2 (algbw GB/s, mean over stages and repeats)")
        for r in C.get("rows", []):
            ratio = next((q["horovod_vs_mpi"] for q in C["ratios"] if q["pass"] == r["pass"] and q["point"] == r["point"]),
                         None) if r["engine"] == "horovod" else None
            mb = "/".join(f"{b / 2**20:.1f}" for b in r["bytes_per_stage"])
            out.append(f"{r['variant']:>24} {r['point']:>16} ({mb} MiB) {r['algbw_GBps']:7.3f} +/- {r['algbw_ci95']:.3f}"
                       + (f"   horovod/mpi {ratio:.2f}" if ratio else ""))
        for k, v in C.get("horovod_errors", {}).items():
            out.append(f"   horovod error ({k}): {v[:300]}")
    return "\n".join(out)


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    ax = axes[0]
    A = result.get("partition", {})
    labels, x = [], 0
    colors = {"time": "C0", "params": "C1", "uniform": "C2"}
    for model, r in A.items():
        for P, e in r["P"].items():
            for i, m in enumerate(METHODS):
                v = e["methods"][m]
                ax.bar(x + (i - 1) * 0.27, v["predicted_balance"], 0.27, color=colors[m],
                       label=m if not labels else None)
                ax.plot(x + (i - 1) * 0.27, v["measured_balance"], "kx")
            labels.append(f"{model}\nP={P}")
            x += 1
    ax.plot([], [], "kx", label="measured")
    ax.axhline(1.0, color="k", lw=0.6)
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, fontsize=7)
    ax.set_ylabel("bottleneck / lower bound")
    ax.set_title("A. partition balance (bars: predicted)")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    ax = axes[1]
    B = result.get("pipeline", {})
    for i, sch in enumerate(dict.fromkeys(r["schedule"] for r in B.get("rows", []))):
        rows = [r for r in B["rows"] if r["schedule"] == sch]
        ax.errorbar([r["M"] for r in rows], [r["efficiency"] for r in rows], yerr=[r["efficiency_ci95"] for r in rows],
                    marker="o", capsize=3, label=f"{sch} measured", color=f"C{i}")
        ax.plot([r["M"] for r in rows], [r["simulated_ideal_efficiency"] for r in rows], ":", color=f"C{i}",
                label=f"{sch} simulated ideal")
        ax.plot([r["M"] for r in rows], [r["contended_simulated_ideal_efficiency"] for r in rows], "-.",
                color=f"C{i}", alpha=0.6, label=f"{sch} simulated ideal, concurrent stage times")
    if B.get("rows"):
        rows = [r for r in B["rows"] if r["schedule"] == B["rows"][0]["schedule"]]
        ax.plot([r["M"] for r in rows], [r["ideal_efficiency"] for r in rows], "k--", label="M/(M+P-1) x mean/max")
        ax.set_title(f"B. {B['model']} {B['image_size']}px x{B['micro_batch']}, P={B['P']}: efficiency")
        ax.set_xticks(sorted({r["M"] for r in B["rows"]}))
    ax.set_xlabel("micro-batches M")
    ax.set_ylabel("speedup / P")
    ax.set_ylim(0, 1.05)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    ax = axes[2]
    C = result.get("reducers", {})
    for variant in dict.fromkeys(r["variant"] + "|" + r["pass"] for r in C.get("rows", [])):
        v, p = variant.split("|")
        rows = [r for r in C["rows"] if r["variant"] == v and r["pass"] == p]
        xs = [max(r["bytes_per_stage"]) for r in rows]
        ax.errorbar(xs, [r["algbw_GBps"] for r in rows], yerr=[r["algbw_ci95"] for r in rows], marker="o", capsize=3,
                    label=f"{v} ({p})" if v == "mpi" else v, linestyle="-" if v == "mpi" else "--")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("bytes per stage buffer (largest stage)")
    ax.set_ylabel("algbw (GB/s)")
    ax.set_title("C. stage gradient average, P=2 x D=2")
    ax.grid(True, which="both", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    fig.suptitle(f"pipeline benchmark, {result['machine']['cpu_model'][:50]}, {result['machine']['cores']} cores",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny settings (resnet18, BERT tiny, few repeats) for CI; "
                                                         "writes to a temp directory unless --out is given")
    p.add_argument("--out", default=None, help="result directory (default benchmarks/results; --quick: a temp dir)")
    p.add_argument("--parts", default="abc", help="which parts to run (a, b, c)")
    p.add_argument("--threads", type=int, default=1, help="torch threads for part A (B and C: 1 per rank)")
    p.add_argument("--timeout", type=int, default=900, help="seconds allowed for each mpirun")
    for k, v in DEFAULTS.items():
        p.add_argument(f"--{k.replace('_', '-')}", type=type(v), default=None, help=f"default {v} (quick: {QUICK[k]})")
    p.add_argument("--worker", choices=["pipe", "reduce"], help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--stage-sizes", default="", help=argparse.SUPPRESS)
    a = p.parse_args()
    for k, v in (QUICK if a.quick else DEFAULTS).items():
        if getattr(a, k) is None:
            setattr(a, k, v)

    if a.worker:
        from mpi4py import MPI
        try:
            if a.worker == "pipe":
                return worker_pipe(a, a.result)
            return worker_reduce(a, a.result, [int(x) for x in a.stage_sizes.split(",") if x])
        except BaseException:
            traceback.print_exc()
            sys.stderr.flush()
            MPI.COMM_WORLD.Abort(1)  # an exception on some ranks would leave the others waiting forever

    out = Path(a.out) if a.out else Path(tempfile.mkdtemp(prefix="pipeline-quick-")) if a.quick \
        else ROOT / "benchmarks" / "results"
    settings = {k: getattr(a, k) for k in DEFAULTS} | {"quick": a.quick, "threads_part_a": a.threads}
    t0 = time.perf_counter()
    result = {"benchmark": "pipeline", "date": dt.datetime.now().isoformat(timespec="seconds"),
              "machine": machine_info(), "settings": settings}
    timings = {}
    load = {"start": os.getloadavg()}  # other users' jobs share this machine: context for every number below
    if "a" in a.parts:
        t = time.perf_counter()
        result["partition"] = part_a(a)
        load["after_a"] = os.getloadavg()
        timings["a_s"] = time.perf_counter() - t
    if "b" in a.parts:
        t = time.perf_counter()
        print(f"[B] mpirun -np {a.pipe_stages}: {a.pipe_arch} pipeline ...", flush=True)
        result["pipeline"] = part_b(a)
        load["after_b"] = os.getloadavg()
        timings["b_s"] = time.perf_counter() - t
    if "c" in a.parts:
        t = time.perf_counter()
        sizes = result.get("pipeline", {}).get("stage_grad_bytes")
        if not sizes:  # part B skipped or failed: the same model's P=2 time plan from part A, if there
            r = result.get("partition", {}).get(a.pipe_arch, {}).get("P", {}).get("2")
            sizes = r["methods"]["time"]["stage_param_bytes"] if r and a.pipe_arch == a.resnet else []
        print(f"[C] mpirun -np 4: reducers on {a.reduce_sizes} + stage sizes {sizes} ...", flush=True)
        result["reducers"] = part_c(a, sizes)
        load["after_c"] = os.getloadavg()
        timings["c_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - t0
    result["elapsed"] = timings
    result["loadavg_1_5_15min"] = load
    out.mkdir(parents=True, exist_ok=True)
    path = out / "pipeline.json"
    path.write_text(json.dumps(result, indent=1))
    plot(result, out / "pipeline.png")
    print(summary(result))
    print("load average (1 min): " + ", ".join(f"{k} {v[0]:.1f}" for k, v in load.items()), flush=True)
    print(f"wrote {path} and {out / 'pipeline.png'} ({timings['total_s']:.0f}s)", flush=True)
    failed = [k for k in ("pipeline",) if "error" in result.get(k, {})]
    if failed:
        raise SystemExit(f"error: part(s) {', '.join(failed)} failed; see {path}")


if __name__ == "__main__":
    main()
