"""A run directory holds one run, under real ranks: a fresh start into a used directory is refused or archives the
old run byte for byte, a requeue resumes the new run, other frameworks and models are refused with one line, a
checkpoint that does not fit is one line and nothing is written, an unwritable run dir and a loader worker's
error are one line, and what every TF process used to print at start-up stays off the console."""
import re
import subprocess

import numpy as np
import torch
from PIL import Image

from hpctrain import rundir
from hpctrain.errors import EXIT_USER_ERROR
from tests.launch import check_ok, metrics, run
from tests.unit.test_rundir import snapshot

# 8 steps per epoch at np=2
TINY = ["-m", "hpctrain.resnet", "--config", "configs/tiny.toml", "--synthetic-size", "128"]
ERROR_LINE = re.compile(r"error( \(rank \d+\))?: ")
TF_NOISE = re.compile(r"absl|^[IWE]\d{4} |cuda|oneDNN|tensorflow", re.I | re.M)


def one_line_error(p: subprocess.CompletedProcess, *words: str) -> str:
    """The job failed with exit 2 and exactly one error line naming `words`, no traceback."""
    out = p.stdout + p.stderr
    errors = [line for line in out.splitlines() if ERROR_LINE.search(line)]
    assert p.returncode == EXIT_USER_ERROR, out[-3000:]
    assert len(errors) == 1 and "Traceback" not in out, out[-3000:]
    for w in words:
        assert w in errors[0], errors[0]
    return errors[0]


def outputs(run_dir) -> dict:
    """Everything of a run in its directory (the lock file comes and goes with each start)."""
    return {k: v for k, v in snapshot(run_dir).items() if k != ".hpctrain.lock"}


def test_fresh_start_is_refused_or_archives_and_a_requeue_resumes_the_new_run(tmp_path):
    d = tmp_path / "run"
    check_ok(run("mpirun", 2, [*TINY, "--run-dir", str(d), "--checkpoint-every", "2", "--max-steps", "6"]))
    old = outputs(d)
    assert "checkpoints/ckpt-00000006.pt" in old and "run.json" in old
    status = rundir.read_status(d)  # what a supervisor reads instead of log lines
    assert {k: status[k] for k in ("state", "step", "checkpoint", "checkpoint_step", "exit_code")} == \
        {"state": "done", "step": 6, "checkpoint": "ckpt-00000006.pt", "checkpoint_step": 6, "exit_code": 0}
    assert status["launch"]["ranks"] == 2 and status["resumed_at"] == 0
    # The old code printed "dropped 4 record(s)", saved step 2 and pruned it at once: old run gone, new run lost.
    p = run("mpirun", 2, [*TINY, "--run-dir", str(d), "--resume", "never", "--checkpoint-every", "2",
                          "--max-steps", "2"])
    one_line_error(p, f"run dir {d} holds run", "--resume never would start a new run over it", "--new-run")
    assert outputs(d) == old
    # --new-run moves the old run aside whole; the Slurm job that starts the new run is noted in its run.json.
    job = {"SLURM_JOB_ID": "777"}
    again = [*TINY, "--run-dir", str(d), "--new-run", "--checkpoint-every", "2"]
    out = check_ok(run("mpirun", 2, [*again, "--max-steps", "4"], extra_env=job))
    archived = next((d / "archive").glob("run-*"))
    assert f"moved the earlier run in {d} to {archived}" in out
    assert snapshot(archived) == old  # every byte of the old run
    assert sorted(p.name for p in (d / "checkpoints").glob("*.pt")) == ["ckpt-00000002.pt", "ckpt-00000004.pt"]
    # A requeue runs the same command line: it resumes the NEW run's newest checkpoint, archives nothing.
    out = check_ok(run("mpirun", 2, [*again, "--max-steps", "6"], extra_env={**job, "SLURM_RESTART_COUNT": "1"}))
    assert "started by this Slurm job 777: resuming it" in out and "ckpt-00000004.pt at step 4" in out
    assert [r["step"] for r in metrics(d, "train")] == [1, 2, 3, 4, 5, 6]
    assert len(list((d / "archive").iterdir())) == 1 and snapshot(archived) == old


def test_switching_framework_in_one_directory_is_refused_each_way(tmp_path):
    d = tmp_path / "run"
    check_ok(run("mpirun", 2, [*TINY, "--run-dir", str(d), "--max-steps", "2"]))
    torch_run = outputs(d)
    p = run("mpirun", 2, [*TINY, "--framework", "tf", "--run-dir", str(d), "--max-steps", "2"], timeout=300)
    one_line_error(p, "holds another run (framework torch, this run framework tf)")
    assert not TF_NOISE.search(p.stderr), p.stderr  # the TF processes' start-up lines stay off the console
    assert outputs(d) == torch_run
    check_ok(run("mpirun", 2, [*TINY, "--framework", "tf", "--run-dir", str(d), "--max-steps", "2", "--new-run"],
                 timeout=300))
    tf_run = outputs(d)
    assert "checkpoints/ckpt-00000002.npz" in tf_run
    p = run("mpirun", 2, [*TINY, "--run-dir", str(d), "--max-steps", "2"])
    one_line_error(p, "holds another run (framework tf, this run framework torch)")
    assert outputs(d) == tf_run


