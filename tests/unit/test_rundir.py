"""hpctrain.rundir: one run per directory, refusals in one line, archive and set-aside that lose no byte."""
import hashlib
import json
import threading
import time
from pathlib import Path

import pytest

from hpctrain import rundir
from hpctrain.rundir import RunDirError

TORCH = {"framework": "torch", "recipe": "resnet", "arch": "resnet18", "num_classes": 10}


def snapshot(root: Path) -> dict:
    """Relative path -> sha256 of every file under root (what 'not a byte lost' is checked against)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def make_run(d: Path, identity=TORCH, steps=(10, 15, 20), job=None) -> rundir.RunRecord:
    record = rundir.new_record(identity, job)
    d.mkdir(parents=True, exist_ok=True)
    rundir.write_record(d, record)
    (d / "checkpoints").mkdir()
    for s in steps:
        (d / "checkpoints" / f"ckpt-{s:08d}.pt").write_bytes(bytes([s]) * 100)
        (d / "checkpoints" / f"ckpt-{s:08d}.pt.sha256").write_text(f"x  ckpt-{s:08d}.pt\n")
    (d / "metrics.jsonl").write_text("".join(json.dumps({"kind": "train", "step": s}) + "\n" for s in range(1, 21)))
    (d / "tb").mkdir()
    (d / "tb" / "events.out").write_bytes(b"tb")
    (d / "hang-1.txt").write_text("stacks")
    return record


def test_fresh_dir_opens_with_the_flag_s_mode(tmp_path):
    assert rundir.open_run(tmp_path / "new", TORCH, "never", False, None, print) == rundir.Opened(None, "never")
    (tmp_path / "only-temps" / "checkpoints").mkdir(parents=True)  # an interrupted save's temp file is no run
    (tmp_path / "only-temps" / "checkpoints" / ".ckpt-00000004.pt.x.tmp").write_bytes(b"x")
    assert not rundir.holds_run(tmp_path / "only-temps")


def test_resume_never_into_a_used_dir_is_refused_and_nothing_changes(tmp_path):
    d = tmp_path / "run"
    record = make_run(d)
    before = snapshot(d)
    with pytest.raises(RunDirError) as e:
        rundir.open_run(d, TORCH, "never", False, None, print)
    line = str(e.value)
    assert "\n" not in line and f"holds run {record.run_id}" in line and "ckpt-00000020.pt" in line
    assert "--resume never would start a new run over it" in line and "--new-run" in line and "--run-dir" in line
    assert snapshot(d) == before


@pytest.mark.parametrize("change, words", [
    ({"framework": "tf"}, "framework torch, this run framework tf"),
    ({"arch": "resnet34"}, "arch resnet18, this run arch resnet34"),
    ({"num_classes": 5}, "10 classes, this run 5 classes"),
])
def test_another_run_is_refused_naming_what_differs(tmp_path, change, words):
    d = tmp_path / "run"
    make_run(d)
    before = snapshot(d)
    with pytest.raises(RunDirError, match="holds another run") as e:
        rundir.open_run(d, {**TORCH, **change}, "auto", False, None, print)
    assert words in str(e.value)
    assert snapshot(d) == before


def test_same_run_resumes(tmp_path):
    d = tmp_path / "run"
    record = make_run(d)
    config_part = {"framework": "torch", "recipe": "resnet", "arch": "resnet18"}  # what is known before the data
    opened = rundir.open_run(d, config_part, "auto", False, None, print)
    assert opened.record.run_id == record.run_id and opened.resume == "auto"


def test_new_run_archives_every_byte_and_starts_anew(tmp_path):
    d = tmp_path / "run"
    record = make_run(d)
    (d / "notes.txt").write_text("the user's own file")  # not an output of the run: left where it is
    before = snapshot(d)
    seen = []
    opened = rundir.open_run(d, {**TORCH, "framework": "tf"}, "never", True, None, seen.append)
    assert opened == rundir.Opened(None, "never")
    archived = d / "archive" / f"run-{record.run_id}"
    assert snapshot(archived) == {k: v for k, v in before.items() if k != "notes.txt"}
    assert (d / "notes.txt").exists() and not rundir.holds_run(d)
    assert str(archived) in seen[0]
    # A second archive (the next --new-run) lands beside the first.
    second = make_run(d, steps=(2,))
    rundir.open_run(d, TORCH, "auto", True, None, print)
    assert (d / "archive" / f"run-{second.run_id}" / "checkpoints" / "ckpt-00000002.pt").exists()
    assert snapshot(archived) == {k: v for k, v in before.items() if k != "notes.txt"}


def test_a_requeue_of_the_job_that_started_the_run_resumes_it(tmp_path):
    d = tmp_path / "run"
    record = make_run(d, job="4242")
    before = snapshot(d)
    for mode, new in (("never", False), ("auto", True), ("/some/ckpt.pt", False)):
        opened = rundir.open_run(d, TORCH, mode, new, "4242", print)
        assert opened.record.run_id == record.run_id and opened.resume == "auto"
    assert snapshot(d) == before
    with pytest.raises(RunDirError):  # another job is not a requeue
        rundir.open_run(d, TORCH, "never", False, "9999", print)


def test_a_run_without_run_json_counts_as_a_run(tmp_path):
    d = tmp_path / "old"
    (d / "checkpoints").mkdir(parents=True)
    (d / "checkpoints" / "ckpt-00000003.npz").write_bytes(b"x")  # any engine's suffix
    with pytest.raises(RunDirError, match="a run without a run.json"):
        rundir.open_run(d, TORCH, "never", False, None, print)
    assert rundir.open_run(d, TORCH, "auto", False, None, print) == rundir.Opened(None, "auto")


def test_a_damaged_run_json_is_one_line(tmp_path):
    (tmp_path / "run.json").write_text("{not json")
    with pytest.raises(RunDirError, match="run.json is not a run record"):
        rundir.read_record(tmp_path)


def test_record_round_trip_keeps_unknown_fields(tmp_path):
    record = rundir.new_record({**TORCH}, "7", {"path": "/x.pt", "run_id": "r0", "step": 4})
    rundir.write_record(tmp_path, record)
    data = json.loads((tmp_path / "run.json").read_text())
    data["status"] = {"last_step": 9}
    (tmp_path / "run.json").write_text(json.dumps(data))
    again = rundir.read_record(tmp_path)
    assert again.identity() == TORCH and again.slurm_job == "7" and again.started_from["step"] == 4
    rundir.write_record(tmp_path, again)
    assert json.loads((tmp_path / "run.json").read_text())["status"] == {"last_step": 9}


def test_resume_sets_aside_what_it_trains_again(tmp_path):
    d = tmp_path / "run"
    make_run(d)
    with open(d / "metrics.jsonl", "a") as f:
        f.write('{"kind": "train", "st')  # torn by a killed writer
    before = snapshot(d)
    aside, names, records = rundir.set_aside_redone(d, 15)
    assert names == ["ckpt-00000020.pt"] and records == 6  # steps 16..20 and the torn line
    assert [s for s, _ in rundir.checkpoint_files(d)] == [15, 10]
    assert [json.loads(line)["step"] for line in (d / "metrics.jsonl").read_text().splitlines()] == list(range(1, 16))
    moved = snapshot(aside)
    assert moved["checkpoints/ckpt-00000020.pt"] == before["checkpoints/ckpt-00000020.pt"]
    assert "checkpoints/ckpt-00000020.pt.sha256" in moved
    side = (aside / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in side[:5]] == [16, 17, 18, 19, 20] and side[5] == '{"kind": "train", "st'
    assert rundir.set_aside_redone(d, 15) == (None, [], 0)  # nothing more to move


def test_phrases():
    assert rundir.difference({"num_classes": 5, "arch": "a"}, {"arch": "a", "num_classes": 10}) == \
        "10 classes, this run 5 classes"
    assert rundir.difference({"vocab_size": 300}, {"vocab_size": 8000}) == "vocabulary 8000, this run vocabulary 300"
    assert rundir.difference({"preset": "tiny"}, {"model_path": "/m"}) is None  # nothing both name


def test_status_is_kept_by_the_process_that_keeps_it(tmp_path):
    rundir.write_record(tmp_path, rundir.new_record(TORCH, None))
    rundir.keep_status(None)
    rundir.update_status(step=3)  # not kept by this process: nothing written
    assert rundir.read_status(tmp_path) == {}
    rundir.keep_status(tmp_path)
    try:
        rundir.update_status(state="running", step=3, checkpoint=None)
        rundir.update_status(step=5, checkpoint="ckpt-00000005.pt", checkpoint_step=5)
        status = rundir.read_status(tmp_path)
        assert (status["state"], status["step"], status["checkpoint_step"]) == ("running", 5, 5)
        assert rundir.read_record(tmp_path).identity() == TORCH  # the identity is untouched
    finally:
        rundir.keep_status(None)
    assert rundir.read_status(tmp_path / "missing") == {}


def test_the_log_intervals_status_is_written_in_the_background_and_never_after_a_newer_one(tmp_path, monkeypatch):
    rundir.write_record(tmp_path, rundir.new_record(TORCH, None))
    rundir.keep_status(tmp_path)
    real, gate, writes = rundir.atomic_write, threading.Event(), []

    def slow_write(path, write):  # a file system whose writes hang until the gate opens
        gate.wait(10)
        writes.append(time.monotonic())
        real(path, write)

    monkeypatch.setattr(rundir, "atomic_write", slow_write)
    try:
        started = time.monotonic()
        rundir.update_status(step=7, later=True)  # returns at once: the writer thread waits on the gate
        rundir.update_status(step=8, later=True)
        assert time.monotonic() - started < 1 and rundir.read_status(tmp_path) == {}
        threading.Timer(0.5, gate.set).start()
        rundir.update_status(state="done", exit_code=0)  # waits for the write in progress, then writes after it
        status = rundir.read_status(tmp_path)
        assert (status["state"], status["step"]) == ("done", 8), status  # the newest step, whichever wrote it
        time.sleep(0.2)  # nothing pending: the writer thread writes nothing older afterwards
        assert rundir.read_status(tmp_path)["step"] == 8 and len(writes) <= 2, writes
    finally:
        gate.set()
        rundir.keep_status(None)
