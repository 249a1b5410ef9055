"""What a finished job step says, and what the supervisor does about it. Framework-neutral, stdlib only.

Pure functions over three sources, none of them log prose of the ranks:
  - srun's own per-task lines on its stderr (Slurm's format, in the order srun learnt of them):
        srun: error: node3: task 2: Killed
        srun: error: node1: tasks 0-1: Exited with exit code 85
        srun: error: node1: task 0: Terminated          (a rank srun itself ended: --kill-on-bad-exit)
    The first line is the task that failed first; the others follow once srun ends the step.
  - the run's status in run_dir/run.json (hpctrain.rundir: state, step, checkpoint_step, exit_code, ...),
  - the hang records run_dir/hang-<rank>.json that the ranks' watchdogs wrote during this launch.
"Of this launch" is decided by a snapshot taken just before srun starts: a status or hang record that
changed since was written by this launch (no clock of another node is compared with ours).

The exit codes come from hpctrain.errors; ACTIONS says what each of them makes the supervisor do.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from hpctrain import errors, rundir
from hpctrain.errors import (
    EXIT_ABORTED,
    EXIT_HANG,
    EXIT_NONFINITE,
    EXIT_PREEMPTED,
    EXIT_SAVE_FAILED,
    EXIT_USER_ERROR,
)

TASK_LINE = re.compile(r"^srun: error: ([^: ]+): tasks? ([0-9,-]+): (.*)$")
_EXITED = re.compile(r"^Exited with exit code (\d+)$")

DONE, REQUEUE, RESTART, STOP = "done", "requeue", "restart", "stop"
# What the step's code makes the supervisor do. Every code of hpctrain.errors is here (a test checks);
# any other non-zero code is a rank that died or crashed (a signal: 128+N): RESTART.
ACTIONS: dict[int, tuple[str, str]] = {
    0: (DONE, "done"),
    EXIT_PREEMPTED: (REQUEUE, "every rank saved a checkpoint on a signal"),
    EXIT_HANG: (RESTART, "the hang watchdog fired"),
    EXIT_USER_ERROR: (STOP, "a relaunch would fail the same way"),
    EXIT_SAVE_FAILED: (STOP, "a relaunch would fail the same way"),
    EXIT_NONFINITE: (STOP, "a relaunch would fail the same way"),
    EXIT_ABORTED: (STOP, "the ranks were aborted (a second interrupt), nothing saved"),
}


def exit_codes() -> dict[str, int]:
    """Every exit code hpctrain.errors defines, by name (EXIT_*)."""
    return {k: v for k, v in vars(errors).items() if k.startswith("EXIT_") and isinstance(v, int)}


def action(code: int) -> str:
    return ACTIONS.get(code, (RESTART, ""))[0]


@dataclass
class TaskLine:
    node: str
    tasks: tuple[int, ...]
    what: str   # "Killed", "Exited with exit code 85", "Terminated", ...
    text: str   # the line without "srun: error: ", e.g. "node3: task 2: Killed"

    @property
    def code(self) -> int | None:
        """The task's own exit code; None when it died by a signal."""
        m = _EXITED.match(self.what)
        return int(m.group(1)) if m else None


def _task_ids(spec: str) -> tuple[int, ...]:
    ids: list[int] = []
    for part in spec.split(","):
        first, _, last = part.partition("-")
        if first.isdigit() and (not last or last.isdigit()):
            ids.extend(range(int(first), int(last or first) + 1))
    return tuple(ids)


def task_line(line: str) -> TaskLine | None:
    m = TASK_LINE.match(line.rstrip("\r\n"))
    if not m:
        return None
    node, spec, what = m.groups()
    return TaskLine(node, _task_ids(spec), what, m.group(0)[len("srun: error: "):])


def task_lines(text: str) -> list[TaskLine]:
    """srun's per-task lines in a block of its stderr, in order."""
    return [t for t in map(task_line, text.splitlines()) if t is not None]


# ------------------------------------------------------------------ the run directory before and after

@dataclass
class Snapshot:
    """What the run dir held when a launch started: its status' `updated` and each hang record's `time`."""
    updated: float | None = None
    hangs: dict[str, float | None] = field(default_factory=dict)


