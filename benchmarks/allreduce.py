"""Allreduce bandwidth: hpctrain's gradient path beside raw Horovod, raw mpi4py, torch.distributed
(gloo on CPU, nccl on GPU) and a numpy copy, all in one run.

    mpirun -np 2 python benchmarks/allreduce.py [--min-bytes 4K] [--max-bytes 256M] [--out DIR] [--tf-strategy]

algbw = bytes / time; busbw = algbw x 2(n-1)/n (nccl-tests' definition: the traffic each link
carries in a ring). Each point: warm-up, then repeats of a timed loop; mean +/- 1.96 sd over repeats,
per rank and over all ranks; engines alternate within each repeat. Horovod variants (cycle time, fusion threshold,
fp16 compression) need
a fresh hvd.init, which works because mpi4py owns MPI (Horovod then leaves it initialised on shutdown).

--link-rate RATE (e.g. 1gbit, tc's units) names the rate of the slowest link between the ranks' hosts: every row
then also carries busbw / link rate (in a ring each rank sends and receives 2(n-1)/n of the message, so busbw
cannot pass the rate of one direction of a link), the physical limit beside the engines (see
benchmarks/network_allreduce.py, which runs this across hosts with shaped links).

--tf-strategy adds `tf_multiworker_ring`: the collective of hpctrain's TF `--backend multiworker`
(MultiWorkerMirroredStrategy, RING = gRPC, one worker per rank, built by hpctrain's own MultiWorkerBackend
with the TF_CONFIG it derives from this mpirun, on free ports), timed as one tf.function call of
`strategy.run(replica_context.all_reduce(SUM, x))` on a float32 tensor of the size: the replica-context
all-reduce Keras' optimizer issues inside `apply_gradients` in hpctrain's step. TensorFlow is imported only
with the flag, after torch/Horovod/gloo are up and before any TF op (the strategy must configure TF's
collectives first); TF sees no GPU (gpus=[]): on a GPU node this row is the CPU ring, not NCCL. Needs np >= 2.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from mpi4py import MPI  # first: MPI belongs to mpi4py, so Horovod can be re-initialised

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import parse_bytes, save_results, stats

COMM = MPI.COMM_WORLD


def calls_for(fn, budget_s: float) -> int:
    """Calls per repeat so one repeat lasts ~budget_s; every rank must run the same number."""
    for _ in range(2):
        fn()
    COMM.Barrier()
    t = time.perf_counter()
    fn()
    one = max(time.perf_counter() - t, 1e-6)
    return COMM.allreduce(max(1, min(200, int(budget_s / one))), op=MPI.MIN)


def timed_interleaved(fns: dict, repeats: int, budget_s: float) -> dict[str, list[float]]:
    """Seconds per call for each engine. Engines take turns inside every repeat, so a change in
    machine load during the run hits all of them alike (this machine is shared and noisy)."""
    calls = {name: calls_for(fn, budget_s / repeats) for name, fn in fns.items()}
    out = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            COMM.Barrier()
            t = time.perf_counter()
            for _ in range(calls[name]):
                fn()
            out[name].append((time.perf_counter() - t) / calls[name])
    return out


def tf_strategy_engine(cluster, port_base: int):
    """hpctrain's MultiWorkerBackend (RING on CPU) -> make(nbytes): a call that all-reduces nbytes of float32
    across the workers. Every rank calls this at the same point (the strategy starts one gRPC server each)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    from hpctrain.cluster import port_in_use
    from hpctrain.config import DistConfig
    from hpctrain.engine.tf.strategies import MultiWorkerBackend

    tf.config.set_visible_devices([], "GPU")
    tf.config.threading.set_intra_op_parallelism_threads(1)  # as torch here, and hpctrain's TF runtime at 1 thread
    tf.config.threading.set_inter_op_parallelism_threads(1)
    if not port_base:  # rank 0 picks base..base+n-1 free on its host; a fixed one collides with other jobs
        if COMM.Get_rank() == 0:
            port_base = next(b for b in range(42000, 60000, 97)
                             if not any(port_in_use(b + k) for k in range(COMM.Get_size())))
        port_base = COMM.bcast(port_base, root=0)
    backend = MultiWorkerBackend(DistConfig(framework="tf", backend="multiworker", collective="ring",
                                            port_base=port_base), cluster, gpus=[])
    strategy = backend.strategy

    @tf.function
    def all_reduce(x):
        # tf.identity: the replica's own tensor (the argument itself is placed on no device, and the
        # cross-device reduction then finds no destination)
        out = strategy.run(lambda t: tf.distribute.get_replica_context().all_reduce("SUM", tf.identity(t)),
                           args=(x,))
        return strategy.experimental_local_results(out)[0]

    def make(nbytes: int):
        x = tf.ones(nbytes // 4, dtype=tf.float32)
        got = float(all_reduce(x)[0])  # traces this shape; and proves the sum is really taken
        if got != COMM.Get_size():
            raise SystemExit(f"error: tf_multiworker_ring: SUM of ones over {COMM.Get_size()} workers gave {got}")
        return lambda: all_reduce(x)  # returns once the result is computed (eager, CPU)
    return make, {"collective": backend.collective, "port_base": port_base, "tensorflow": tf.__version__}


def engines(nbytes: int, device: torch.device, hvd, hpctrain_opt, gloo_ready: bool, tf_make=None):
    n = nbytes // 4
    a = np.ones(n, dtype=np.float32)
    b = np.empty_like(a)
    t = torch.ones(n, dtype=torch.float32, device=device)
    yield "numpy_copy", lambda: np.copyto(b, a)
    yield "mpi4py", lambda: COMM.Allreduce(a, b, op=MPI.SUM)
    yield "horovod", lambda: hvd.allreduce_(t, op=hvd.Average, name="raw")
    if hpctrain_opt is not None:
        param = hpctrain_opt.param_groups[0]["params"][0]
        param.grad = torch.ones(n, dtype=torch.float32, device=device)
        # synchronize() allreduces every gradient whose hook has not fired: the optimizer's own path.
        yield "hpctrain", hpctrain_opt.synchronize
    if gloo_ready:
        import torch.distributed as dist
        yield "torch_" + dist.get_backend(), lambda: dist.all_reduce(t)
    if tf_make is not None:
        yield "tf_multiworker_ring", tf_make(nbytes)


def horovod_variant(hvd, name: str, nbytes: int, device, env: dict, compression=None, pieces: int = 1):
    """Re-init Horovod with `env` and allreduce `pieces` tensors that add up to nbytes."""
    hvd.shutdown()
    os.environ.update(env)
    hvd.init()
    ts = [torch.ones(nbytes // 4 // pieces, device=device) for _ in range(pieces)]
    comp = compression or hvd.Compression.none

    def go():
        # Compress (a no-op for Compression.none), allreduce all pieces at once, decompress.
        packed = [comp.compress(x) for x in ts]
        handles = [hvd.allreduce_async_(c, op=hvd.Average, name=f"{name}.{i}") for i, (c, _) in enumerate(packed)]
        for h, (_, ctx) in zip(handles, packed):
            comp.decompress(hvd.synchronize(h), ctx)
    return go


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--min-bytes", default="4K")
    p.add_argument("--max-bytes", default="256M")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--budget-s", type=float, default=1.0, help="seconds per (engine, size) point, roughly")
    p.add_argument("--variant-sizes", default="1M,16M,64M", help="sizes for the Horovod variants")
    p.add_argument("--tf-strategy", action="store_true",
                   help="also time the MultiWorkerMirroredStrategy RING collective of hpctrain's TF engine (np >= 2)")
    p.add_argument("--tf-port-base", type=int, default=0,
                   help="--tf-strategy: worker k listens on base + k (0: rank 0 finds free ports)")
    p.add_argument("--link-rate", default="",
                   help="the slowest link's rate between the ranks' hosts (e.g. 1gbit): rows get busbw / link rate")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--tag", default="")
    a = p.parse_args()
    link_GBps = link_rate_GBps(a.link_rate, p) if a.link_rate else None

    import horovod.torch as hvd

    from hpctrain.cluster import detect
    from hpctrain.config import DistConfig
    from hpctrain.engine.torch.backends import build_backend

    start_env = {k: v for k, v in os.environ.items() if k.startswith("HOROVOD_")}
    cluster = detect()
    n, rank = COMM.Get_size(), COMM.Get_rank()
    device = torch.device("cuda", cluster.local_rank) if torch.cuda.is_available() else torch.device("cpu")
    torch.set_num_threads(1)
    # hpctrain's path, with hpctrain's defaults (its backend sets Horovod's cycle time on CPU).
    backend = build_backend(DistConfig(backend="horovod"), cluster, device)
    gloo = False
    if n > 1:
        import torch.distributed as dist

        from hpctrain.engine.torch.backends.ddp import _rendezvous
        addr, port = _rendezvous(cluster)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"tcp://{addr}:{port}",
                                rank=rank, world_size=n)
        gloo = True
    tf_make, tf_info = None, None
    if a.tf_strategy and n > 1:
        tf_make, tf_info = tf_strategy_engine(cluster, a.tf_port_base)
    elif a.tf_strategy and rank == 0:
        print("--tf-strategy: skipped at np=1 (MultiWorkerMirroredStrategy needs >= 2 workers)", flush=True)

    sizes, s = [], parse_bytes(a.min_bytes)
    while s <= parse_bytes(a.max_bytes):
        sizes.append(s)
        s *= 4
    rows = []

    def record(engine, nbytes, per_call):
        all_ranks = COMM.gather(per_call, root=0)
        if rank != 0:
            return
        flat = [x for r in all_ranks for x in r]
        alg = [nbytes / x / 1e9 for x in flat]
        bus_factor = 1.0 if engine == "numpy_copy" else 2 * (n - 1) / n if n > 1 else 1.0
        mean, ci = stats(alg)
        rows.append({"engine": engine, "bytes": nbytes, "time_s": float(np.mean(flat)),
                     "algbw_GBps": mean, "algbw_ci95": ci, "busbw_GBps": mean * bus_factor,
                     "busbw_ci95": ci * bus_factor,
                     "per_rank_algbw_GBps": [stats([nbytes / x / 1e9 for x in r]) for r in all_ranks]})
        if link_GBps and engine != "numpy_copy":
            rows[-1]["busbw_vs_link"] = mean * bus_factor / link_GBps
        print(f"{engine:>22} {nbytes:>11} B  algbw {mean:7.3f} +/- {ci:.3f} GB/s  busbw {mean * bus_factor:7.3f}",
              flush=True)

    for nbytes in sizes:
        model = torch.nn.Linear(1, 1)  # placeholder shape; the one parameter is replaced below
        model.weight = torch.nn.Parameter(torch.zeros(nbytes // 4, device=device))
        del model.bias
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        _, hopt = backend.wrap(model, opt)
        for engine, per_call in timed_interleaved(dict(engines(nbytes, device, hvd, hopt, gloo, tf_make)),
                                                  a.repeats, a.budget_s).items():
            record(engine, nbytes, per_call)
        hvd.allreduce(torch.zeros(1), name=f"sync.{nbytes}")  # keep ranks in step between sizes

    # Horovod variants, each in its own init; 16 pieces so the fusion buffer has something to fuse.
    # The fusion threshold cannot be varied here: changing HOROVOD_FUSION_THRESHOLD between
    # shutdown and re-init segfaults Horovod 0.28.1, so compare it across runs instead
    # (HOROVOD_FUSION_THRESHOLD=1024 mpirun ... --tag nofusion); the env is recorded in the result.
    variants = [("hvd_cycle1ms", {"HOROVOD_CYCLE_TIME": "1"}, None, 16),
                ("hvd_cycle10ms", {"HOROVOD_CYCLE_TIME": "10"}, None, 16),
                ("hvd_cycle1ms_fp16", {"HOROVOD_CYCLE_TIME": "1"}, "fp16", 16)]
    for name, env, comp, pieces in variants:
        for nbytes in [parse_bytes(x) for x in a.variant_sizes.split(",")]:
            fn = horovod_variant(hvd, name, nbytes, device, env,
                                 hvd.Compression.fp16 if comp == "fp16" else None, pieces)
            record(name, nbytes, timed_interleaved({name: fn}, a.repeats, a.budget_s)[name])

    hvd.shutdown()
    if rank == 0:
        hvd_env = {k: v for k, v in os.environ.items() if k.startswith("HOROVOD_")}
        save_results("allreduce", {"np": n, "device": str(device), "horovod_env_at_start": start_env,
                                   "horovod_env_at_end": hvd_env, "tf_strategy": tf_info, "rows": rows,
                                   "link_rate": a.link_rate or None, "link_GBps": link_GBps,
                                   "ratios": ratios(rows)}, a.out, a.tag, plot=plot)


def link_rate_GBps(rate: str, parser) -> float:
    """'1gbit' -> 0.125 (GB/s), tc's units (the network hosts' own parser)."""
    from tests.network.hosts import rate_bits
    try:
        bits = rate_bits(rate)
    except ValueError as e:
        parser.error(f"--link-rate: {e}")
    if not bits > 0:
        parser.error(f"--link-rate {rate!r}: must be above 0")
    return bits / 8 / 1e9


def ratios(rows) -> dict:
    """Per size: hpctrain / horovod, best engine / numpy copy, with --link-rate the best engine / link rate (and
    which engine), and with --tf-strategy the TF ring / horovod and / mpi4py (busbw)."""
    by = {(r["engine"], r["bytes"]): r["busbw_GBps"] for r in rows}
    out = {}
    for nbytes in sorted({r["bytes"] for r in rows}):
        if ("hpctrain", nbytes) in by and ("horovod", nbytes) in by:
            best = max(v for (e, b), v in by.items() if b == nbytes and e != "numpy_copy")
            out[str(nbytes)] = {"hpctrain_vs_horovod": by["hpctrain", nbytes] / by["horovod", nbytes],
                                "best_engine_vs_numpy_copy": best / by["numpy_copy", nbytes],
                                "mpi4py_vs_horovod": by["mpi4py", nbytes] / by["horovod", nbytes]}
            # compressed variants move half the bytes: their busbw (of the uncompressed size) can pass the link
            links = {e: r["busbw_vs_link"] for r in rows for e in [r["engine"]]
                     if r["bytes"] == nbytes and "busbw_vs_link" in r and "fp16" not in e}
            if links:
                engine = max(links, key=links.get)
                out[str(nbytes)].update(best_engine_vs_link=links[engine], best_engine=engine)
            if ("tf_multiworker_ring", nbytes) in by:
                tf_ring = by["tf_multiworker_ring", nbytes]
                out[str(nbytes)].update(tf_multiworker_ring_vs_horovod=tf_ring / by["horovod", nbytes],
                                        tf_multiworker_ring_vs_mpi4py=tf_ring / by["mpi4py", nbytes])
    return out


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 5))
    for engine in dict.fromkeys(r["engine"] for r in result["rows"]):
        pts = [(r["bytes"], r["busbw_GBps"], r["busbw_ci95"]) for r in result["rows"] if r["engine"] == engine]
        x, y, e = zip(*pts)
        ax.errorbar(x, y, yerr=e, marker="o", capsize=3, label=engine,
                    linestyle="--" if engine.startswith("hvd_") else "-")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("message size (bytes)")
    ax.set_ylabel("bus bandwidth (GB/s); numpy_copy: algbw")
    ax.set_title(f"allreduce, np={result['np']}, {result['machine']['cpu_model'][:40]}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
