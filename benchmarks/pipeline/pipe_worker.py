"""Part B, one rank of `mpirun -np P`: a P-stage pipeline (D = 1) of the time-balanced plan against the same
micro-batches run sequentially on rank 0 (see the package docstring). Rank 0 writes the result file."""
from __future__ import annotations

import copy
import json
import statistics
import time
from functools import partial
from pathlib import Path

from benchmarks.common import stats
from benchmarks.pipeline.models import block_io, build, time_stage


def sleep_barrier(comm) -> None:
    """A barrier that sleeps instead of spinning, so an idle rank leaves its core to the working one."""
    req = comm.Ibarrier()
    while not req.Test():
        time.sleep(0.0005)


class PipeBench:
    """This rank's stage of the plan, its stage timings, the pipelined steps and (rank 0) the sequential peer."""

    def __init__(self, a):
        import torch
        from mpi4py import MPI
        self.a = a
        self.comm = MPI.COMM_WORLD
        self.rank, self.P = self.comm.Get_rank(), self.comm.Get_size()
        torch.set_num_threads(1)
        torch.manual_seed(0)
        self.model, self.task, make_batch = build("resnet", a.pipe_arch, image_size=a.pipe_image_size,
                                                  micro_batch=a.pipe_micro_batch)
        self.blocks = self.task.blocks(self.model)
        self.Ms = [int(x) for x in a.micro_batches.split(",")]
        self.schedules = a.schedules.split(",")
        gen = torch.Generator().manual_seed(1)
        self.batches = [make_batch(gen) for _ in range(max(self.Ms))]
        self.sample = self.batches[0]
        # forward and backward seconds of this rank's stage: alone (the other stages idle), all stages at once
        self.alone, self.concurrent = ([], []), ([], [])
        self.place_stage()

    def place_stage(self) -> None:
        """The plan as the torch Trainer's pipeline step plan makes it by default (make_plan in
        hpctrain/engine/torch/pipeline/step.py): every rank profiles, median per block, time method. Then this
        rank's blocks, and the sample's input to them and gradient at their output cut."""
        import torch

        from hpctrain.engine.torch.pipeline.profile import combine, profile_blocks
        from hpctrain.engine.torch.pipeline.runtime import Grid
        from hpctrain.pipeline.partition import partition
        rows = profile_blocks(self.blocks, self.task, self.sample, torch.device("cpu"), warmup=self.a.warmup,
                              repeats=self.a.repeats)
        self.costs = combine(self.comm.allgather(rows))
        self.plan = partition(self.costs, self.P, "time")
        self.grid = Grid(self.comm, self.P)
        s0, s1 = self.plan.stages[self.grid.stage]
        self.mine = [blk for _, blk in self.blocks[s0:s1]]
        xs, grads = block_io(self.blocks, self.task, self.sample)
        self.x_in, self.g_out = xs[s0], grads[s1 - 1]
        self.first, self.last = s0 == 0, s1 == len(self.blocks)

    def time_mine(self, times: int) -> tuple[list[float], list[float]]:
        return time_stage(self.mine, self.task, self.sample, self.x_in, self.g_out, self.first, self.last, 0, times)

    def measure_stages(self, times: int = 1) -> None:
        """This rank's stage forward / backward on the sample, `times` samples each: alone (each stage in turn,
        the others asleep: the ideal's stage times), then all stages at once (what they cost sharing the machine)."""
        for s in range(self.P):
            if s == self.grid.stage:
                f, b = self.time_mine(times)
                self.alone[0].extend(f)
                self.alone[1].extend(b)
            sleep_barrier(self.comm)
        f, b = self.time_mine(times)
        self.concurrent[0].extend(f)
        self.concurrent[1].extend(b)
        sleep_barrier(self.comm)

    def build_steps(self) -> None:
        """The sequential peer (rank 0: its own copy of the whole model, built after the stage timings) and one
        PipelineStage per (schedule, M); optimizers with lr 0: the work of a step, weights unchanged."""
        import torch

        from hpctrain.engine.torch.pipeline.runtime import PipelineStage
        if self.rank == 0:
            ref = copy.deepcopy(self.model)
            self.ref_blocks = [blk for _, blk in self.task.blocks(ref)]
            self.ref_opt = torch.optim.SGD(ref.parameters(), lr=0.0, momentum=0.9)
        cpu = torch.device("cpu")
        self.runtimes = {(sch, M): PipelineStage(self.mine, self.grid, self.task, cpu, sch, M)
                         for sch in self.schedules for M in self.Ms}
        self.opt = torch.optim.SGD(self.first_runtime().params, lr=0.0, momentum=0.9)

    def first_runtime(self):
        return self.runtimes[(self.schedules[0], self.Ms[0])]

    def seq_step(self, M: int) -> None:
        """Rank 0: M micro-batches through the whole model, forward + backward, then the optimizer step."""
        self.ref_opt.zero_grad(set_to_none=False)
        for batch in self.batches[:M]:
            x = self.task.inputs(batch)
            for blk in self.ref_blocks:
                x = blk(x, batch)
            (self.task.loss(x, batch)[0] / M).backward()
        self.ref_opt.step()

    def pipe_step(self, M: int, sch: str) -> None:
        st = self.runtimes[(sch, M)]
        st.zero_grad()
        st.step(self.batches[:M])
        self.opt.step()

    def timed(self, fn, only_rank0: bool) -> float:
        """Seconds per call of fn, a.pipe_steps calls, on every rank or rank 0 alone; the step ends when the
        last rank is done."""
        runs = self.rank == 0 or not only_rank0
        sleep_barrier(self.comm)
        t = time.perf_counter()
        if runs:
            for _ in range(self.a.pipe_steps):
                fn()
        el = (time.perf_counter() - t) / self.a.pipe_steps
        sleep_barrier(self.comm)
        return max(self.comm.allgather(el if runs else 0.0))

    def run(self) -> tuple[dict, dict]:
        """({M: sequential step seconds}, {(schedule, M): pipelined step seconds}), one sample per repeat;
        round 0 is the warm-up (smallest M: every code path, least time)."""
        seq = {M: [] for M in self.Ms}
        pipe = {k: [] for k in self.runtimes}
        t_all = time.perf_counter()
        for rep in range(1 + self.a.pipe_repeats):
            if rep:
                self.measure_stages()
            for M in (self.Ms if rep else [min(self.Ms)]):
                v = self.timed(partial(self.seq_step, M), only_rank0=True)
                if rep:
                    seq[M].append(v)
                for sch in self.schedules:
                    v = self.timed(partial(self.pipe_step, M, sch), only_rank0=False)
                    if rep:
                        pipe[(sch, M)].append(v)
            if self.rank == 0:
                print(f"[B] repeat {rep}/{self.a.pipe_repeats} done ({time.perf_counter() - t_all:.0f}s)", flush=True)
        return seq, pipe

    def gather(self) -> dict:
        """Every rank's median stage times, in-flight peaks and gradient bytes (collective; peaks on rank 0 only)."""
        med = statistics.median
        return {"alone": self.comm.allgather((med(self.alone[0]), med(self.alone[1]))),
                "concurrent": self.comm.allgather((med(self.concurrent[0]), med(self.concurrent[1]))),
                "peaks": self.comm.gather({f"{k[0]},{k[1]}": st.peak_in_flight for k, st in self.runtimes.items()},
                                          root=0),
                "grad_bytes": self.comm.allgather(self.first_runtime().flat.numel() * 4)}


