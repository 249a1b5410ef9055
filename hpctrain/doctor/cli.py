"""`python -m hpctrain.doctor`: flags, the launch, every rank's checks, the gather to rank 0, the verdict."""
from __future__ import annotations

import os
import sys
import warnings
from dataclasses import asdict

from hpctrain import image, netiface, recipes
from hpctrain.cluster import ClusterEnv, detect
from hpctrain.doctor import checks as _registered  # noqa: F401  (importing registers every check)
from hpctrain.doctor.common import Check, Context
from hpctrain.doctor.deadline import Deadline
from hpctrain.doctor.launch import command
from hpctrain.doctor.registry import registered, run_checks
from hpctrain.doctor.report import merge, report
from hpctrain.errors import UserError
from hpctrain.oneline import OneLineParser

PROG = "hpctrain.doctor"
MISSING_FIX = ("a rank is missing or stuck: check that every rank started and that the nodes reach each other "
               "(a check that is only slow here needs a longer --timeout)")


def parse_args(argv):
    p = OneLineParser(prog=PROG, description="Preflight checks of this installation on this cluster; run alone "
                      "or under mpirun/horovodrun/srun (rank 0 prints).")
    p.add_argument("--run-dir", default="runs/default", help="directory to write-test (default: runs/default)")
    p.add_argument("--json", action="store_true", help="print one JSON document instead of lines")
    p.add_argument("--json-file", metavar="PATH",
                   help="also write that JSON document to PATH (rank 0): horovodrun tags and splits long lines")
    p.add_argument("--bytes", type=int, default=16 << 20,
                   help="allreduce/broadcast size, and the network check's message size (default: 16 MiB)")
    p.add_argument("--timeout", type=float, default=120.0,
                   help="seconds to wait for the other ranks (a collective, the gather) before a missing or "
                        "stuck rank becomes a FAIL line instead of a hang; a check that works alone gets at least "
                        "120 s (default: 120)")
    p.add_argument("--entry", choices=recipes.NAMES, default=recipes.NAMES[0],
                   help=f"the entry point the launch line starts (default: {recipes.NAMES[0]})")
    args = p.parse_args(argv)
    for flag in ("bytes", "timeout"):
        if not getattr(args, flag) > 0:  # also rejects nan
            p.error(f"argument --{flag}: must be > 0, got {getattr(args, flag)}")
    return args


def detect_launch() -> tuple[ClusterEnv, list[Check]]:
    """The launch, and the lines about it: contradicting launcher variables make this process judge itself
    alone (a broken TF_CONFIG is the tf config check's FAIL); a Slurm allocation without srun, a WARN."""
    notes = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            cluster = detect()
        except UserError as e:
            cluster = ClusterEnv(rank=0, local_rank=0, size=1, local_size=1, node_rank=0, launcher="single")
            if not str(e).startswith("TF_CONFIG:"):
                notes.append(Check("FAIL", "launcher", str(e), "launch with one launcher (mpirun, horovodrun or srun)"))
    notes += [Check("WARN", "launcher", str(w.message), "start the ranks with srun inside the job") for w in caught]
    return cluster, notes


def gather(ctx: Context) -> list | None:
    """Every rank's (rank, node, lines) on rank 0, None elsewhere, through whichever library connects the ranks."""
    ctx.enter("gathering the results", waits=True)
    where = ctx.cluster.node_name or ctx.cluster.hostname  # Slurm's node name if any
    mine = (ctx.cluster.rank, where, [asdict(ch) for ch in ctx.checks])
    if "mpi4py" in ctx.spans:
        ctx.comm.Barrier()  # a late peer is waited for here, where the deadline can still fire
        return ctx.comm.gather(mine, root=0)
    if "horovod" in ctx.spans:
        everyone = ctx.hvd.allgather_object(mine)  # Horovod has no gather: everyone gets it, rank 0 keeps it
        return everyone if ctx.hvd.rank() == 0 else None
    return [mine] if ctx.cluster.rank == 0 else None  # nothing connects the ranks: each judges itself


def conclude(ctx: Context, everyone: list) -> int:
    """Rank 0: its own rank-0-only checks, the merged lines, the launch line; 1 with a FAIL."""
    run_checks(ctx, registered("root"))
    everyone[0] = (*everyone[0][:2], [asdict(ch) for ch in ctx.checks])
    lines = merge(everyone)
    ctx.enter("reporting")
    report(ctx, lines, command(ctx, [host for _, host, _ in everyone]))
    return int(any(ch.status == "FAIL" for ch in lines))


def share_verdict(ctx: Context, verdict: int | None) -> int:
    """Every rank exits with rank 0's code; a rank that nothing connects with its own."""
    ctx.enter("sharing the verdict", waits=True)
    if "mpi4py" in ctx.spans:
        verdict = int(ctx.mpi_allreduce([verdict or 0], "MAX")[0])  # rank 0's; the others have none
    elif "horovod" in ctx.spans:
        verdict = ctx.hvd.broadcast_object(verdict, root_rank=0, name="doctor.verdict")
    if ctx.hvd is not None:
        ctx.hvd.shutdown()
    return verdict if verdict is not None else int(any(ch.status == "FAIL" for ch in ctx.checks))


def examine(ctx: Context) -> int:
    run_checks(ctx, registered("all"))
    everyone = gather(ctx)
    return share_verdict(ctx, conclude(ctx, everyone) if everyone is not None else None)


def give_up(ctx: Context, limit: float) -> None:
    """The deadline passed: rank 0 reports what it has and the stage it waited in; every rank exits 1 at once
    (not a normal exit: MPI_Finalize would wait for the stuck rank)."""
    if ctx.cluster.rank == 0:
        report(ctx, [*ctx.checks, Check("FAIL", "doctor", f"no answer within {limit:g} s while in '{ctx.stage}'",
                                        MISSING_FIX)], "(undetermined)")
    os._exit(1)


def main(argv: list[str] | None = None) -> int:
    cluster, notes = detect_launch()
    try:
        args = parse_args(argv)
        netiface.apply()  # as training does: the site's interface for every library, before any starts
    except UserError as e:
        if cluster.rank == 0:
            print(f"{PROG}: error: {e}", file=sys.stderr, flush=True)
        return e.exit_code
    ctx = Context(args, cluster, checks=notes)
    ctx.facts["image_missing"] = image.apply()  # as training does, before MPI starts; the container check reports it
    deadline = Deadline(args.timeout, cluster.rank, lambda limit: give_up(ctx, limit))
    ctx.on_stage = deadline.enter
    try:
        return examine(ctx)
    finally:
        deadline.cancel()
