"""Training throughput at np = 1..N: hpctrain (Horovod and DDP backends) beside a minimal plain-Horovod
loop, all on synthetic data, 1 thread per rank on CPU.

    python benchmarks/scaling.py --max-np 2 [--arch resnet18] [--image-size 64] [--steps 12]

Scaling efficiency E(n) = T(n) / (n T(1)) on total samples/s. hpctrain's throughput is the Trainer's
own epoch figure (first 2 steps excluded, like the peer). The plain loop runs twice: with Horovod's
default cycle time (what a user gets) and with hpctrain's CPU setting (the like-for-like peer).

The machine's ceiling for n ranks (`ceiling_no_comm`): the same plain step run by n processes that never
communicate (started together, timed over the same window, rates summed). Two processes on two cores
slow each other through memory bandwidth, caches and clock; that loss is the machine's, not ours.
Each row also gets `efficiency_vs_ceiling` = T(n) / ceiling(n): what the software controls.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.common import save_results  # noqa: E402


def mpirun(np_: int, args: list[str], env: dict | None = None) -> str:
    cmd = ["mpirun", "-np", str(np_), "--oversubscribe", "--bind-to", "none", sys.executable, *args]
    e = {**os.environ, "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
         "PYTHONPATH": f"{ROOT}:{os.environ.get('PYTHONPATH', '')}", **(env or {})}
    p = subprocess.run(cmd, cwd=ROOT, env=e, capture_output=True, text=True, timeout=900)
    if p.returncode != 0:
        raise SystemExit(f"error: {' '.join(cmd)} failed (rc {p.returncode}):\n{p.stderr[-2000:]}")
    return p.stdout


def hpctrain_rate(np_: int, a, backend: str) -> float:
    with tempfile.TemporaryDirectory() as run_dir:
        mpirun(np_, ["-m", "hpctrain.resnet", "--backend", backend, "--dataset", "synthetic", "--arch", a.arch,
                     "--image-size", str(a.image_size), "--batch-size", str(a.batch_size),
                     "--synthetic-size", str(np_ * a.batch_size * a.steps), "--epochs", "1", "--threads", "1",
                     "--workers", "0", "--eval-every-epoch", "false", "--tensorboard", "false",
                     "--progress", "never", "--log-every", str(a.steps), "--resume", "never",
                     "--warmup-epochs", "0", "--run-dir", run_dir])
        rows = [json.loads(line) for line in Path(run_dir, "metrics.jsonl").read_text().splitlines()]
        per_rank = next(r for r in rows if r["kind"] == "epoch")["samples_per_s_rank"]
        return per_rank * np_  # ranks move in lock-step (allreduce every step)


def plain_rate(np_: int, a, env: dict, extra: tuple = ()) -> float:
    out = mpirun(np_, ["benchmarks/plain_horovod.py", "--arch", a.arch, "--image-size", str(a.image_size),
                       "--batch-size", str(a.batch_size), "--steps", str(a.steps), *extra], env)
    return json.loads(out.strip().splitlines()[-1])["samples_per_s_total"]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--max-np", type=int, default=2)
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--tag", default="")
    a = p.parse_args()
    if a.steps < 4:
        raise SystemExit(f"error: --steps {a.steps}: need at least 4 (2 are warm-up)")
    runners = {"hpctrain_horovod": lambda n: hpctrain_rate(n, a, "horovod"),
               "hpctrain_ddp": lambda n: hpctrain_rate(n, a, "ddp"),
               "plain_horovod_cycle10ms": lambda n: plain_rate(n, a, {"HOROVOD_CYCLE_TIME": "10"}),
               "plain_horovod_default": lambda n: plain_rate(n, a, {}),
               "ceiling_no_comm": lambda n: plain_rate(n, a, {"HOROVOD_CYCLE_TIME": "10"}, ("--no-comm",))}
    rows = []
    for n in range(1, a.max_np + 1):
        for name, fn in runners.items():
            total = fn(n)
            rows.append({"engine": name, "np": n, "samples_per_s_total": total, "samples_per_s_rank": total / n})
            print(f"{name:>24} np={n}  {total:8.1f} samples/s total  {total / n:8.1f} per rank", flush=True)
    base = {r["engine"]: r["samples_per_s_total"] for r in rows if r["np"] == 1}
    ceiling = {r["np"]: r["samples_per_s_total"] for r in rows if r["engine"] == "ceiling_no_comm"}
    for r in rows:
        r["efficiency"] = r["samples_per_s_total"] / (r["np"] * base[r["engine"]])
        r["efficiency_vs_ceiling"] = r["samples_per_s_total"] / ceiling[r["np"]]
    by = {(r["engine"], r["np"]): r["samples_per_s_total"] for r in rows}
    ratios = {str(n): {"hpctrain_vs_plain_horovod_same_cycle": by["hpctrain_horovod", n] / by["plain_horovod_cycle10ms", n],
                       "hpctrain_vs_plain_horovod_default": by["hpctrain_horovod", n] / by["plain_horovod_default", n],
                       "hpctrain_horovod_vs_ddp": by["hpctrain_horovod", n] / by["hpctrain_ddp", n],
                       "hpctrain_horovod_vs_ceiling": by["hpctrain_horovod", n] / by["ceiling_no_comm", n],
                       "ceiling_vs_linear": by["ceiling_no_comm", n] / (n * by["ceiling_no_comm", 1])}
              for n in range(1, a.max_np + 1)}
    save_results("scaling", {"arch": a.arch, "image_size": a.image_size, "batch_size": a.batch_size,
                             "steps": a.steps, "threads_per_rank": 1, "rows": rows, "ratios": ratios},
                 a.out, a.tag, plot=plot)


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for engine in dict.fromkeys(r["engine"] for r in result["rows"]):
        pts = [(r["np"], r["samples_per_s_total"]) for r in result["rows"] if r["engine"] == engine]
        style = {"linestyle": "--", "color": "grey"} if engine == "ceiling_no_comm" else {}
        ax.plot(*zip(*pts), marker="o", label=engine, **style)
    nps = sorted({r["np"] for r in result["rows"]})
    one = next(r["samples_per_s_total"] for r in result["rows"] if r["engine"] == "hpctrain_horovod" and r["np"] == 1)
    ax.plot(nps, [one * n for n in nps], "k:", label="linear (hpctrain np=1)")
    ax.set_xlabel("ranks")
    ax.set_ylabel("samples/s (total)")
    ax.set_xticks(nps)
    ax.set_title(f"{result['arch']} {result['image_size']}px, batch {result['batch_size']}/rank, synthetic")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
