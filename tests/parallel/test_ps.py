"""The parameter server (engine/torch/sync/ps.py) under real ranks against one process on the whole global batch,
float64, on the horovod, mpi and ddp backends, and its asynchronous serving with a bounded staleness (worker_ps.py
checks and reports)."""
import pytest

from tests.launch import run
from tests.parallel.test_multirank import _ok_lines

BACKENDS = ("horovod", "mpi", "ddp")
EXACT = 1e-12  # sums taken in another order: measured within 6e-17


@pytest.mark.parametrize("servers, np_", [(1, 3), (2, 4)], ids=["1server-2workers", "2servers-2workers"])
def test_parameter_server_equals_allreduce_sgd_and_its_checkpoints_go_both_ways(servers, np_):
    res = _ok_lines(run("mpirun", np_, ["tests/parallel/worker_ps.py", "--servers", str(servers)], timeout=300), np_)
    params = res[0]["params_bytes"]
    for rank, r in res.items():
        for b in BACKENDS:
            for opt in ("sgd", "adamw"):
                assert r[f"{opt}_diff_{b}"] < EXACT and r[f"{opt}_resume_diff_{b}"] < EXACT, (rank, r)
                assert r[f"{opt}_format_diff_{b}"] < EXACT
            assert r[f"batchnorm_diff_{b}"] < EXACT  # a save: the workers' mean of BatchNorm's statistics
        if r["serves"]:  # its range of the momentum, sent back to each of the 2 workers every step
            assert 0 < r["sgd_state_bytes_mpi"] and r["sgd_sent_per_step_mpi"] == 2 * r["sgd_state_bytes_mpi"]
        else:  # no optimizer state; the whole gradient pushed once per step
            assert r["sgd_state_bytes_mpi"] == 0 and r["sgd_sent_per_step_mpi"] == params
    for rank, r in res.items():  # asynchronous serving
        assert r["async_s0_vs_sync"] < EXACT and r["settled_spread"] == 0.0, (rank, r)
        if r["serves"]:  # the server's record: no reply beyond the bound (2); the fast worker 0 ran ahead
            leads = r["async_record"]["leads"]
            assert [len(row) for row in leads] == [3, 3] and sum(map(sum, leads)) == 20, leads
            assert leads[0][1] + leads[0][2] > 0, leads
    shares = [r["sgd_state_bytes_mpi"] for r in res.values() if r["serves"]]
    assert sum(shares) == params and max(shares) - min(shares) <= 8  # split by bytes over the servers
