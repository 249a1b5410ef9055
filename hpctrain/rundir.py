"""A run directory holds one run, and nothing of a run is ever dropped. Framework-neutral, stdlib only.

What a run writes under its run_dir: `run.json` (its identity: run id, framework, recipe, model signature,
the Slurm job that started it, the checkpoint it started from), `checkpoints/`, `metrics.jsonl`, `tb/`, the
exports (`hf/`, `keras/`), `pipeline_plan.json` and `hang-<rank>.txt`. Rank 0 applies these rules, under the
run-dir lock, before anything is written:

- A directory holding another run (another framework, recipe or model) is refused with one line naming what
  differs. `--new-run` moves the run that is there to `archive/run-<id>/` (never deleted) and starts anew.
- `--resume never` into a directory that holds a run is refused the same way, except when the run there was
  started by this very Slurm job: a requeued or relaunched job resumes it, whatever its command line says.
- A resume at step S sets aside what the resumed run trains again: checkpoints above S (also a corrupt newest
  one) and metrics records after S go to `archive/redone-<time>-after-step-<S>/`. Checkpoint retention then
  only ever sees this run's checkpoints at or below the step it just saved.

run.json also holds the run's `status`, kept by rank 0 (atomically, like the identity): what a supervisor
(`python -m hpctrain.slurm supervise`) reads instead of log lines. Its fields:
  state            running | done | stopped (an agreed stop on a signal, checkpoint saved) | failed
  step             the last step trained (updated at every log interval, save and end; the log interval's update
                   is written by a background thread, so a slow file system's fsync neither stalls training nor
                   looks like a hang to the watchdog; every other update is written at once, after it)
  checkpoint, checkpoint_step   the newest checkpoint of this run on disk (saved, or resumed from)
  resumed_at       the step this launch started from
  exit_code, reason             how the last launch ended (hpctrain's exit codes, hpctrain.errors)
  launch           {"job", "restart", "step_id", "ranks", "nodes"} of the launch that wrote it last
  updated          seconds since the epoch
"""
from __future__ import annotations

import json
import os
import re
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from hpctrain.errors import UserError
from hpctrain.files import atomic_write, fsync_dir

RUN_FILE = "run.json"
ARCHIVE = "archive"
METRICS = "metrics.jsonl"
# Everything a run writes (besides hang-<rank>.txt/.json), moved whole when the run is archived.
OUTPUTS = ("checkpoints", METRICS, "tb", "hf", "keras", "pipeline_plan.json")
_CHECKPOINT = re.compile(r"^ckpt-(\d{8,})(\.[A-Za-z0-9_-]+)+$")
# How a signature item reads in a message: "10 classes", "arch resnet18".
_WORDS = {"num_classes": "{} classes", "vocab_size": "vocabulary {}", "seq_len": "sequence length {}"}


class RunDirError(UserError):
    """The run directory holds something this run must not touch (one line, exit 2)."""


@dataclass
class RunRecord:
    run_id: str
    framework: str
    recipe: str
    signature: dict
    created: str = ""
    slurm_job: str | None = None
    started_from: dict | None = None  # {"path", "run_id", "step"} of a --resume FILE that began this run
    extra: dict = field(default_factory=dict)  # fields a newer hpctrain added: kept when rewritten

    def identity(self) -> dict:
        return {"framework": self.framework, "recipe": self.recipe, **self.signature}

    def describe(self) -> str:
        model = ", ".join(phrase(k, v) for k, v in self.signature.items())
        return f"run {self.run_id} ({self.framework} {self.recipe}: {model})"


def new_record(identity: dict, slurm_job: str | None, started_from: dict | None = None) -> RunRecord:
    signature = {k: v for k, v in identity.items() if k not in ("framework", "recipe")}
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    return RunRecord(f"{stamp}-{secrets.token_hex(3)}", identity["framework"], identity["recipe"], signature,
                     time.strftime("%Y-%m-%dT%H:%M:%S%z"), slurm_job, started_from)


def phrase(key: str, value) -> str:
    return _WORDS.get(key, key.replace("_", " ") + " {}").format(value)


