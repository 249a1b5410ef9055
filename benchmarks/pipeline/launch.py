"""Parts B and C from the driver: each is an mpirun of this package's workers (`--worker pipe|reduce`), which
write their result to a temporary file the driver reads back."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.pipeline.options import worker_args
from benchmarks.pipeline.reduce_worker import pass_name

ROOT = Path(__file__).resolve().parents[2]


def mpirun(np_: int, args: list[str], timeout: int) -> tuple[bool, str]:
    """`mpirun -np np_ python -m benchmarks.pipeline ARGS` from the repository root; (ok, stdout or why not).
    The workers' [B] / [C] progress lines are echoed."""
    cmd = ["mpirun", "-np", str(np_), "--oversubscribe", "--bind-to", "none",
           sys.executable, "-m", "benchmarks.pipeline", *args]
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


def part_b(a) -> dict:
    """Part B's result, or {"error": why} when its mpirun failed."""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "b.json"
        ok, text = mpirun(a.pipe_stages, ["--worker", "pipe", "--result", str(path), *worker_args(a)],
                          timeout=a.timeout)
        if not ok or not path.is_file():
            print(f"[B] failed: {text[-1500:]}", flush=True)
            return {"error": text}
        return json.loads(path.read_text())


def reducer_stage_sizes(result: dict, a) -> list[int]:
    """Part C's model point: the stage gradient bytes of part B's plan; if B was skipped or failed, those of
    the same model's P=2 time plan from part A, if there; else none."""
    sizes = result.get("pipeline", {}).get("stage_grad_bytes")
    if sizes:
        return sizes
    r = result.get("partition", {}).get(a.pipe_arch, {}).get("P", {}).get("2")
    return r["methods"]["time"]["stage_param_bytes"] if r and a.pipe_arch == a.resnet else []


def part_c(a, stage_sizes: list[int]) -> dict:
    """Part C's result: one mpirun per Horovod pass, merged; a failed pass is recorded under its name."""
    merged = {"np": 4, "P": 2, "D": 2, "threads_per_rank": 1, "repeats": a.reduce_repeats, "horovod_cycle_time_env": {},
              "horovod_errors": {}, "rows": [], "ratios": [],
              "note": "one mpirun per Horovod configuration; horovod_default_cycle = HOROVOD_CYCLE_TIME unset, what "
                      "--pipeline-allreduce horovod runs with (the pipeline path never sets it)"}
    for cycle in [a.hvd_cycle_ms] + ([0.0] if a.hvd_default_pass and a.hvd_cycle_ms else []):
        with tempfile.TemporaryDirectory() as d:
            path = Path(d) / "c.json"
            args = ["--worker", "reduce", "--result", str(path), "--stage-sizes", ",".join(map(str, stage_sizes)),
                    *worker_args(a)]
            args[args.index("--hvd-cycle-ms") + 1] = str(cycle)
            ok, text = mpirun(4, args, timeout=a.timeout)
            part = json.loads(path.read_text()) if path.is_file() else {}
        name = pass_name(cycle)
        if not ok:
            print(f"[C] {name} failed: {text[-1500:]}", flush=True)
            merged["horovod_errors"][name + " (run)"] = text
            merged.setdefault("errors", {})[name] = text
        for k in ("rows", "ratios"):
            merged[k] += part.get(k, [])
        for k in ("horovod_cycle_time_env", "horovod_errors"):
            merged[k].update(part.get(k, {}))
    return merged