def test_a_checkpoint_that_does_not_fit_is_one_line_and_nothing_is_written(tmp_path):
    src = tmp_path / "src"
    check_ok(run("mpirun", 2, [*TINY, "--run-dir", str(src), "--max-steps", "2"]))
    ckpt = src / "checkpoints" / "ckpt-00000002.pt"
    legacy = tmp_path / "legacy.pt"  # as written before checkpoints carried their run's identity
    state = torch.load(ckpt, weights_only=True)
    del state["identity"], state["run_id"]
    torch.save(state, legacy)
    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint\n")
    before = outputs(src)
    cases = [
        (["--run-dir", str(src), "--num-classes", "5"], ["holds another run (10 classes, this run 5 classes)"]),
        (["--resume", str(ckpt), "--num-classes", "5"], ["does not fit this model: it has 10 classes, this run 5"]),
        (["--resume", str(ckpt), "--arch", "resnet34"], ["does not fit", "arch resnet18, this run arch resnet34"]),
        (["--resume", str(legacy), "--num-classes", "5"], ["fc.weight is [10, 512] there, [5, 512] here"]),
        (["--resume", str(text)], [f"{text} is not a checkpoint of the torch engine"]),
    ]
    for i, (argv, words) in enumerate(cases):
        target = tmp_path / f"new{i}"
        p = run("mpirun", 2, [*TINY, "--run-dir", str(target), *argv, "--max-steps", "2"])
        one_line_error(p, *words)
        if "--resume" in argv:
            assert outputs(target) == {}, outputs(target)  # no run.json, no checkpoint, no metrics
    assert outputs(src) == before


def test_the_other_engine_s_checkpoint_says_which_engine_wrote_it(tmp_path):
    tf_dir, torch_dir = tmp_path / "tf", tmp_path / "torch"
    check_ok(run("single", 1, [*TINY, "--framework", "tf", "--backend", "none", "--run-dir", str(tf_dir),
                               "--max-steps", "1"], timeout=300))
    check_ok(run("single", 1, [*TINY, "--backend", "none", "--run-dir", str(torch_dir), "--max-steps", "1"]))
    npz, pt = tf_dir / "checkpoints" / "ckpt-00000001.npz", torch_dir / "checkpoints" / "ckpt-00000001.pt"
    p = run("mpirun", 2, [*TINY, "--run-dir", str(tmp_path / "a"), "--resume", str(npz)])
    one_line_error(p, f"{npz} is not a checkpoint of the torch engine", "written by the tf engine: add --framework tf")
    p = run("single", 1, [*TINY, "--framework", "tf", "--backend", "none", "--run-dir", str(tmp_path / "b"),
                          "--resume", str(pt)], timeout=300)
    one_line_error(p, "not a checkpoint of the tf engine", "written by the torch engine: add --framework torch")
    # TF compares every weight's shape too (it used to compare only how many there were).
    p = run("single", 1, [*TINY, "--framework", "tf", "--backend", "none", "--run-dir", str(tmp_path / "c"),
                          "--resume", str(npz), "--num-classes", "5"], timeout=300)
    one_line_error(p, "does not fit this model: it has 10 classes, this run 5 classes")
    assert outputs(tmp_path / "a") == outputs(tmp_path / "b") == outputs(tmp_path / "c") == {}


def test_an_unwritable_run_dir_is_one_line(tmp_path):
    p = run("mpirun", 2, [*TINY, "--run-dir", "/proc/hpctrain/run"])
    one_line_error(p, "run.run_dir (--run-dir): cannot create /proc/hpctrain/run", "(ENOENT)")
    ro = tmp_path / "ro"
    ro.mkdir()
    subprocess.run(["mount", "--bind", "-o", "ro", str(ro), str(ro)], check=True)
    try:
        p = run("mpirun", 2, [*TINY, "--run-dir", str(ro / "run")])
        one_line_error(p, f"cannot create {ro / 'run'}", "Read-only file system (EROFS)")
    finally:
        subprocess.run(["umount", str(ro)], check=True)


def test_truncated_jpegs_with_loader_workers_are_one_line(tmp_path):
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in ("a", "b"):
            (tmp_path / "data" / split / c).mkdir(parents=True)
            for i in range(8):
                path = tmp_path / "data" / split / c / f"{i}.jpg"
                Image.fromarray((rng.random((64, 64, 3)) * 255).astype(np.uint8)).save(path)
                path.write_bytes(path.read_bytes()[:2000])  # the header verifies, the pixels do not decode
    p = run("mpirun", 2, [*TINY, "--dataset", "folder", "--path", str(tmp_path / "data"), "--num-classes", "0",
                          "--workers", "2", "--batch-size", "4", "--run-dir", str(tmp_path / "run")])
    line = one_line_error(p, "consecutive images from", "cannot be decoded")
    assert "Caught DataError" not in p.stdout + p.stderr and "worker process" not in line


def test_bert_with_no_flags_trains_at_4_ranks(tmp_path):
    # The recipe's own defaults (AdamW, lr 5e-4 x sqrt(4), warm-up from 0, the built-in corpus): the old defaults
    # (SGD, lr 0.1 x ranks) gave a val loss of 15, and one epoch silently capped --max-steps.
    run_dir = tmp_path / "run"
    out = check_ok(run("mpirun", 4, ["-m", "hpctrain.bert", "--run-dir", str(run_dir), "--max-steps", "20",
                                     "--log-every", "5", "--progress", "never"], timeout=400))
    assert "ends after 20 steps (--max-steps)" in out
    train = metrics(run_dir, "train")
    assert [r["step"] for r in train] == [5, 10, 15, 20]
    assert train[-1]["loss"] < train[0]["loss"] - 0.5, [r["loss"] for r in train]
    assert not re.search(r"Writing model shards|\d+%\|", out)  # no progress bar of the HF export
