"""End to end through `python -m hpctrain.resnet`, real launchers, real files."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.launch import check_ok, metrics, run

TINY = ["-m", "hpctrain.resnet", "--config", "configs/tiny.toml"]


def test_resume_reproduces_uninterrupted_run(tmp_path):
    # 128 samples / 2 ranks / batch 8 = 8 steps per epoch; 2 epochs. The interrupted run stops at
    # step 5 (mid-epoch), resumes with a different loader worker count, and crosses the epoch boundary.
    common = [*TINY, "--synthetic-size", "128", "--epochs", "2", "--checkpoint-every", "5", "--deterministic"]
    a, b = tmp_path / "a", tmp_path / "b"
    check_ok(run("mpirun", 2, [*common, "--run-dir", str(a), "--workers", "2"]))
    check_ok(run("mpirun", 2, [*common, "--run-dir", str(b), "--workers", "0", "--max-steps", "5"]))
    out = check_ok(run("mpirun", 2, [*common, "--run-dir", str(b), "--workers", "1"]))
    assert "at step 5" in out and "resumed from" in out

    full = {r["step"]: r["loss"] for r in metrics(a, "train")}
    resumed = {r["step"]: r["loss"] for r in metrics(b, "train")}
    assert sorted(full) == list(range(1, 17)) and sorted(resumed) == list(range(1, 17))  # none lost or repeated
    assert [resumed[s] for s in range(6, 17)] == pytest.approx([full[s] for s in range(6, 17)], rel=1e-6, abs=1e-7)
    final_a = torch.load(a / "checkpoints" / "ckpt-00000016.pt", weights_only=True)["model"]
    final_b = torch.load(b / "checkpoints" / "ckpt-00000016.pt", weights_only=True)["model"]
    diff = max((final_a[k].double() - final_b[k].double()).abs().max().item() for k in final_a)
    assert diff < 1e-5, f"final parameters differ by {diff}"


def _image_tree(root: Path, bad: int = 1) -> Path:
    rng = np.random.default_rng(0)
    for split, per_class in (("train", 12), ("val", 4)):
        for c, colour in enumerate([(255, 0, 0), (0, 0, 255), (0, 255, 0)]):
            d = root / split / f"class{c}"
            d.mkdir(parents=True)
            for i in range(per_class):
                arr = (rng.random((40 + i, 48, 3)) * 60 + np.array(colour) * 0.7).clip(0, 255).astype(np.uint8)
                Image.fromarray(arr).save(d / f"img{i}.{'png' if i % 3 == 0 else 'jpg'}")
    for i in range(bad):
        (root / "train" / "class0" / f"broken{i}.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    return root


def test_horovodrun_folder_end_to_end(tmp_path):
    data = _image_tree(tmp_path / "data")
    run_dir = tmp_path / "run"
    out = check_ok(run("horovodrun", 2, [*TINY, "--dataset", "folder", "--path", str(data), "--num-classes", "0",
                                    "--epochs", "3", "--batch-size", "4", "--workers", "2", "--optimizer", "adamw",
                                    "--lr", "0.001", "--run-dir", str(run_dir)]))
    assert "skipped 1 unreadable image(s)" in out
    assert out.count("done at step") == 1  # only rank 0 reports
    evals = metrics(run_dir, "eval")
    assert len(evals) == 3 and all(e["val_samples"] == 12 for e in evals)
    assert 0.0 <= evals[-1]["val_top1"] <= 1.0
    train = metrics(run_dir, "train")
    assert train[-1]["samples_per_s_total"] > 0 and train[-1]["samples_per_s_rank"] > 0
    assert list((run_dir / "tb").glob("events.out.tfevents.*"))
    # 36 readable train images / 2 ranks / batch 4 = 4 steps per epoch; one checkpoint per epoch, 3 kept.
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("*.pt")) == \
        ["ckpt-00000004.pt", "ckpt-00000008.pt", "ckpt-00000012.pt"]


def test_corrupt_newest_checkpoint_falls_back(tmp_path):
    run_dir = tmp_path / "run"
    args = [*TINY, "--backend", "none", "--run-dir", str(run_dir), "--checkpoint-every", "2"]
    check_ok(run("single", 1, [*args, "--max-steps", "4"]))
    newest = run_dir / "checkpoints" / "ckpt-00000004.pt"
    newest.write_bytes(newest.read_bytes()[:1000])  # a torn write from a crashed node
    out = check_ok(run("single", 1, [*args, "--max-steps", "6"]))
    assert "ckpt-00000004.pt is corrupt" in out
    assert "ckpt-00000002.pt at step 2" in out
    # Steps 3, 4 of the first run are trained again: their records and the corrupt checkpoint are set aside, not
    # deleted (the old code deleted the records and left the corrupt file to be tried first at every resume).
    assert "moved what this run trains again after step 2 to" in out and "1 checkpoint(s): ckpt-00000004.pt" in out
    assert [r["step"] for r in metrics(run_dir, "train")] == [1, 2, 3, 4, 5, 6]
    aside = next((run_dir / "archive").glob("redone-*-after-step-2"))
    assert [json.loads(line)["step"] for line in (aside / "metrics.jsonl").read_text().splitlines()] == [3, 4]
    assert (aside / "checkpoints" / "ckpt-00000004.pt").stat().st_size == 1000


@pytest.mark.parametrize("argv, words", [
    (["--dataset", "folder", "--path", "/nonexistent/imagenet"], "/nonexistent/imagenet"),
    (["--dataset", "folder", "--path", "EMPTY"], "EMPTY"),
    (["--dataset", "folder", "--path", "ALLBAD"], "ALLBAD"),
    (["--batch-size", "4096"], "not one step per epoch"),
])
def test_bad_input_one_line_exit_2(tmp_path, argv, words):
    (tmp_path / "empty" / "train").mkdir(parents=True)
    allbad = tmp_path / "allbad" / "train" / "a"
    allbad.mkdir(parents=True)
    (allbad / "x.jpg").write_bytes(b"junk")
    subst = {"EMPTY": str(tmp_path / "empty"), "ALLBAD": str(tmp_path / "allbad")}
    argv = [subst.get(a, a) for a in argv]
    p = run("single", 1, [*TINY, "--backend", "none", "--run-dir", str(tmp_path / "r"), *argv], timeout=120)
    assert p.returncode == 2, p.stdout + p.stderr
    errors = [line for line in p.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and subst.get(words, words) in errors[0], p.stderr
    assert "Traceback" not in p.stderr


@pytest.mark.parametrize("flags", [["--amp", "bf16"], ["--backend", "ddp", "--accumulate", "2"]])
def test_cli_amp_and_ddp(tmp_path, flags):
    run_dir = tmp_path / "run"
    backend = [] if "--backend" in flags else ["--backend", "none"]
    launcher, np_ = ("mpirun", 2) if "ddp" in flags else ("single", 1)
    check_ok(run(launcher, np_, [*TINY, *backend, *flags, "--synthetic-size", "256", "--run-dir", str(run_dir),
                            "--max-steps", "3"]))
    losses = [r["loss"] for r in metrics(run_dir, "train")]
    assert len(losses) == 3 and all(np.isfinite(losses)) and all(0 < x < 20 for x in losses)