def result_row(sch: str, M: int, pipe_s: list[float], seq_s: list[float], stages: dict, micro_batch: int) -> dict:
    """One (schedule, M): speedup and efficiency against the sequential peer, and the ideals they compare to."""
    from hpctrain.pipeline.schedule import simulate
    alone, concurrent = stages["alone"], stages["concurrent"]
    P = len(alone)
    tot = [f + b for f, b in alone]
    ctot = [f + b for f, b in concurrent]
    sp, sp_ci = stats([sq / pp for sq, pp in zip(seq_s, pipe_s)])
    rate, rate_ci = stats([1 / x for x in pipe_s])
    pipe_mean, pipe_ci = stats(pipe_s)
    seq_mean, seq_ci = stats(seq_s)
    ideal = M / (M + P - 1) * (sum(tot) / P) / max(tot)
    # Stages slowed by running at the same time (shared cores, memory, other users' jobs) while the
    # sequential peer runs alone: the pipeline can at best reach this.
    ideal_conc = M * sum(tot) / ((M + P - 1) * max(ctot)) / P
    makespan = simulate(sch, P, M, [f for f, _ in alone], [b for _, b in alone])
    sim_ideal = M * sum(tot) / makespan / P
    sim_conc = M * sum(tot) / simulate(sch, P, M, [f for f, _ in concurrent], [b for _, b in concurrent]) / P
    eff = sp / P
    return {"schedule": sch, "M": M, "pipelined_step_s": pipe_mean, "pipelined_step_ci95": pipe_ci,
            "steps_per_s": rate, "steps_per_s_ci95": rate_ci, "samples_per_s": rate * M * micro_batch,
            "sequential_step_s": seq_mean, "sequential_step_ci95": seq_ci,
            "speedup": sp, "speedup_ci95": sp_ci, "efficiency": eff, "efficiency_ci95": sp_ci / P,
            "ideal_efficiency": ideal, "simulated_makespan_s": makespan, "simulated_ideal_efficiency": sim_ideal,
            "efficiency_vs_ideal": eff / ideal, "efficiency_vs_simulated_ideal": eff / sim_ideal,
            "contended_ideal_efficiency": ideal_conc, "contended_simulated_ideal_efficiency": sim_conc,
            "efficiency_vs_contended_simulated_ideal": eff / sim_conc,
            "peak_in_flight_per_stage": [p[f"{sch},{M}"] for p in stages["peaks"]],
            "raw_pipelined_s": pipe_s, "raw_sequential_s": seq_s}


