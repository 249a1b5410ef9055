"""MPI and Horovod start-up: mpi4py and the MPI it links, whether the launcher, mpi4py and Horovod see the
same ranks, and whether mpi4py's MPI is the mpirun on PATH."""
from __future__ import annotations

from hpctrain.doctor.common import NOT_MPI, Context, mpi_flavour
from hpctrain.doctor.registry import Outcome, check

MISMATCH_FIX = ("mpi4py/Horovod are built against a different MPI than the one that launched this job: rebuild "
                "with the launcher's MPI module loaded, or launch with that MPI's mpirun / srun --mpi=pmix")


@check("mpi4py", order=70, waits=True)  # MPI_Init's fence waits for every rank
def mpi4py(ctx: Context) -> Outcome:
    import mpi4py
    from mpi4py import MPI  # initialises MPI: a singleton of size 1 when no MPI launcher started us
    ctx.comm = MPI.COMM_WORLD
    library = ctx.facts["mpi_lib"] = MPI.Get_library_version().replace("\x00", "").strip()  # C string NUL
    return "PASS", f"{mpi4py.__version__}, links {library.splitlines()[0].strip()}", None


def start_horovod(ctx: Context) -> None:
    """horovod.torch's init where a controller can run (Gloo under horovodrun --gloo, MPI under an MPI
    launcher or alone); never under torchrun or a TF_CONFIG launch. Sets ctx.hvd and ctx.spans."""
    c = ctx.cluster
    mpi_spans = ctx.comm is not None and ctx.comm.Get_size() == c.size > 1
    can = c.launcher not in ("torchrun", "tf-config") and \
        ctx.facts.get("hvd_gloo" if c.launcher == "horovod-gloo" else "hvd_mpi")
    if mpi_spans:  # every rank inits, or none: no hang
        can = ctx.mpi_allreduce([bool(can)], "MIN")[0]
    if can:
        import horovod.torch as hvd
        hvd.init()
        ctx.hvd = hvd
    hvd_spans = ctx.hvd is not None and ctx.hvd.size() == c.size > 1
    ctx.spans = {lib for lib, ok in (("mpi4py", mpi_spans), ("horovod", hvd_spans)) if ok}


@check("ranks", order=80, error_fix=MISMATCH_FIX, waits=True)  # the first collective, hvd.init()
def ranks(ctx: Context) -> Outcome:
    c = ctx.cluster
    start_horovod(ctx)  # a failed hvd.init() is this check's FAIL
    seen = {"launcher": (c.rank, c.size)}
    if ctx.comm is not None and not (c.launcher in NOT_MPI and ctx.comm.Get_size() == 1):
        seen["mpi4py"] = (ctx.comm.Get_rank(), ctx.comm.Get_size())  # (not an MPI launch: singletons)
    if ctx.hvd is not None:
        seen["Horovod"] = (ctx.hvd.rank(), ctx.hvd.size())
    if len(set(seen.values())) > 1:
        found = ", ".join(f"{k} rank {r} of {s}" for k, (r, s) in seen.items())
        return "FAIL", f"{c.launcher} launcher disagrees: {found}", MISMATCH_FIX
    others = " and ".join(k for k in seen if k != "launcher")
    detail = f"{c.launcher} launcher, {c.size} rank(s) on {c.num_nodes} node(s)"
    if c.launcher == "tf-config":  # tf.distribute's own launch: TensorFlow connects the processes, not MPI
        return "PASS", f"{detail}; TensorFlow connects TF_CONFIG's tasks (--backend multiworker), not MPI", None
    detail += f"; {others or 'nothing'} agree"
    if ctx.hvd is None:  # not importable (see horovod), or no controller for this launcher
        return "WARN", detail + "; Horovod not started", "launch with mpirun/srun or horovodrun --gloo, or use " \
            "--backend ddp"
    return "PASS", detail, None


@check("mpi library", order=90)
def mpi_library(ctx: Context) -> Outcome:
    if "mpi_lib" not in ctx.facts or "mpirun" not in ctx.facts:
        return "SKIP", "no mpirun or no mpi4py to compare", None
    linked, launcher = mpi_flavour(ctx.facts["mpi_lib"]), mpi_flavour(ctx.facts["mpirun"])
    if linked != launcher:
        return "WARN", f"mpi4py links {linked}, but mpirun on PATH is {launcher}", \
            "put the mpirun of the MPI that mpi4py/Horovod were built with first on PATH, or rebuild them"
    return "PASS", f"mpi4py links {linked}, mpirun is {launcher}", None
