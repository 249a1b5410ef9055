"""Real faults against the CLI: a slow checkpoint write during an agreed stop, a full disk, two runs in
one directory, a diverging loss, an interrupted save's temp files, a stop on an epoch's last step."""
import hashlib
import json
import os
import signal
import subprocess
from pathlib import Path

import pytest
import torch

from hpctrain.errors import EXIT_NONFINITE, EXIT_PREEMPTED, EXIT_SAVE_FAILED, EXIT_USER_ERROR
from tests.launch import (
    ROOT,
    check_ok,
    command,
    env,
    finish,
    metrics,
    run,
    signal_ranks,
    slow_fsync,
    start,
    trained,
    wait_for,
)

TINY = ["-m", "hpctrain.resnet", "--config", "configs/tiny.toml"]
# The slow checkpoint (tests.launch.slow_fsync): before the fix, the other rank exited 85 at once, mpirun killed rank
# 0 mid-save, and the checkpoint was lost while the job still said "saved, requeue me".


def _verified(path: Path) -> bool:
    side = path.with_name(path.name + ".sha256")
    return side.exists() and side.read_text().split()[0] == hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("mode", ["data", "pipeline"])
def test_slow_checkpoint_survives_the_agreed_stop(tmp_path, mode):
    run_dir = tmp_path / "run"
    # a log window every 2 steps: each window's status update is two more slow fsyncs, which prove nothing here
    args = [*TINY, "--run-dir", str(run_dir), "--synthetic-size", "4096", "--preempt-check-every", "2",
            "--eval-every-epoch", "false", "--log-every", "2"]
    if mode == "pipeline":
        args += ["--pipeline-stages", "2", "--micro-batches", "2", "--partition", "uniform", "--batch-size", "4"]
    job = start(2, args, wrap=slow_fsync(1_500_000))  # any save longer than mpirun's reaction to rank 1's exit
    assert wait_for(lambda: trained(run_dir, 2), 180), finish(job, 5)[-3000:]
    assert signal_ranks(job, signal.SIGUSR1) == 2
    out = finish(job)
    assert job.returncode == EXIT_PREEMPTED, out[-3000:]
    stopped = metrics(run_dir, "train")[-1]["step"]
    ckpt = run_dir / "checkpoints" / f"ckpt-{stopped:08d}.pt"
    assert ckpt.exists() and _verified(ckpt), f"checkpoint of step {stopped} lost\n{out[-3000:]}"
    assert f"stopped at step {stopped} on SIGUSR1, checkpoint saved" in out, out[-3000:]
    assert not list(ckpt.parent.glob(".*.tmp"))


