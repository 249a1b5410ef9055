"""The TensorFlow engine under real mpirun and horovodrun (2 ranks): gradients equal single-process
full-batch training (plain, accumulation, fp16 compression; Adasum agrees across ranks), weights and optimizer
state identical on both ranks, BatchNorm statistics synced."""
import pytest

from tests.launch import run
from tests.parallel.test_multirank import _ok_lines

WORKER = "tests/parallel/worker_tf_trainer.py"


@pytest.mark.parametrize("launcher", ["mpirun", "horovodrun"])
def test_tf_horovod_gradients_match_single_process(launcher):
    res = _ok_lines(run(launcher, 2, [WORKER], timeout=400), 2)
    for r in res.values():
        assert r["size"] == 2
        got = {v["variant"]: v for v in r["results"]}
        assert set(got) == {"plain", "accumulate2", "fp16_allreduce", "adasum", "resnet18_batchnorm"}
        assert got["plain"]["diff_vs_single_process"] < 1e-5
        assert got["accumulate2"]["diff_vs_single_process"] < 1e-5
        assert got["fp16_allreduce"]["diff_vs_single_process"] < 2e-3
        assert all(v["spread"] == 0.0 for v in r["results"])