def difference(ours: dict, theirs: dict) -> str | None:
    """The first item both identities name and disagree on, as '<theirs>, this run <ours>'."""
    for key, mine in ours.items():
        if key in theirs and theirs[key] != mine:
            return f"{phrase(key, theirs[key])}, this run {phrase(key, mine)}"
    return None


def read_record(run_dir: str | os.PathLike) -> RunRecord | None:
    path = Path(run_dir) / RUN_FILE
    try:
        data = json.loads(path.read_text())
        known = {k: data.pop(k) for k in ("run_id", "framework", "recipe", "signature", "created", "slurm_job",
                                          "started_from") if k in data}
        return RunRecord(**known, extra=data)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError, AttributeError) as e:
        raise RunDirError(f"run dir {path.parent}: {path.name} is not a run record ({type(e).__name__}); move it "
                          "away, or use another --run-dir") from None


def write_record(run_dir: str | os.PathLike, record: RunRecord) -> None:
    data = {**record.extra, **{k: v for k, v in asdict(record).items() if k != "extra"}}
    atomic_write(Path(run_dir) / RUN_FILE, lambda f: f.write((json.dumps(data, indent=1) + "\n").encode()))


def checkpoint_files(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint, of any engine's suffix, newest first."""
    d = Path(run_dir) / "checkpoints"
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir()
             if (m := _CHECKPOINT.match(p.name)) and not p.name.endswith(".sha256")]
    return sorted(found, reverse=True)


def holds_run(run_dir: str | os.PathLike) -> bool:
    d = Path(run_dir)
    metrics = d / METRICS
    return ((d / RUN_FILE).exists() or bool(checkpoint_files(d))
            or (metrics.is_file() and metrics.stat().st_size > 0))


def what_is_there(run_dir: str | os.PathLike, record: RunRecord | None) -> str:
    ckpts = checkpoint_files(run_dir)
    newest = f"newest checkpoint {ckpts[0][1].name}" if ckpts else "no checkpoint"
    return f"{record.describe() if record else 'a run without a run.json'}, {newest}"


@dataclass
class Opened:
    """Rank 0's view of the run directory after the start-up rules: the run there (None: a new run) and the
    resume mode to apply (the flag's, or 'auto' for this Slurm job's own run)."""
    record: RunRecord | None
    resume: str


def open_run(run_dir: str | os.PathLike, identity: dict, resume: str, new_run: bool, slurm_job: str | None,
             log: Callable[[str], object]) -> Opened:
    """The start-up rules (see the module docstring) for the parts of the identity known from the config."""
    d = Path(run_dir)
    if not holds_run(d):
        return Opened(None, resume)
    record = read_record(d)
    if record is not None and slurm_job and record.slurm_job == slurm_job and (new_run or resume != "auto"):
        if checkpoint_files(d):
            log(f"run dir {d} holds {record.describe()}, started by this Slurm job {slurm_job}: resuming it "
                "(a requeue or relaunch of the job)")
            return Opened(record, "auto")
        return Opened(record, resume)
    if new_run:
        where = archive_run(d, record)
        log(f"--new-run: moved the earlier run in {d} to {where}")
        return Opened(None, resume)
    ways = ways_out(d)
    if resume == "never":
        raise RunDirError(f"run dir {d} holds {what_is_there(d, record)}: --resume never would start a new run "
                          f"over it; {ways}")
    diff = difference(identity, record.identity()) if record else None
    if diff:
        raise RunDirError(f"run dir {d} holds another run ({diff}): {ways}")
    return Opened(record, resume)


def ways_out(run_dir: str | os.PathLike) -> str:
    return f"use another --run-dir, or --new-run to move that run to {Path(run_dir) / ARCHIVE}/run-<id>/"


def _move(src: Path, dest_dir: Path) -> None:
    dest_dir.mkdir(parents=True, exist_ok=True)
    os.replace(src, dest_dir / src.name)


