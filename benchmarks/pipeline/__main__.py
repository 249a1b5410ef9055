"""python -m benchmarks.pipeline: runs the parts asked for, writes pipeline.json and pipeline.png; with --worker,
one rank of part B or C under mpirun (see the package docstring)."""
from __future__ import annotations

import datetime as dt
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

import benchmarks.pipeline as package
from benchmarks.common import machine_info
from benchmarks.pipeline.options import DEFAULTS, parse_args

ROOT = Path(__file__).resolve().parents[2]


def run_worker(a) -> None:
    """One rank of part B or C. An exception on some ranks would leave the others waiting forever: abort all."""
    from mpi4py import MPI
    try:
        if a.worker == "pipe":
            from benchmarks.pipeline.pipe_worker import worker_pipe
            worker_pipe(a, a.result)
        else:
            from benchmarks.pipeline.reduce_worker import worker_reduce
            worker_reduce(a, a.result, [int(x) for x in a.stage_sizes.split(",") if x])
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        MPI.COMM_WORLD.Abort(1)


def run_parts(a, result: dict) -> tuple[dict, dict]:
    """Adds the parts in a.parts to result; returns (seconds per part, load averages after each)."""
    from benchmarks.pipeline.balance import part_a
    from benchmarks.pipeline.launch import part_b, part_c, reducer_stage_sizes
    timings = {}
    load = {"start": os.getloadavg()}  # other jobs may share the machine: context for every number below
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
        sizes = reducer_stage_sizes(result, a)
        print(f"[C] mpirun -np 4: reducers on {a.reduce_sizes} + stage sizes {sizes} ...", flush=True)
        result["reducers"] = part_c(a, sizes)
        load["after_c"] = os.getloadavg()
        timings["c_s"] = time.perf_counter() - t
    return timings, load


def out_dir(a) -> Path:
    if a.out:
        return Path(a.out)
    return Path(tempfile.mkdtemp(prefix="pipeline-quick-")) if a.quick else ROOT / "benchmarks" / "results"


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv, description=package.__doc__)
    if a.worker:
        return run_worker(a)
    from benchmarks.pipeline.report import plot, summary
    out = out_dir(a)
    settings = {k: getattr(a, k) for k in DEFAULTS} | {"quick": a.quick, "threads_part_a": a.threads}
    t0 = time.perf_counter()
    result = {"benchmark": "pipeline", "date": dt.datetime.now().isoformat(timespec="seconds"),
              "machine": machine_info(), "settings": settings}
    timings, load = run_parts(a, result)
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