def _hang_records(run_dir: Path) -> dict[str, dict]:
    found = {}
    for path in sorted(run_dir.glob("hang-*.json")):
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # being written, or not a record
        if isinstance(record, dict):
            found[path.name] = record
    return found


def snapshot(run_dir: Path | None) -> Snapshot:
    if run_dir is None:
        return Snapshot()
    hangs = {name: r.get("time") for name, r in _hang_records(run_dir).items()}
    return Snapshot(rundir.read_status(run_dir).get("updated"), hangs)


@dataclass
class Evidence:
    """Everything known about one finished launch."""
    srun_status: int                                       # srun's exit status (128+N: killed by signal N)
    tasks: list[TaskLine] = field(default_factory=list)   # srun's per-task lines, in srun's order
    status: dict = field(default_factory=dict)             # the run's status now ({}: no run dir or run.json)
    fresh: bool = False                                    # ... and this launch wrote it
    hangs: list[dict] = field(default_factory=list)        # hang-<rank>.json records this launch wrote
    lost: list[str] = field(default_factory=list)          # step nodes srun was ended without (unreachable)


def evidence(srun_status: int, tasks: list[TaskLine], run_dir: Path | None, before: Snapshot) -> Evidence:
    if run_dir is None:
        return Evidence(srun_status, tasks)
    status = rundir.read_status(run_dir)
    fresh = bool(status) and status.get("updated") != before.updated
    hangs = [r for name, r in _hang_records(run_dir).items()
             if name not in before.hangs or before.hangs[name] != r.get("time")]
    return Evidence(srun_status, tasks, status, fresh, hangs)


# ------------------------------------------------------------------ what happened

def step_code(ev: Evidence) -> int:
    """The code the step ended with. srun's own status is the worst task's (often a rank srun ended itself,
    143), so: the run's status of this launch where it is final (an agreed stop: 85, done: 0), else the
    exit code of the first failed task, else srun's status when that task died by a signal, else the
    status' exit code (no task line at all), else srun's status."""
    if ev.srun_status == 0:
        return 0
    state = ev.status.get("state") if ev.fresh else None
    if state == "stopped":
        return EXIT_PREEMPTED
    if state == "done":
        return 0
    if ev.tasks:
        first = ev.tasks[0].code
        return ev.srun_status if first is None else first
    code = ev.status.get("exit_code") if ev.fresh else None
    if state == "failed" and isinstance(code, int) and code > 0:
        return code
    return ev.srun_status


def cause(ev: Evidence, code: int) -> str:
    """The failure in words, from srun's first task line (no parentheses: the restart line quotes it in some)."""
    if ev.tasks:
        words = ev.tasks[0].text
    elif ev.fresh and ev.status.get("state") in ("stopped", "done", "failed"):
        words = f"run status {ev.status['state']}, exit code {ev.status.get('exit_code')}"
    else:
        words = "no failed task reported by srun"
    return f"hang watchdog: {words}" if code == EXIT_HANG else words


def blame(ev: Evidence, code: int) -> list[str]:
    """The node(s) to blame, sorted; [] when unsure.

    Hang (86): every rank whose watchdog fired wrote hang-<rank>.json and exited 86; a frozen rank writes
    nothing. So the step's nodes (those srun reports tasks of: every task of such a step ends non-zero)
    with no hang record, when some but not all of them have one.
    Otherwise: the node of the first task line that is a signal or an exit code that is not one of
    hpctrain's own (those are ends the ranks agreed on, not one node's fault).
    Before all that: the nodes the supervisor could not reach (their records, on a file system they may
    still see, prove nothing about their link)."""
    if ev.lost:
        return sorted(ev.lost)
    if code == EXIT_HANG:
        reported = {str(r["node"]) for r in ev.hangs if r.get("node")}
        step_nodes = {t.node for t in ev.tasks} | reported
        return sorted(step_nodes - reported) if reported else []
    own = set(exit_codes().values())
    for t in ev.tasks:
        if t.code is None or t.code not in own:
            return [t.node]
    return []


