"""Allreduce against the physical limit: benchmarks/allreduce.py run across hosts, one rank per host, every host's
link shaped to one rate; each engine's bus bandwidth as a ratio of that rate, in one result file.

    python benchmarks/network_allreduce.py [--hosts 2,4] [--rates 1gbit,10gbit] [--max-bytes 64M]

The hosts are the network test tier's emulated ones (tests/network/hosts.py: a network namespace per host with its
own name, address, sshd and a tbf-shaped veth link to one bridge; needs root, iproute2, openssh-server): a host's
link carries at most the rate in each direction, which is the ceiling of a ring's bus bandwidth. mpirun is started
on host1 and reaches the others over ssh, as a user on a cluster's login node would. Per (hosts, rate): the
allreduce.py rows (numpy copy, mpi4py, Horovod over MPI, hpctrain's gradient path, torch.distributed gloo, the
Horovod variants at --variant-sizes) with `busbw_vs_link`, and a summary of the best engine per size. Not measured
here: Horovod over Gloo (horovodrun --gloo; the network tier runs it for correctness).

On 2 cores, at 10 Gbit/s the CPU (the copies and reductions of two processes per host pair, the veth and tbf
work of the kernel) is the limit, not the link: the ratio says how far.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.common import save_results  # noqa: E402
from tests.network.hosts import Hosts, HostsError, ensure_installed, rate_bits  # noqa: E402


def host_env() -> dict:
    """The venv's tools first, this checkout importable, Open MPI allowed as root, no launcher identity inherited."""
    e = {k: v for k, v in os.environ.items() if not k.startswith(("OMPI_COMM_WORLD", "SLURM_", "PMIX_", "PMI_"))}
    e["PATH"] = f"{Path(sys.executable).parent}:{e.get('PATH', '')}"
    e["PYTHONPATH"] = f"{ROOT}:{e.get('PYTHONPATH', '')}"
    e.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", OMPI_ALLOW_RUN_AS_ROOT="1",
             OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", OMPI_MCA_rmaps_base_oversubscribe="1")
    return e


def one(n: int, rate: str, a, work: Path) -> dict:
    """allreduce.py on n hosts whose links run at `rate`; its result, with the network's start time."""
    names = [f"host{i + 1}" for i in range(n)]
    hosts = Hosts(work / f"h{n}", names=names, rate=rate)
    started = hosts.start(log=lambda m: print(m, file=sys.stderr))
    try:
        out = work / f"out-{n}-{rate}"
        cmd = hosts.mpirun_prefix(names)
        for var in ("PATH", "PYTHONPATH", "PYTHONUNBUFFERED", "OMP_NUM_THREADS"):
            cmd += ["-x", var]
        cmd += [sys.executable, str(ROOT / "benchmarks" / "allreduce.py"), "--link-rate", rate,
                "--min-bytes", a.min_bytes, "--max-bytes", a.max_bytes, "--variant-sizes", a.variant_sizes,
                "--repeats", str(a.repeats), "--budget-s", str(a.budget_s), "--out", str(out), "--tag", "run"]
        print(f"== {n} hosts at {rate} (network up in {started:.1f} s)", flush=True)
        before = {h: hosts.counters(h) for h in names}
        p = hosts.run("host1", cmd, cwd=ROOT, env=host_env(), timeout=a.timeout, capture_output=False)
        if p.returncode != 0:
            raise SystemExit(f"error: allreduce.py on {n} hosts at {rate} failed (rc={p.returncode})")
        after = {h: hosts.counters(h) for h in names}
    finally:
        hosts.stop()
    result = json.loads(next(out.glob("*.json")).read_text())
    result["network"] = {"hosts": names, "rate": rate, "start_s": started,
                         "sent_bytes_per_host": {h: after[h]["tx"] - before[h]["tx"] for h in names}}
    return result


def summary(results: list[dict]) -> list[dict]:
    """Per (hosts, rate, size >= 1 MiB): the best engine's busbw / link rate, and Horovod's, mpi4py's, hpctrain's."""
    out = []
    for r in results:
        for size, ratio in r["ratios"].items():
            if "best_engine_vs_link" not in ratio or int(size) < 2**20:
                continue
            by = {row["engine"]: row.get("busbw_vs_link") for row in r["rows"] if row["bytes"] == int(size)}
            out.append({"hosts": r["np"], "rate": r["link_rate"], "bytes": int(size),
                        "best_engine": ratio["best_engine"], "best_vs_link": ratio["best_engine_vs_link"],
                        **{f"{e}_vs_link": by.get(e) for e in ("horovod", "mpi4py", "hpctrain", "torch_gloo")}})
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hosts", default="2,4", help="host counts, comma-separated (one rank per host)")
    p.add_argument("--rates", default="1gbit,10gbit", help="link rates, comma-separated, tc's units")
    p.add_argument("--min-bytes", default="64K")
    p.add_argument("--max-bytes", default="64M")
    p.add_argument("--variant-sizes", default="16M")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--budget-s", type=float, default=1.0)
    p.add_argument("--timeout", type=float, default=900, help="seconds for one (hosts, rate) run")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--tag", default="")
    a = p.parse_args()
    if os.geteuid() != 0:
        p.error("the hosts need root (network namespaces, tc, sshd)")
    try:
        counts = [int(x) for x in a.hosts.split(",")]
        rates = a.rates.split(",")
        for rate in rates:
            rate_bits(rate)
    except ValueError as e:
        p.error(str(e))
    if any(n < 2 or n > 16 for n in counts):
        p.error(f"--hosts {a.hosts}: each count from 2 to 16")
    try:
        ensure_installed(log=lambda m: print(m, file=sys.stderr))
        with tempfile.TemporaryDirectory(prefix="hpxt-") as work:
            results = [one(n, rate, a, Path(work)) for n in counts for rate in rates]
    except HostsError as e:
        raise SystemExit(f"error: the hosts did not start: {e}") from None
    table = summary(results)
    for row in table:
        print(f"{row['hosts']} hosts {row['rate']:>7} {row['bytes']:>10} B  best {row['best_engine']:<16} "
              f"{row['best_vs_link']:.3f} of the link", flush=True)
    save_results("network-allreduce", {"hosts": counts, "rates": rates, "summary": table, "runs": results},
                 a.out, a.tag)


if __name__ == "__main__":
    main()