def result(bench: PipeBench, stages: dict, rows: list[dict]) -> dict:
    """Part B's result: settings, the plan, per-stage figures and the rows."""
    a, plan, costs = bench.a, bench.plan, bench.costs
    names = [n for n, _ in bench.blocks]
    alone, concurrent = stages["alone"], stages["concurrent"]
    return {
        "model": a.pipe_arch, "image_size": a.pipe_image_size, "micro_batch": a.pipe_micro_batch, "P": bench.P, "D": 1,
        "threads_per_rank": 1, "steps_per_repeat": a.pipe_steps, "repeats": a.pipe_repeats,
        "plan": {"method": "time", "stages": [[s, e] for s, e in plan.stages],
                 "stage_blocks": [f"{names[s]}..{names[e - 1]}" for s, e in plan.stages],
                 "predicted_stage_ms": [x * 1e3 for x in plan.stage_times], "predicted_balance": plan.balance},
        "stage_grad_bytes": stages["grad_bytes"],
        "cut_activation_bytes": [costs[e - 1].act_bytes for _, e in plan.stages[:-1]],
        "stage_fwd_ms_alone": [f * 1e3 for f, _ in alone], "stage_bwd_ms_alone": [b * 1e3 for _, b in alone],
        "stage_ms_alone": [(f + b) * 1e3 for f, b in alone],
        "stage_ms_concurrent": [(f + b) * 1e3 for f, b in concurrent],
        "stage_time_samples": len(bench.alone[0]),
        "rows": rows}


def worker_pipe(a, result_path: str) -> None:
    """Part B on this rank; rank 0 writes the result to result_path."""
    bench = PipeBench(a)
    bench.measure_stages(max(1, a.stage_repeats))  # then one more sample of each inside every repeat
    bench.build_steps()
    seq, pipe = bench.run()
    stages = bench.gather()
    if bench.rank != 0:
        return
    rows = [result_row(sch, M, times, seq[M], stages, a.pipe_micro_batch) for (sch, M), times in pipe.items()]
    Path(result_path).write_text(json.dumps(result(bench, stages, rows)))
