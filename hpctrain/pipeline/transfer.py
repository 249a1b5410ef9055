"""Move pickled Python objects (stage weights, optimizer state, checkpoints) between ranks, of any size.

mpi4py's plain `comm.gather` / `comm.bcast` / `comm.send` pickle the object and send it as ONE MPI message,
whose count is a C int: on Open MPI 4.1 (no MPI-4 large-count calls) a pickle over 2 GiB cannot be sent.
With mpi4py 4.1 the call raises `MPI.Exception` (MPI_ERR_ARG): in a gather on every rank, for a `send` on
the sender only, while the `recv` waiting for it hangs. `mpi4py.util.pkl5` (collectives since mpi4py 4.0)
sends the pickle's length first, then the bytes as one element of a contiguous datatype, so any size goes
through.

`scatter_from_root` lets rank 0 hand every rank only its own part (e.g. each stage its slice of a
checkpoint), so the other ranks never hold every stage's state as a `bcast` of the whole would make them.

Framework-neutral: only mpi4py is imported (lazily), objects are whatever pickles.
"""
from __future__ import annotations

from typing import Any


def _big(comm):
    from mpi4py.util import pkl5

    if not all(name in vars(pkl5.Comm) for name in ("bcast", "gather", "scatter")):
        import mpi4py  # before 4.0, pkl5's collectives fall back to plain mpi4py and its 2 GiB limit

        raise RuntimeError(f"hpctrain.pipeline.transfer needs mpi4py >= 4.0 (pkl5 collectives), "
                           f"found {mpi4py.__version__}")
    return comm if isinstance(comm, pkl5.Intracomm) else pkl5.Intracomm(comm)  # shares the handle, no Dup


def gather_to_root(comm, obj: Any, root: int = 0) -> list | None:
    """Collective: every rank's `obj`, in rank order, as a list on `root`; None on the other ranks."""
    return _big(comm).gather(obj, root=root)


def scatter_from_root(comm, objs: list | None, root: int = 0) -> Any:
    """Collective: `root` passes one item per rank (`objs[r]` goes to rank r; None sends None to all) and
    every rank gets only its own item. A list of the wrong length raises ValueError on `root`."""
    return _big(comm).scatter(objs, root=root)


def bcast_from_root(comm, obj: Any, root: int = 0) -> Any:
    """Collective: `root`'s `obj` on every rank (the others' `obj` is ignored)."""
    return _big(comm).bcast(obj, root=root)
