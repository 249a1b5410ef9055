"""Part C, one rank of `mpirun -np 4` (P = 2 stages x D = 2 replicas): a stage's replica gradient average,
MPIReducer vs HorovodReducer, both stages at once (see the package docstring). Rank 0 writes the result file.

One Horovod configuration per launch: in Horovod 0.28.1 a shutdown + init in the same process keeps the
previous cycle time when HOROVOD_CYCLE_TIME is removed, and with process sets the new instance sometimes
fails at once with "Horovod has been shut down", so each pass is its own mpirun."""
from __future__ import annotations

import json
import os
import time
from functools import partial
from pathlib import Path

from benchmarks.common import parse_bytes, stats


def pass_name(cycle_ms: float) -> str:
    """A Horovod pass's name: its cycle time, or horovod_default_cycle when HOROVOD_CYCLE_TIME is left unset."""
    return f"horovod_cycle{cycle_ms:g}ms" if cycle_ms else "horovod_default_cycle"


def set_cycle_time(cycle_ms: float) -> str:
    """HOROVOD_CYCLE_TIME for this pass (0: unset, what --pipeline-allreduce horovod runs with, since the
    pipeline path never sets it); returns the pass's name."""
    if cycle_ms:
        os.environ["HOROVOD_CYCLE_TIME"] = f"{cycle_ms:g}"
    else:
        os.environ.pop("HOROVOD_CYCLE_TIME", None)
    return pass_name(cycle_ms)


def start_horovod_reducer(comm, grid, hname: str):
    """(HorovodReducer checked on a probe, []), or (None, the errors) when it failed on any rank."""
    import torch

    from hpctrain.engine.torch.pipeline.runtime import HorovodReducer
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
        if comm.Get_rank() == 0:
            print(f"[C] {hname}: {'; '.join(errs)}", flush=True)
    return red, errs


def calls_for(comm, fn, budget_s: float) -> int:
    """Calls of fn that fit in budget_s (1..200, the fewest over all ranks), from one timed call after one warm-up."""
    from mpi4py import MPI
    fn()
    comm.Barrier()
    t = time.perf_counter()
    fn()
    one = max(time.perf_counter() - t, 1e-6)
    return comm.allreduce(max(1, min(200, int(budget_s / one))), op=MPI.MIN)


def time_point(comm, fns: dict, a) -> tuple[dict, dict]:
    """({engine: calls per repeat}, {engine: [seconds per call, one per repeat]}); the engines take turns
    inside every repeat."""
    per_repeat = a.reduce_budget_s / a.reduce_repeats
    calls = {n: calls_for(comm, f, per_repeat) for n, f in fns.items()}
    times = {n: [] for n in fns}
    for _ in range(a.reduce_repeats):
        for n, f in fns.items():
            comm.Barrier()
            t = time.perf_counter()
            for _ in range(calls[n]):
                f()
            times[n].append((time.perf_counter() - t) / calls[n])
    return calls, times


def point_row(hname: str, engine: str, label: str, everyone: list, calls: int) -> dict:
    """One engine at one point from every rank's (stage, bytes, times); both stages reduce at once, so the
    aggregate is the bytes of both over the slower stage's mean time."""
    import numpy as np
    per_stage = {}
    for st, nb, tm in everyone:
        per_stage.setdefault(st, (nb, []))[1].extend(tm[engine])
    stage_bw = {str(st): stats([nb / x / 1e9 for x in v]) for st, (nb, v) in per_stage.items()}
    slow = max(float(np.mean(v)) for _, v in per_stage.values())
    total = sum(nb for nb, _ in per_stage.values())
    bw, ci = stats([nb / x / 1e9 for nb, v in per_stage.values() for x in v])
    return {"pass": hname, "engine": "mpi" if engine == "mpi" else "horovod", "variant": engine, "point": label,
            "bytes_per_stage": [per_stage[k][0] for k in sorted(per_stage)], "time_s": slow,
            "algbw_GBps": bw, "algbw_ci95": ci, "per_stage_algbw_GBps": stage_bw,
            "aggregate_GBps": total / slow / 1e9, "calls_per_repeat": calls}


def horovod_vs_mpi(hname: str, points: list, rows: list[dict]) -> list[dict]:
    """Horovod's algbw over mpi's at every point where both ran."""
    ratios = []
    for label, _ in points:
        m = next((r for r in rows if r["point"] == label and r["engine"] == "mpi"), None)
        h = next((r for r in rows if r["point"] == label and r["engine"] == "horovod"), None)
        if m and h:
            ratios.append({"pass": hname, "point": label, "bytes_per_stage": m["bytes_per_stage"],
                           "horovod_vs_mpi": h["algbw_GBps"] / m["algbw_GBps"]})
    return ratios


def write_result(path: str, a, comm, grid, hname: str, errs: list[str], points: list, rows: list[dict]) -> None:
    Path(path).write_text(json.dumps({
        "np": comm.Get_size(), "P": 2, "D": grid.replicas, "threads_per_rank": 1, "repeats": a.reduce_repeats,
        "horovod_cycle_time_env": {hname: os.environ.get("HOROVOD_CYCLE_TIME")},
        "horovod_errors": {hname: "; ".join(errs)} if errs else {}, "rows": rows,
        "ratios": horovod_vs_mpi(hname, points, rows)}))


def worker_reduce(a, result_path: str, stage_sizes: list[int]) -> None:
    """Part C on this rank, one Horovod pass (a.hvd_cycle_ms); rank 0 rewrites the result after every point,
    so a later failure still leaves the points done."""
    import torch
    from mpi4py import MPI  # first: MPI belongs to mpi4py, Horovod initialises on top of it

    from hpctrain.engine.torch.pipeline.runtime import Grid, MPIReducer

    comm = MPI.COMM_WORLD
    rank = comm.Get_rank()
    torch.set_num_threads(1)
    grid = Grid(comm, 2)
    points = [(s, [parse_bytes(s)] * 2) for s in a.reduce_sizes.split(",") if s]
    if stage_sizes:
        points.append((f"{a.pipe_arch} stages", list(stage_sizes)))
    mpi = MPIReducer(grid)
    hname = set_cycle_time(a.hvd_cycle_ms)
    red, errs = start_horovod_reducer(comm, grid, hname)
    rows = []
    for label, sizes in points:
        nbytes = sizes[grid.stage]
        buf = torch.ones(nbytes // 4, dtype=torch.float32)
        fns = {"mpi": partial(mpi, buf)}
        if red is not None:
            fns[hname] = partial(red, buf)
        calls, times = time_point(comm, fns, a)
        everyone = comm.gather((grid.stage, nbytes, times), root=0)
        if rank != 0:
            continue
        for n in fns:
            row = point_row(hname, n, label, everyone, calls[n])
            rows.append(row)
            print(f"[C] {hname:>22} {n:>22} {label:>16}  {row['algbw_GBps']:7.3f} +/- {row['algbw_ci95']:.3f} GB/s",
                  flush=True)
        write_result(result_path, a, comm, grid, hname, errs, points, rows)
    if red is not None:
        red.hvd.shutdown()
    if rank == 0:
        write_result(result_path, a, comm, grid, hname, errs, points, rows)
