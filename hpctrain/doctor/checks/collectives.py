"""Allreduce and broadcast through Horovod and mpi4py (with 2+ ranks): verified on every rank against the known
result, timed by the slowest rank, reported as bus bandwidth (as nccl-tests)."""
from __future__ import annotations

import statistics
import time

from hpctrain.doctor.common import NOT_MPI, Context
from hpctrain.doctor.registry import Outcome, check

REPEATS = 5
NETWORK_FIX = "check the network between the nodes"
ALONE = ("collectives", "1 rank: run the doctor under the launcher to test allreduce/broadcast "
         "(mpirun -np 2 ..., srun --mpi=pmix -N 2 ...)")


def horovod_ops(ctx: Context, kind: str, send):
    import torch
    hvd, x = ctx.hvd, torch.from_numpy(send)
    op = (lambda: hvd.allreduce(x, op=hvd.Sum, name="doctor.allreduce")) if kind == "allreduce" else \
        (lambda: hvd.broadcast(x, root_rank=0, name="doctor.broadcast"))
    return op, hvd.barrier, lambda t: hvd.allreduce(torch.tensor(t), op=hvd.Max, name=f"doctor.{kind}.s").tolist()


def mpi_ops(ctx: Context, kind: str, send):
    import numpy as np
    from mpi4py import MPI
    comm, out = ctx.comm, np.empty_like(send)
    # Allreduce/Bcast return None: `or` hands back the buffer they filled
    op = (lambda: comm.Allreduce(send, out, op=MPI.SUM) or out) if kind == "allreduce" else \
        (lambda: comm.Bcast(send, root=0) or send)
    return op, comm.Barrier, lambda t: ctx.mpi_allreduce(t, "MAX")


def collective(ctx: Context, lib: str, kind: str) -> Outcome:
    import numpy as np
    c, nbytes = ctx.cluster, ctx.args.bytes
    if lib not in ctx.spans:
        reason = "not an MPI launch" if c.launcher in NOT_MPI else "see ranks"
        return "SKIP", f"{lib} does not connect the {c.size} launched ranks ({reason})", None
    base = (np.arange(max(1, nbytes // 4)) % 251).astype(np.float32)  # index-dependent: a shift shows
    if kind == "allreduce":
        send, want = base + (c.rank + 1), base * c.size + c.size * (c.size + 1) / 2
    else:
        send, want = (base + 0.5 if c.rank == 0 else np.zeros_like(base)), base + 0.5
    op, barrier, slowest = (horovod_ops if lib == "horovod" else mpi_ops)(ctx, kind, send)
    result = np.asarray(op())  # the warm-up (negotiation, buffers) gives the result to verify
    times = []
    for _ in range(REPEATS):
        barrier()
        t0 = time.perf_counter()
        op()
        times.append(time.perf_counter() - t0)
    seconds = statistics.median(slowest(times))
    wrong = np.flatnonzero(result != want)
    if wrong.size:
        i = int(wrong[0])
        return "FAIL", f"wrong result on rank {c.rank}: {wrong.size} of {want.size} values differ, first [{i}] " \
                       f"{result[i]} != {want[i]}", "the MPI transport corrupts data: report it to the admins"
    factor = 2 * (c.size - 1) / c.size if kind == "allreduce" else 1.0  # bus bandwidth, as nccl-tests
    if kind == "allreduce":  # the network check sets it beside the slowest link
        ctx.facts.setdefault("busbw", {})[lib] = nbytes * factor / seconds / 1e9
    return "PASS", f"result correct; busbw {nbytes * factor / seconds / 1e9:.2f} GB/s at " \
                   f"{nbytes / 2**20:g} MiB (median of {REPEATS}, slowest rank)", None


@check("horovod allreduce", order=120, min_ranks=2, alone=ALONE, error_fix=NETWORK_FIX)
def horovod_allreduce(ctx: Context) -> Outcome:
    return collective(ctx, "horovod", "allreduce")


@check("horovod broadcast", order=121, min_ranks=2, alone=ALONE, error_fix=NETWORK_FIX)
def horovod_broadcast(ctx: Context) -> Outcome:
    return collective(ctx, "horovod", "broadcast")


@check("mpi4py allreduce", order=122, min_ranks=2, alone=ALONE, error_fix=NETWORK_FIX)
def mpi4py_allreduce(ctx: Context) -> Outcome:
    return collective(ctx, "mpi4py", "allreduce")


@check("mpi4py broadcast", order=123, min_ranks=2, alone=ALONE, error_fix=NETWORK_FIX)
def mpi4py_broadcast(ctx: Context) -> Outcome:
    return collective(ctx, "mpi4py", "broadcast")
