"""`--framework tf` end to end: the same CLI, data, checkpoints and stop path as the torch driver."""
import signal

import numpy as np
import pytest

from hpctrain.errors import EXIT_PREEMPTED
from tests.launch import check_ok, finish, metrics, run, signal_ranks, start, trained, wait_for

TINY = ["-m", "hpctrain.resnet", "--config", "configs/tiny.toml", "--framework", "tf"]


def test_tf_resume_reproduces_uninterrupted_run(tmp_path):
    # 128 samples / 2 ranks / batch 8 = 8 steps per epoch, 2 epochs; the interrupted run stops at step 5
    # (mid-epoch) and its resume crosses the epoch boundary.
    common = [*TINY, "--synthetic-size", "128", "--epochs", "2", "--checkpoint-every", "5", "--deterministic"]
    a, b = tmp_path / "a", tmp_path / "b"
    check_ok(run("mpirun", 2, [*common, "--run-dir", str(a)], timeout=300))
    check_ok(run("mpirun", 2, [*common, "--run-dir", str(b), "--max-steps", "5"], timeout=300))
    out = check_ok(run("mpirun", 2, [*common, "--run-dir", str(b)], timeout=300))
    assert "resumed from" in out and "at step 5" in out

    full = {r["step"]: r["loss"] for r in metrics(a, "train")}
    resumed = {r["step"]: r["loss"] for r in metrics(b, "train")}
    assert sorted(full) == list(range(1, 17)) and sorted(resumed) == list(range(1, 17))  # none lost or repeated
    assert [resumed[s] for s in range(6, 17)] == pytest.approx([full[s] for s in range(6, 17)], rel=1e-5, abs=1e-6)
    with np.load(a / "checkpoints" / "ckpt-00000016.npz") as za, np.load(b / "checkpoints" / "ckpt-00000016.npz") as zb:
        weights = [k for k in za.files if k.startswith("model/")]
        diff = max(float(np.abs(za[k].astype(np.float64) - zb[k]).max()) for k in weights)
    assert len(weights) > 50 and diff < 1e-4, f"final weights differ by {diff}"
    assert (a / "checkpoints" / "ckpt-00000016.npz.sha256").exists()
    assert len(metrics(a, "eval")) == 2 and metrics(a, "eval")[-1]["val_samples"] > 0


def test_tf_agreed_stop_saves_and_exits_85(tmp_path):
    run_dir = tmp_path / "run"
    job = start(2, [*TINY, "--run-dir", str(run_dir), "--synthetic-size", "4096", "--preempt-check-every", "2",
                    "--eval-every-epoch", "false"])
    assert wait_for(lambda: trained(run_dir, 2), 240), finish(job, 5)[-3000:]
    assert signal_ranks(job, signal.SIGUSR1) == 2
    out = finish(job)
    assert job.returncode == EXIT_PREEMPTED, out[-3000:]
    stopped = metrics(run_dir, "train")[-1]["step"]
    assert (run_dir / "checkpoints" / f"ckpt-{stopped:08d}.npz").exists(), out[-3000:]
    assert f"stopped at step {stopped} on SIGUSR1, checkpoint saved" in out


def test_tf_corrupt_newest_checkpoint_falls_back(tmp_path):
    run_dir = tmp_path / "run"
    args = [*TINY, "--backend", "none", "--run-dir", str(run_dir), "--checkpoint-every", "2"]
    check_ok(run("single", 1, [*args, "--max-steps", "4"], timeout=300))
    newest = run_dir / "checkpoints" / "ckpt-00000004.npz"
    newest.write_bytes(newest.read_bytes()[:1000])  # a torn write from a crashed node
    out = check_ok(run("single", 1, [*args, "--max-steps", "6"], timeout=300))
    assert "ckpt-00000004.npz is corrupt" in out
    assert "ckpt-00000002.npz at step 2" in out
    assert [r["step"] for r in metrics(run_dir, "train")] == [1, 2, 3, 4, 5, 6]


def test_tf_bert_tiny_horovodrun_loss_falls_and_exports_keras(tmp_path, small_corpus):
    run_dir = tmp_path / "run"
    out = check_ok(run("horovodrun", 2, ["-m", "hpctrain.bert", "--framework", "tf", "--corpus", str(small_corpus),
                                          "--preset", "tiny", "--batch-size", "8", "--epochs", "3", "--lr", "0.001",
                                          "--log-every", "4", "--run-dir", str(run_dir), "--progress", "never"],
                       timeout=400))
    train = metrics(run_dir, "train")
    assert train[-1]["loss"] < train[0]["loss"], [r["loss"] for r in train]
    assert metrics(run_dir, "eval")[-1]["val_samples"] > 0
    assert (run_dir / "keras" / "model.keras").is_file() and (run_dir / "keras" / "vocab.txt").is_file()
    assert "saved Keras model" in out


def test_tf_resnet_learns_shapes_under_horovodrun(tmp_path):
    run_dir = tmp_path / "run"
    check_ok(run("horovodrun", 2, ["-m", "hpctrain.resnet", "--framework", "tf", "--config", "configs/demo.toml",
                                   "--run-dir", str(run_dir), "--max-steps", "40", "--log-every", "10",
                                   "--progress", "never"], timeout=400))
    train = metrics(run_dir, "train")
    assert [r["step"] for r in train] == [10, 20, 30, 40]
    assert train[-1]["loss"] < 0.9 * train[0]["loss"], [r["loss"] for r in train]  # the built-in set is learnable