def test_full_disk_during_checkpoint_one_line_and_nothing_replaced(tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    # 130 MiB: one 89 MB checkpoint (ResNet-18 weights + momentum) fits, a second does not.
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=130m", "tmpfs", str(mnt)]).returncode != 0:
        pytest.fail("cannot mount a tmpfs here (the test needs root)")
    try:
        run_dir = mnt / "run"
        p = run("mpirun", 2, [*TINY, "--run-dir", str(run_dir), "--checkpoint-every", "2", "--max-steps", "6"])
        assert p.returncode == EXIT_SAVE_FAILED, p.stdout[-2000:] + p.stderr[-2000:]
        errors = [line for line in p.stderr.splitlines() if "error" in line]
        assert len(errors) == 1 and "No space left on device (ENOSPC)" in errors[0], p.stderr[-3000:]
        assert "newest good checkpoint: ckpt-00000002.pt" in errors[0]
        assert "Traceback" not in p.stderr
        assert [c.name for c in (run_dir / "checkpoints").glob("ckpt-*.pt")] == ["ckpt-00000002.pt"]
        assert _verified(run_dir / "checkpoints" / "ckpt-00000002.pt")
        assert not list((run_dir / "checkpoints").glob(".*.tmp"))
    finally:
        subprocess.run(["umount", "-l", str(mnt)])


def test_second_run_into_the_same_dir_is_refused_and_the_first_is_untouched(tmp_path):
    run_dir = tmp_path / "run"
    first = start(2, [*TINY, "--run-dir", str(run_dir), "--synthetic-size", "480", "--checkpoint-every", "10"])
    try:
        assert wait_for(lambda: trained(run_dir, 1), 180)
        holder = json.loads((run_dir / ".hpctrain.lock").read_text())
        second = run("mpirun", 2, [*TINY, "--run-dir", str(run_dir), "--seed", "2"])
    finally:
        out = finish(first)
    assert second.returncode == EXIT_USER_ERROR, second.stdout[-2000:] + second.stderr[-2000:]
    errors = [line for line in second.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and f"run dir {run_dir} is in use" in errors[0], second.stderr[-2000:]
    assert f"host {holder['host']}" in errors[0] and f"pid {holder['pid']}" in errors[0]
    assert first.returncode == 0, out[-3000:]
    assert [r["step"] for r in metrics(run_dir, "train")] == list(range(1, 31))  # no record doubled
    assert not (run_dir / ".hpctrain.lock").exists()  # released at the end
    # A lock left by a killed run is taken over, with a note.
    again = start(1, [*TINY, "--backend", "none", "--run-dir", str(tmp_path / "k"), "--synthetic-size", "4096"])
    assert wait_for(lambda: trained(tmp_path / "k", 1), 180)
    signal_ranks(again, signal.SIGKILL)
    finish(again)
    out = check_ok(run("single", 1, [*TINY, "--backend", "none", "--run-dir", str(tmp_path / "k"), "--max-steps", "1",
                                     "--new-run"]))
    assert "taking over stale lock" in out


def test_diverging_loss_stops_with_one_line_and_saves_nothing(tmp_path):
    run_dir = tmp_path / "run"
    p = run("mpirun", 2, [*TINY, "--run-dir", str(run_dir), "--lr", "1e30", "--checkpoint-every", "2"])
    assert p.returncode == EXIT_NONFINITE, p.stdout[-2000:] + p.stderr[-2000:]
    errors = [line for line in p.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and ("loss is" in errors[0] or "not finite" in errors[0]), p.stderr[-2000:]
    assert "Traceback" not in p.stderr
    # whatever was saved before the divergence holds finite weights only
    for ckpt in (run_dir / "checkpoints").glob("ckpt-*.pt"):
        state = torch.load(ckpt, weights_only=True)["model"]
        assert all(torch.isfinite(t).all() for t in state.values() if t.is_floating_point()), ckpt


def test_interrupted_save_temp_files_are_removed_atstart(tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    stale = run_dir / "checkpoints" / ".ckpt-00000004.pt.x1y2z3.tmp"
    stale.write_bytes(os.urandom(1 << 20))
    out = check_ok(run("single", 1, [*TINY, "--backend", "none", "--run-dir", str(run_dir), "--max-steps", "1"]))
    assert "removed 1 temp file(s) of an interrupted save" in out and not stale.exists()


def test_stop_on_the_last_step_of_an_epoch_still_evaluates(tmp_path):
    # 64 samples / batch 8 = 8 steps per epoch; agreeing only every 8 steps puts the stop on step 8, the
    # epoch's last. The evaluation of epoch 0 must happen before the run exits 85.
    run_dir = tmp_path / "run"
    args = [*TINY, "--backend", "none", "--run-dir", str(run_dir), "--epochs", "3", "--preempt-check-every", "8"]
    job = subprocess.Popen(command("single", 1, args), cwd=ROOT, env=env(), stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    assert wait_for(lambda: trained(run_dir, 1), 120)
    job.send_signal(signal.SIGUSR1)
    out = finish(job)
    assert job.returncode == EXIT_PREEMPTED, out[-2000:]
    stopped = metrics(run_dir, "train")[-1]["step"]
    assert stopped in (8, 16), out[-2000:]  # 16 when the signal came after step 8: also an epoch's last step
    assert [r["step"] for r in metrics(run_dir, "eval")] == list(range(8, stopped + 1, 8))
    out = check_ok(run("single", 1, args))  # the resumed run evaluates epochs 1 and 2 only
    assert [r["step"] for r in metrics(run_dir, "eval")] == [8, 16, 24]
