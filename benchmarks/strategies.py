"""Which strategy for which network: the wall time each synchronization strategy takes to reach an accuracy
target, the bytes that crossed the links and the memory per rank, side by side on hosts with shaped links.

    sudo python benchmarks/strategies.py [--task resnet|bert] [--hosts 2,4] [--rates 1gbit,10gbit] [--slow-host [only]]
        [--strategies all | NAME,...] [--target T] [--epochs E] [--eval-every N] [--full]

Tasks (`--task`), each with its own target, cap and evaluation interval (the flags override them):
  resnet  (default) the demo task (configs/demo.toml: ResNet-18 on the built-in shapes, AdamW, batch 32 per
          replica, the LR rule of the config) to val top-1 >= 0.85 within 2 epochs, evaluated every 20 steps.
  bert    BERT-tiny MLM on the built-in corpus (configs/bert_tiny.toml: seq 128, AdamW 1e-3, batch 32 per replica,
          the same LR at every world size), prepared once before any row, to validation MLM loss <= 6.0 within
          16 epochs, evaluated every 12 steps. The target comes from plain allreduce on Horovod, 4 hosts at
          1 Gbit/s, trained to the cap (`--full`): 7.41 at step 12, 6.17 at 36, 6.00 at 120, 5.91 at the cap's
          192 (12 steps an epoch at 4 replicas): the loss it reaches in under two thirds of the cap.

Every row trains the task with the same seed with one rank per host, started by mpirun on host1 over ssh, the hosts
being the network test tier's emulated ones (tests/network/hosts.py: a network namespace per host, its own name,
address and sshd, a tbf-shaped link to one bridge; needs root). `--slow-host` adds a network per host count and
rate where the last host's link runs at a tenth of the rate (`--slow-host only`: that network alone). The parameter
server's rows add one rank, the server, on the last host (the workers are the same replicas as every other row's).
No strategy gets its own LR: each runs the config's, as a user would start.

Per row: seconds from the launch to the first evaluation that meets --target (every --eval-every steps and at
each epoch's end; "not reached" within --epochs), the steps to it, the metric's last value, the bytes each host's
link sent (its interface counters: everything, start-up and evaluations included) beside the bytes the backend
reports handing to its training collectives, peak RSS per rank, the optimizer state the largest rank holds (ZeRO-1's
share against an unsharded row's in the summary, beside 1/N) and the training throughput. A row stops at the
target unless --full (then its whole curve of the metric against wall time is kept; the last evaluation of a
stopped row can be one past the target's, taken while the job stopped).

Strategies (`--strategies all`, or names): allreduce_horovod, allreduce_mpi, allreduce_ddp, horovod_fp16,
local_sgd_k4, local_sgd_k16, powersgd_r1, powersgd_r4, zero1, ps_sync, ps_async_s2, gossip.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.common import save_results  # noqa: E402
from benchmarks.network_allreduce import host_env  # noqa: E402
from tests.network.hosts import Hosts, HostsError, ensure_installed, rate_bits  # noqa: E402

TASKS = {  # module, config, the metric an evaluation record gives, whether higher is better, target, cap, interval
    "resnet": {"module": "hpctrain.resnet", "config": "configs/demo.toml", "metric": "val_top1", "higher": True,
               "target": 0.85, "epochs": 2, "eval_every": 20},
    "bert": {"module": "hpctrain.bert", "config": "configs/bert_tiny.toml", "metric": "val_loss", "higher": False,
             "target": 6.0, "epochs": 16, "eval_every": 12},
}
BERT_VOCAB, BERT_SEQ = 8000, 128  # configs/bert_tiny.toml's

MPI = ["--backend", "mpi"]
STRATEGIES = {
    "allreduce_horovod": ["--backend", "horovod"],
    "allreduce_mpi": MPI,
    "allreduce_ddp": ["--backend", "ddp"],
    "horovod_fp16": ["--backend", "horovod", "--fp16-allreduce"],
    "local_sgd_k4": [*MPI, "--sync", "local-sgd", "--sync-period", "4"],
    "local_sgd_k16": [*MPI, "--sync", "local-sgd", "--sync-period", "16"],
    "powersgd_r1": [*MPI, "--sync", "powersgd", "--powersgd-rank", "1"],
    "powersgd_r4": [*MPI, "--sync", "powersgd", "--powersgd-rank", "4"],
    "zero1": [*MPI, "--zero"],
    "ps_sync": [*MPI, "--sync", "ps", "--ps-servers", "1"],
    "ps_async_s2": [*MPI, "--sync", "ps", "--ps-servers", "1", "--ps-mode", "async", "--staleness", "2"],
    "gossip": [*MPI, "--sync", "gossip"],
}


def records(run_dir: Path, kind: str) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if r.get("kind") == kind]


def meets(value, a) -> bool:
    return value is not None and (value >= a.target if a.task_spec["higher"] else value <= a.target)


def reached(run_dir: Path, a) -> dict | None:
    return next((r for r in records(run_dir, "eval") if meets(r.get(a.metric), a)), None)


def train(hosts: Hosts, name: str, a, work: Path) -> dict:
    """One row: the strategy's training on every host, stopped at the target unless --full."""
    names = hosts.names
    ps = name.startswith("ps_")
    cmd = hosts.mpirun_prefix(names)
    if ps:  # one more rank, the server (the last rank), on the last host
        cmd[cmd.index("-np") + 1] = str(len(names) + 1)
        cmd[cmd.index("-H") + 1] = ",".join([*(f"{h}:1" for h in names[:-1]), f"{names[-1]}:2"])
    for var in ("PATH", "PYTHONPATH", "PYTHONUNBUFFERED", "OMP_NUM_THREADS"):
        cmd += ["-x", var]
    run_dir = work / name
    cmd += [sys.executable, "-m", a.task_spec["module"], "--config", a.config, *a.task_args, "--epochs", str(a.epochs),
            "--eval-every", str(a.eval_every), "--log-every", str(a.eval_every), "--run-dir", str(run_dir),
            "--progress", "never", "--tensorboard", "false", "--hang-timeout", "600", *STRATEGIES[name]]
    before = {h: hosts.counters(h)["tx"] for h in names}
    work.mkdir(parents=True, exist_ok=True)
    log = work / f"{name}.log"
    started = time.time()
    with open(log, "w") as f:
        job = hosts.popen("host1", cmd, cwd=ROOT, env=host_env(), stdout=f, stderr=subprocess.STDOUT,
                          start_new_session=True)
    hit = None
    try:
        while job.poll() is None:
            hit = hit or reached(run_dir, a)
            if hit and not a.full:
                os.killpg(job.pid, signal.SIGTERM)  # the row has its figure; the rest of the cap is not needed
                job.wait(timeout=60)
                break
            if time.time() - started > a.timeout:
                raise SystemExit(f"error: {name} ran past --timeout {a.timeout:.0f} s; its log: {log}")
            time.sleep(0.5)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()
    hit = hit or reached(run_dir, a)
    if not hit and job.returncode != 0:
        raise SystemExit(f"error: {name} failed (rc={job.returncode}); its log: {log}\n"
                         + log.read_text()[-2000:])
    sent = {h: hosts.counters(h)["tx"] - before[h] for h in names}
    evals, trains = records(run_dir, "eval"), records(run_dir, "train")
    rates = [r["samples_per_s_total"] for r in trains[1:]] or [r["samples_per_s_total"] for r in trains]
    return {"strategy": name, "flags": STRATEGIES[name], "ranks": len(names) + ps,
            "reached": hit is not None, "seconds_to_target": hit["time"] - started if hit else None,
            "steps_to_target": hit["step"] if hit else None, "metric_at_target": hit[a.metric] if hit else None,
            "metric_last": evals[-1][a.metric] if evals else None,
            "curve": [{"seconds": r["time"] - started, "step": r["step"], "value": r[a.metric]} for r in evals],
            "link_sent_bytes_per_host": sent,
            "backend_sent_bytes_per_replica": sum(r.get("sent_bytes", 0.0) for r in trains),
            "peak_rss_mib": max((r["peak_rss_mib"] for r in trains), default=None),
            "optimizer_state_mib_max": trains[-1].get("optimizer_state_mib_max") if trains else None,
            "samples_per_s": sum(rates) / len(rates) if rates else None}


