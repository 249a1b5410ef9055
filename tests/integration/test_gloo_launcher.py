"""horovodrun --gloo end to end: Horovod's own launcher, no mpirun, no OMPI_* variables."""
import pytest

from tests.launch import check_ok, metrics, run


def test_horovodrun_gloo_trains_with_two_ranks(tmp_path):
    run_dir = tmp_path / "run"
    # Exit 0 also proves Horovod agrees with us: backends/horovod.py raises unless hvd.rank()/hvd.size()
    # equal the rank/size that cluster.detect() read from HOROVOD_RANK/HOROVOD_SIZE.
    out = check_ok(run("horovodrun-gloo", 2, ["-m", "hpctrain.resnet", "--config", "configs/tiny.toml",
                                              "--run-dir", str(run_dir), "--max-steps", "4",
                                              "--synthetic-size", "128"]))
    assert "horovod-gloo launcher, 2 rank(s) on 1 node(s)" in out, out[-3000:]
    assert out.count("done at step") == 1  # only rank 0 reports
    train = metrics(run_dir, "train")
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    # Two ranks really trained together: the total is summed over the data-parallel replicas, the
    # per-rank figure is that sum / replicas. A rank that thought it was alone would log total == rank.
    last = train[-1]
    assert last["samples_per_s_rank"] > 0
    assert last["samples_per_s_total"] == pytest.approx(2 * last["samples_per_s_rank"], rel=0.05)