def archive_run(run_dir: Path, record: RunRecord | None) -> Path:
    """Move every output of the run in `run_dir` to archive/run-<id>/ (renames on one file system; run.json
    last, so an interrupted archive is finished by the next --new-run into the same folder)."""
    name = f"run-{record.run_id}" if record else f"run-unrecorded-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
    dest = run_dir / ARCHIVE / name
    for p in [*(run_dir / n for n in OUTPUTS), *sorted(run_dir.glob("hang-*")), run_dir / RUN_FILE]:
        if p.exists():
            _move(p, dest)
    fsync_dir(run_dir)
    return dest


def set_aside_redone(run_dir: str | os.PathLike, step: int) -> tuple[Path | None, list[str], int]:
    """What a run resumed at `step` trains again: checkpoints above it and metrics records after it (and a torn
    last line), moved to archive/redone-<time>-after-step-<step>/. Returns (that folder or None, the checkpoint
    names, the number of records)."""
    d = Path(run_dir)
    dest = d / ARCHIVE / f"redone-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-after-step-{step}"
    names = []
    for s, path in checkpoint_files(d):
        if s > step:
            for p in (path, path.with_name(path.name + ".sha256")):
                if p.exists():
                    _move(p, dest / "checkpoints")
            names.append(path.name)
    records = _split_metrics(d / METRICS, step, dest / METRICS)
    return (dest if names or records else None), names, records


def _split_metrics(path: Path, step: int, aside: Path) -> int:
    if not path.is_file():
        return 0
    keep, later = [], []
    for line in path.read_text().splitlines():
        try:
            (keep if json.loads(line)["step"] <= step else later).append(line)
        except (ValueError, KeyError, TypeError):
            later.append(line)  # a torn line of a killed writer
    if later:
        aside.parent.mkdir(parents=True, exist_ok=True)
        with open(aside, "a") as f:  # first the side file, durably; then the shortened original
            f.write("".join(x + "\n" for x in later))
            f.flush()
            os.fsync(f.fileno())
        atomic_write(path, lambda f: f.write("".join(x + "\n" for x in keep).encode()))
    return len(later)


_status_dir: Path | None = None  # set once this process keeps the status of the run in it (rank 0)
_writing = threading.RLock()  # one writer of run.json at a time (re-entrant: a signal handler may update it)
_pending: dict = {}  # fields handed to the background writer and not yet written
_pending_lock = threading.Lock()
_wake = threading.Event()
_writer: threading.Thread | None = None
WRITE_WAIT_S = 30.0  # an update waits this long for a write in progress (a hung file system), then is dropped


def keep_status(run_dir: str | os.PathLike | None) -> None:
    global _status_dir
    _status_dir = Path(run_dir) if run_dir is not None else None


def update_status(*, later: bool = False, **fields) -> None:
    """Merge `fields` into run.json's status, atomically; a no-op on every process but the one that keeps it. A
    failed write (full disk) is not fatal: the checkpoint write that matters has its own error path. `later`:
    written by a background thread; the next update that is not `later` writes them first if it has not."""
    global _writer
    if _status_dir is None:
        return
    if not later:
        _write(fields)
        return
    with _pending_lock:
        _pending.update(fields)
        if _writer is None:
            _writer = threading.Thread(target=_write_pending, name="hpctrain-status", daemon=True)
            _writer.start()
    _wake.set()


def _write_pending() -> None:
    while True:
        _wake.wait()
        _wake.clear()
        _write({})


def _write(fields: dict) -> None:
    if not _writing.acquire(timeout=WRITE_WAIT_S):
        return
    try:
        with _pending_lock:  # taken under the write lock: an older value never lands after a newer one
            merged = {**_pending, **fields}
            _pending.clear()
        if not merged or _status_dir is None:
            return
        path = _status_dir / RUN_FILE
        data = json.loads(path.read_text())
        data["status"] = {**data.get("status", {}), **merged, "updated": round(time.time(), 3)}
        atomic_write(path, lambda f: f.write((json.dumps(data, indent=1) + "\n").encode()))
    except (OSError, ValueError):
        pass
    finally:
        _writing.release()


def read_status(run_dir: str | os.PathLike) -> dict:
    """The status of the run in run_dir ({} when there is none or run.json cannot be read)."""
    try:
        return json.loads((Path(run_dir) / RUN_FILE).read_text()).get("status", {})
    except (OSError, ValueError, AttributeError):
        return {}