def progress(status: dict) -> str:
    """"last checkpoint step S, last trained step T, steps lost N" from the run's status: the relaunch resumes
    at S and trains T - S steps again (T is the last logged step: a lower bound with --log-every > 1)."""
    if not status:
        return "last checkpoint step unknown, last trained step unknown, steps lost unknown"
    saved, trained = status.get("checkpoint_step"), status.get("step")
    saved_text = str(saved) if isinstance(saved, int) else "none"
    if not isinstance(trained, int):
        return f"last checkpoint step {saved_text}, last trained step unknown, steps lost unknown"
    lost = max(0, trained - (saved if isinstance(saved, int) else 0))
    return f"last checkpoint step {saved_text}, last trained step {trained}, steps lost {lost}"


def exclusion(excluded: list[str], blamed: list[str], spares: int) -> tuple[list[str], str]:
    """The nodes to exclude from the relaunch and a note: a spare node takes the place of each blamed one
    while spares last; without one the step restarts on the same nodes."""
    if not blamed:
        return excluded, ""
    wanted = sorted(set(excluded) | set(blamed))
    if len(wanted) <= spares:
        return wanted, ""
    if spares > 0:
        return excluded, f" (no spare node left: HPCTRAIN_SPARE_NODES={spares})"
    return excluded, ""


# ------------------------------------------------------------------ what to do

@dataclass
class Situation:
    """The supervisor's side of a decision."""
    job: str                   # the id scontrol knows the job by (<array job>_<task> in job arrays)
    signal: str | None         # USR1 / TERM when the batch shell got one
    restarts: int              # relaunches in this allocation so far
    max_restarts: int          # HPCTRAIN_MAX_RESTARTS
    requeued: int              # SLURM_RESTART_COUNT
    max_requeues: int          # HPCTRAIN_MAX_REQUEUES
    blamed_all: list[str] = field(default_factory=list)  # every node blamed in this allocation


@dataclass
class Decision:
    action: str           # DONE, REQUEUE (scontrol requeue, then exit 0), RESTART, STOP
    exit_code: int        # the job's exit code when the supervisor ends here
    line: str | None      # what to print, after "hpctrain: "


def _state_text(state: str | None) -> str:
    return f"JobState={state}" if state else "state unknown"


def decide(code: int, cause_text: str, s: Situation, job_state, now: str) -> Decision:
    """The decision table (docs/slurm.md). `job_state()` asks Slurm (RUNNING, COMPLETING, ...; None: unknown),
    only where it matters; `now` is the time of day for the requeue line."""
    what, reason = ACTIONS.get(code, (RESTART, ""))
    if what == DONE:
        return Decision(DONE, 0, None)
    if what == REQUEUE:
        # A plain scancel, the time limit or a preemption also send SIGTERM, but then Slurm is already
        # ending the job (COMPLETING): requeueing would make scancel unable to stop it.
        state = job_state()
        if state != "RUNNING":
            return Decision(STOP, code, f"step stopped on a signal with a checkpoint saved (exit {code}); Slurm is "
                                        f"ending job {s.job} ({_state_text(state)}): not requeueing, resubmit to "
                                        "resume")
        if s.requeued >= s.max_requeues:
            return Decision(STOP, code, f"step stopped on a signal (exit {code}) but job {s.job} was already "
                                        f"requeued {s.requeued} time(s) (HPCTRAIN_MAX_REQUEUES={s.max_requeues}): "
                                        "not requeueing")
        return Decision(REQUEUE, code, f"step stopped on a signal with a checkpoint saved (exit {code}): requeueing "
                                       f"job {s.job} at {now}")
    if what == STOP:
        return Decision(STOP, code, f"step exit {code} ({cause_text}): not restarting, {reason}")
    if s.signal:
        return Decision(STOP, code, f"step exit {code} ({cause_text}) after SIG{s.signal}: not restarting")
    state = job_state()
    if state != "RUNNING":
        return Decision(STOP, code, f"step exit {code} ({cause_text}); Slurm is ending job {s.job} "
                                    f"({_state_text(state)}): not restarting")
    if s.restarts >= s.max_restarts:
        return Decision(STOP, code, f"giving up after {s.restarts} restart(s) in the same allocation "
                                    f"(HPCTRAIN_MAX_RESTARTS={s.max_restarts}): last step exit {code} ({cause_text}); "
                                    f"blamed node(s) {','.join(s.blamed_all) or 'none'}")
    return Decision(RESTART, code, None)