def networks(a) -> list[dict]:
    out = []
    for n in a.host_counts:
        for rate in a.rate_list:
            if a.slow_host != "only":
                out.append({"hosts": n, "rate": rate, "slow": None})
            if a.slow_host:
                out.append({"hosts": n, "rate": rate, "slow": f"{rate_bits(rate) / 10 / 1e6:g}mbit"})
    return out


def one_network(net: dict, a, work: Path) -> dict:
    names = [f"host{i + 1}" for i in range(net["hosts"])]
    rates = {names[-1]: net["slow"]} if net["slow"] else {}
    hosts = Hosts(work / "hosts", names=names, rate=net["rate"], rates=rates)
    up = hosts.start(log=lambda m: print(m, file=sys.stderr))
    rows = []
    try:
        for name in a.strategy_list:
            row = train(hosts, name, a, work / f"{net['hosts']}-{net['rate']}-{net['slow'] or 'even'}")
            rows.append(row)
            took = f"{row['seconds_to_target']:.1f} s, step {row['steps_to_target']}" if row["reached"] else \
                "not reached"
            print(f"{net['hosts']} hosts {net['rate']}{' (slow ' + net['slow'] + ')' if net['slow'] else ''} "
                  f"{name:<18} target {took}; last {a.metric} {row['metric_last']}", flush=True)
    finally:
        hosts.stop()
    best = min((r for r in rows if r["reached"]), key=lambda r: r["seconds_to_target"], default=None)
    base = next((r for r in rows if r["strategy"] == "allreduce_horovod" and r["reached"]), None)
    summary = {"best": best["strategy"] if best else None,
               "best_vs_allreduce_horovod": best["seconds_to_target"] / base["seconds_to_target"]
               if best and base else None, **zero_share(rows, net["hosts"])}
    return {**net, "network_start_s": up, "rows": rows, "summary": summary}


