"""The benchmark's settings: full-size defaults, --quick, the command line, and the arguments a worker gets."""
from __future__ import annotations

import argparse

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


def flag(key: str) -> str:
    return f"--{key.replace('_', '-')}"


def parse_args(argv: list[str] | None = None, description: str | None = None) -> argparse.Namespace:
    """The command line; every setting left out takes its DEFAULTS value (QUICK's with --quick)."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.pipeline", description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny settings (resnet18, BERT tiny, few repeats) for CI; "
                                                         "writes to a temp directory unless --out is given")
    p.add_argument("--out", default=None, help="result directory (default benchmarks/results; --quick: a temp dir)")
    p.add_argument("--parts", default="abc", help="which parts to run (a, b, c)")
    p.add_argument("--threads", type=int, default=1, help="torch threads for part A (B and C: 1 per rank)")
    p.add_argument("--timeout", type=int, default=900, help="seconds allowed for each mpirun")
    for k, v in DEFAULTS.items():
        p.add_argument(flag(k), type=type(v), default=None, help=f"default {v} (quick: {QUICK[k]})")
    p.add_argument("--worker", choices=["pipe", "reduce"], help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--stage-sizes", default="", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    for k, v in (QUICK if a.quick else DEFAULTS).items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    return a


def worker_args(a: argparse.Namespace) -> list[str]:
    """Every setting spelled out, so a worker started by mpirun runs with exactly the driver's values."""
    return [x for k in DEFAULTS for x in (flag(k), str(getattr(a, k)))]
