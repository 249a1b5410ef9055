"""Real multi-process runs under mpirun and horovodrun (2 ranks)."""
import json

import pytest

from tests.launch import run

WORKER = "tests/parallel/worker_trainer.py"


def _ok_lines(p, np):
    assert p.returncode == 0, f"rc={p.returncode}\nstdout:\n{p.stdout[-3000:]}\nstderr:\n{p.stderr[-3000:]}"
    found = {}
    decoder = json.JSONDecoder()
    for line in p.stdout.splitlines():
        # horovodrun prefixes each line with "[rank]<stdout>:"
        if "OK " in line:
            body = line[line.index("OK ") + 3:]
            rank, payload = body.split(" ", 1)
            found[int(rank)] = decoder.raw_decode(payload)[0]
    assert sorted(found) == list(range(np)), p.stdout[-2000:]
    return found


@pytest.mark.parametrize("launcher", ["mpirun", "horovodrun"])
def test_horovod_gradients_match_single_process(launcher):
    res = _ok_lines(run(launcher, 2, [WORKER, "--backend", "horovod"]), 2)
    assert all(r["size"] == 2 and r["backend"] == "horovod" for r in res.values())
    assert all(r["diff_vs_single_process"] < 1e-5 for r in res.values())
    assert all(r["loss_scale"] == 16.0 for r in res.values())  # rank 0's GradScaler state reached every rank


@pytest.mark.parametrize("flags", [["--accumulate", "2"], ["--fp16-allreduce"], ["--adasum"]])
def test_horovod_options(flags):
    res = _ok_lines(run("mpirun", 2, [WORKER, "--backend", "horovod", *flags]), 2)
    assert all(r["spread"] == 0.0 for r in res.values())


def test_ddp_gradients_match_single_process():
    res = _ok_lines(run("mpirun", 2, [WORKER, "--backend", "ddp", "--accumulate", "2"]), 2)
    assert all(r["backend"] == "ddp" and r["diff_vs_single_process"] < 1e-5 for r in res.values())
    assert all(r["loss_scale"] == 16.0 for r in res.values())


@pytest.mark.parametrize("flags", [[], ["--accumulate", "2"]], ids=["plain", "accumulate2"])
def test_mpi_gradients_match_single_process(flags):
    # One fused mpi4py Allreduce per step: the same parameters as full-batch SGD, rank 0's state everywhere.
    res = _ok_lines(run("mpirun", 2, [WORKER, "--backend", "mpi", *flags]), 2)
    assert all(r["backend"] == "mpi" and r["diff_vs_single_process"] < 1e-5 for r in res.values())
    assert all(r["spread"] == 0.0 and r["loss_scale"] == 16.0 for r in res.values())


@pytest.mark.parametrize("backend", ["horovod", "mpi"])
def test_resnet_with_batchnorm_stays_identical_across_ranks(backend):
    _ok_lines(run("mpirun", 2, [WORKER, "--backend", backend, "--model", "resnet18", "--steps", "2"]), 2)