def zero_share(rows: list[dict], n: int) -> dict:
    """ZeRO-1's optimizer state on its largest rank against an unsharded allreduce row's, beside 1/N."""
    held = {r["strategy"]: r["optimizer_state_mib_max"] for r in rows if r.get("optimizer_state_mib_max")}
    whole = next((held[s] for s in ("allreduce_mpi", "allreduce_horovod", "allreduce_ddp") if s in held), None)
    if "zero1" not in held or not whole:
        return {}
    return {"zero1_state_vs_unsharded": held["zero1"] / whole, "one_over_n": 1 / n}


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    nets = result["networks"]
    fig, axes = plt.subplots(2, len(nets), figsize=(5 * len(nets), 8), squeeze=False)
    for i, net in enumerate(nets):
        title = f"{net['hosts']} hosts, {net['rate']}" + (f", one at {net['slow']}" if net["slow"] else "")
        rows = net["rows"]
        ax = axes[0][i]
        ax.barh([r["strategy"] for r in rows], [r["seconds_to_target"] or 0 for r in rows],
                color=["C0" if r["reached"] else "lightgray" for r in rows])
        goal = f"{result['metric']} {'>=' if result['higher_is_better'] else '<='} {result['target']}"
        ax.set_xlabel(f"seconds to {goal} (gray: not reached)")
        ax.set_title(title)
        ax = axes[1][i]
        for r in rows:
            ax.plot([p["seconds"] for p in r["curve"]], [p["value"] for p in r["curve"]], marker=".",
                    label=r["strategy"])
        ax.axhline(result["target"], color="gray", linestyle="--", linewidth=0.8)
        ax.set_xlabel("wall seconds from launch")
        ax.set_ylabel(result["metric"])
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def prepare_corpus(cache: Path) -> str:
    from hpctrain.data.corpus import prepare_builtin
    from hpctrain.data.text import DataError
    try:
        prepare_builtin(str(cache), BERT_VOCAB, BERT_SEQ, log=lambda m: print(m, file=sys.stderr))
    except DataError as e:
        raise SystemExit(f"error: built-in corpus: {e}") from None
    return str(cache)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hosts", default="2,4", help="host counts, comma-separated (one rank per host)")
    p.add_argument("--rates", default="1gbit,10gbit", help="link rates, comma-separated, tc's units")
    p.add_argument("--slow-host", nargs="?", const="also", choices=("also", "only"),
                   help="also (or only) each network with its last host at rate / 10")
    p.add_argument("--strategies", default="all", help="all, or names comma-separated")
    p.add_argument("--task", choices=list(TASKS), default="resnet")
    p.add_argument("--config", help="the task's config (default: the task's)")
    p.add_argument("--target", type=float, help="the metric's value to reach (default: the task's)")
    p.add_argument("--epochs", type=int, help="the cap and the LR schedule's length (default: the task's)")
    p.add_argument("--eval-every", type=int, help="evaluate every N steps (default: the task's)")
    p.add_argument("--full", action="store_true", help="train every row to the cap (whole curves)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds for one row")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--tag", default="")
    a = p.parse_args()
    a.task_spec = TASKS[a.task]
    for key in ("config", "target", "epochs", "eval_every"):
        if getattr(a, key) is None:
            setattr(a, key, a.task_spec[key])
    a.metric, a.task_args = a.task_spec["metric"], []
    a.strategy_list = list(STRATEGIES) if a.strategies == "all" else a.strategies.split(",")
    unknown = [s for s in a.strategy_list if s not in STRATEGIES]
    if unknown:
        p.error(f"--strategies: unknown {', '.join(unknown)}; known: all, {', '.join(STRATEGIES)}")
    try:
        a.host_counts = [int(x) for x in a.hosts.split(",")]
        a.rate_list = a.rates.split(",")
        for rate in a.rate_list:
            rate_bits(rate)
    except ValueError as e:
        p.error(str(e))
    if any(n < 2 or n > 16 for n in a.host_counts):
        p.error(f"--hosts {a.hosts}: each count from 2 to 16")
    if (a.task_spec["higher"] and not 0 <= a.target <= 1) or a.target < 0 or a.epochs < 1 or a.eval_every < 1:
        span = "0..1" if a.task_spec["higher"] else ">= 0"
        p.error(f"--target {a.target} ({span}), --epochs {a.epochs} (>= 1), --eval-every {a.eval_every} (>= 1)")
    if os.geteuid() != 0:
        p.error("the hosts need root (network namespaces, tc, sshd)")
    started = time.time()
    try:
        ensure_installed(log=lambda m: print(m, file=sys.stderr))
        with tempfile.TemporaryDirectory(prefix="hpxs-") as work:
            if a.task == "bert":  # prepared before any row is timed; every row reads the same files
                a.task_args = ["--corpus", "builtin", "--corpus-cache", prepare_corpus(Path(work) / "corpus")]
            results = [one_network(net, a, Path(work)) for net in networks(a)]
    except HostsError as e:
        raise SystemExit(f"error: the hosts did not start: {e}") from None
    save_results("strategies", {"task": a.task, "config": a.config, "metric": a.metric,
                                "higher_is_better": a.task_spec["higher"], "target": a.target, "epochs": a.epochs,
                                "eval_every": a.eval_every, "full": a.full, "wall_s": time.time() - started,
                                "networks": results}, a.out, a.tag, plot=plot)


if __name__ == "__main__":
    main()
