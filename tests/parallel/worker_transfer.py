"""Run under `mpirun -np 2`. Moves pickled objects (dicts of torch tensors) between ranks with
hpctrain.pipeline.transfer (mpi4py.util.pkl5 underneath), including one over 2 GiB, or shows that plain
mpi4py cannot.

    mpirun -np 2 python tests/parallel/worker_transfer.py good  OUT_DIR   # small + > 2 GiB via transfer.*
    mpirun -np 2 python tests/parallel/worker_transfer.py plain OUT_DIR   # > 2 GiB via plain comm.gather
Each rank writes OUT_DIR/<mode>-rank<r>.json. In `good` any mismatch raises and aborts the job (non-zero
exit); `plain` records what comm.gather did (return or exception) and exits 0 either way.

The big object is a state dict whose float32 tensor holds BIG_BYTES (> 2 GiB) of the pattern i % 251, so
truncation, reordering or a wrong offset anywhere shows up in the chunked full comparison."""
import gc
import json
import resource
import sys
import time
from pathlib import Path

import torch
from mpi4py import MPI

from hpctrain.pipeline.transfer import bcast_from_root, gather_to_root, scatter_from_root

torch.set_num_threads(1)
WORLD = MPI.COMM_WORLD
RANK = WORLD.Get_rank()
BIG_BYTES = int(2.1 * 2**30)  # > 2**31 - 1: one MPI message with an int count cannot carry it
N = BIG_BYTES // 4
PERIOD = 251
BLOCK = (torch.arange(PERIOD << 16) % PERIOD).float()  # 16.4M elements (63 MiB), a whole number of periods


def big_state(tag: int) -> dict:
    w = torch.empty(N, dtype=torch.float32)
    for i in range(0, N, len(BLOCK)):  # w[i] = i % 251, a block at a time (no N-sized temporaries)
        w[i:i + len(BLOCK)] = BLOCK[:N - i]
    return {"model": {"big.weight": w, "big.bias": torch.full((7,), float(tag))}, "optimizer": optimizer(tag)}


def optimizer(tag: int) -> dict:
    return {"state": {0: {"step": torch.tensor(float(tag))}}, "param_groups": [{"lr": 0.1}]}


def check_big(state: dict, tag: int, what: str) -> None:
    w = state["model"]["big.weight"]
    assert w.dtype == torch.float32 and w.shape == (N,) and w.is_contiguous(), (what, w.dtype, w.shape)
    assert w.untyped_storage().nbytes() == 4 * N > 2**31, (what, w.untyped_storage().nbytes())
    for i in range(0, N, len(BLOCK)):  # every element, not a sample
        assert torch.equal(w[i:i + len(BLOCK)], BLOCK[:N - i]), f"{what}: elements {i}.. differ"
    assert w[N - 1].item() == (N - 1) % PERIOD and w[2**29 + 3].item() == (2**29 + 3) % PERIOD, what
    assert torch.equal(state["model"]["big.bias"], torch.full((7,), float(tag))), what
    assert same(state["optimizer"], optimizer(tag)), what


def maxrss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def timed(fn):
    WORLD.Barrier()
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def small(rank: int) -> dict:
    return {"rank": rank, "w": torch.arange(12, dtype=torch.float64).reshape(3, 4) * (rank + 1),
            "ids": torch.arange(5) - rank, "half": torch.full((2, 2), rank + 0.5, dtype=torch.bfloat16),
            "opt": {"step": rank * 10, "exp_avg": [torch.ones(3) * rank, None]}}


def same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(same, a, b))
    return a == b


def small_cases(size: int) -> None:
    for root in range(size):
        got = gather_to_root(WORLD, small(RANK), root=root)
        if RANK == root:
            assert isinstance(got, list) and len(got) == size, got
            assert all(same(got[r], small(r)) for r in range(size)), f"gather to {root}"
        else:
            assert got is None, got
        mine = scatter_from_root(WORLD, [small(100 + r) for r in range(size)] if RANK == root else None, root=root)
        assert same(mine, small(100 + RANK)), f"scatter from {root}: {mine}"
        got = bcast_from_root(WORLD, small(200 + root) if RANK == root else "ignored", root=root)
        assert same(got, small(200 + root)), f"bcast from {root}: {got}"
    assert scatter_from_root(WORLD, None) is None  # pkl5's rule: root passing None sends None to everyone


def good() -> dict:
    size = WORLD.Get_size()
    assert size == 2, size
    small_cases(size)
    rec = {"mpi4py": __import__("mpi4py").__version__, "mpi": MPI.Get_library_version().split(",")[0],
           "big_bytes": 4 * N, "maxrss_gib": {"start": maxrss_gib()}}

    # 1 -> 0: rank 1's stage state gathered to rank 0.
    state = big_state(1) if RANK == 1 else {"model": {}, "optimizer": None}
    rec["maxrss_gib"]["built"] = maxrss_gib()
    parts, rec["gather_s"] = timed(lambda s=state: gather_to_root(WORLD, s))
    del state
    gc.collect()
    rec["maxrss_gib"]["gather"] = maxrss_gib()
    if RANK == 0:
        assert parts[0] == {"model": {}, "optimizer": None}, parts[0]
        check_big(parts[1], 1, "gather 1->0")
        big = parts[1]
    del parts
    gc.collect()

    # 0 -> 1: rank 0 hands rank 1 only its (> 2 GiB) part.
    mine, rec["scatter_s"] = timed(lambda: scatter_from_root(WORLD, [{"rank": 0}, big] if RANK == 0 else None))
    rec["maxrss_gib"]["scatter"] = maxrss_gib()
    if RANK == 1:
        check_big(mine, 1, "scatter 0->1")
    else:
        assert mine == {"rank": 0}, mine
    del mine
    gc.collect()

    # 0 -> all: a > 2 GiB checkpoint broadcast.
    got, rec["bcast_s"] = timed(lambda: bcast_from_root(WORLD, big if RANK == 0 else None))
    if RANK == 0:
        del big
    gc.collect()
    rec["maxrss_gib"]["bcast"] = maxrss_gib()
    check_big(got, 1, f"bcast 0->{RANK}")
    del got
    gc.collect()
    WORLD.Barrier()
    return rec


def plain() -> dict:
    state = big_state(1) if RANK == 1 else None
    rec = {"mpi4py": __import__("mpi4py").__version__, "big_bytes": 4 * N}
    t = time.perf_counter()
    try:
        got = WORLD.gather(state, root=0)  # the old way: one pickled message per rank
        rec["outcome"] = "returned"
        if RANK == 0:
            check_big(got[1], 1, "plain gather")
            rec["intact"] = True
        del got
    except MPI.Exception as e:
        rec.update(outcome="MPI.Exception", error_class=e.Get_error_class(), error_string=e.Get_error_string(),
                   is_err_arg=e.Get_error_class() == MPI.ERR_ARG)
    except Exception as e:
        rec.update(outcome=type(e).__name__, error_string=str(e))
    rec["seconds"] = time.perf_counter() - t
    rec["maxrss_gib"] = maxrss_gib()
    return rec


if __name__ == "__main__":
    mode, out = sys.argv[1], Path(sys.argv[2])
    rec = {"good": good, "plain": plain}[mode]()
    (out / f"{mode}-rank{RANK}.json").write_text(json.dumps(rec))
    print(mode, RANK, json.dumps(rec), flush=True)
