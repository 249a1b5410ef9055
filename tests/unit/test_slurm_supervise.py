"""The Slurm supervisor (python -m hpctrain.slurm supervise) without Slurm: srun's per-task lines, the run's
status (run.json) and the hang records as files -> every decision (hpctrain.slurm.outcome); then the real
supervisor process against a stand-in `srun` and `scontrol` on PATH: every exit code of hpctrain.errors end to
end, relaunch, blame, spare nodes, steps lost, signals, requeue; and slurm/env.sh calling it."""
from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hpctrain import errors, recipes
from hpctrain.slurm import outcome, reach, supervise
from hpctrain.slurm.outcome import DONE, REQUEUE, RESTART, STOP, Evidence, Situation
from tests.launch import ROOT, env
from tests.slurm.test_restart import RESTART_LINE

CODES = outcome.exit_codes()  # every EXIT_* of hpctrain/errors.py, by name
KILL = "srun: error: node3: task 2: Killed\nsrun: error: node1: task 0: Terminated\nsrun: error: node2: task 1: Killed"


def _status(run_dir: Path, **fields) -> dict:
    status = {"state": "running", "step": 6, "checkpoint": "ckpt-00000004.pt", "checkpoint_step": 4, "resumed_at": 0,
              "exit_code": None, "reason": None, "updated": time.time(), **fields}
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "run.json").write_text(json.dumps({"run_id": "r", "framework": "torch", "recipe": "resnet",
                                                  "signature": {}, "status": status}))
    return status


def _hang(run_dir: Path, rank: int, node: str, at: float | None = None) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / f"hang-{rank}.json").write_text(json.dumps({"rank": rank, "node": node, "step": 7, "phase": None,
                                                           "seconds": 20.4, "limit": 20.0, "pid": 1,
                                                           "time": at or time.time()}))


def _evidence(run_dir: Path | None, srun_status: int, srun_err: str, before=None) -> Evidence:
    return outcome.evidence(srun_status, outcome.task_lines(srun_err), run_dir, before or outcome.Snapshot())


# ---------------------------------------------------------------- srun's lines

def test_task_lines_are_slurms_format_and_nothing_else():
    lines = outcome.task_lines("hpctrain.resnet: step 3\nsrun: error: node3: task 2: Killed\n"
                               "srun: launch/slurm: _step_signal: Terminating StepId=1.0\n"
                               "srun: error: node1: tasks 0-1,4: Exited with exit code 85\n"
                               "srun: error: Unable to create step for job 7: Job/step already completing\n")
    assert [(t.node, t.tasks, t.code, t.text) for t in lines] == [
        ("node3", (2,), None, "node3: task 2: Killed"),
        ("node1", (0, 1, 4), 85, "node1: tasks 0-1,4: Exited with exit code 85")]


# ---------------------------------------------------------------- the step's code

@pytest.mark.parametrize("srun_status, err, expected", [
    (0, "", 0),
    (143, "srun: error: node2: task 1: Exited with exit code 85\nsrun: error: node1: task 0: Terminated", 85),
    (137, KILL, 137),   # the first failed task died by a signal: srun's status
    (87, "srun: error: node1: tasks 0-1: Exited with exit code 87", 87),
    (1, "", 1),         # no task line, no status: srun's own
])
def test_step_code_is_the_first_failed_task(srun_status, err, expected):
    ev = _evidence(None, srun_status, err)
    assert outcome.step_code(ev) == expected


def test_step_code_from_the_status_of_this_launch(tmp_path):
    run = tmp_path / "run"
    old = _status(run, state="failed", exit_code=87)
    before = outcome.snapshot(run)
    # An agreed stop that rank 0 confirmed (checkpoint saved) is a requeue whatever srun's first line says.
    _status(run, state="stopped", exit_code=85, updated=old["updated"] + 1)
    assert outcome.step_code(_evidence(run, 137, KILL, before)) == 85
    _status(run, state="done", exit_code=0, updated=old["updated"] + 2)  # a rank died after the end: done
    assert outcome.step_code(_evidence(run, 1, "srun: error: node2: task 1: Exited with exit code 1", before)) == 0
    _status(run, state="failed", exit_code=88, updated=old["updated"] + 3)  # no task line: the status' code
    assert outcome.step_code(_evidence(run, 1, "", before)) == 88
    # A status the launch did not write (it died before rank 0 got to it) says nothing about the launch.
    _status(run, **{k: old[k] for k in ("state", "exit_code", "updated")})
    ev = _evidence(run, 1, "", before)
    assert not ev.fresh and outcome.step_code(ev) == 1


# ---------------------------------------------------------------- blame

@pytest.mark.parametrize("err, blamed", [
    (KILL, ["node3"]),                                                          # kill -9: the first killed task
    ("srun: error: node4: task 3: Exited with exit code 1\nsrun: error: node1: task 0: Terminated", ["node4"]),
    ("srun: error: node2: task 1: Exited with exit code 85\nsrun: error: node1: task 0: Killed", ["node1"]),
    ("srun: error: node1: tasks 0-1: Exited with exit code 87\nsrun: error: node2: task 2: Exited with exit code 87",
     []),
    ("", []),
])
def test_blame_the_first_node_that_died_on_its_own(err, blamed):
    assert outcome.blame(_evidence(None, 137, err), 137) == blamed


def test_blame_on_a_hang_is_the_nodes_without_a_hang_record_of_this_launch(tmp_path):
    run = tmp_path / "run"
    _hang(run, 1, "node2", at=1000.0)  # an earlier launch's record: not this launch's
    before = outcome.snapshot(run)
    err = ("srun: error: node1: tasks 0-1: Exited with exit code 86\nsrun: error: node2: tasks 2-3: Killed\n"
           "srun: error: node3: tasks 4-5: Exited with exit code 86")
    assert outcome.blame(_evidence(run, 137, err, before), 86) == []  # nobody reported in this launch: unsure
    _hang(run, 0, "node1")
    _hang(run, 4, "node3")
    ev = _evidence(run, 137, err, before)
    assert [h["rank"] for h in ev.hangs] == [0, 4]
    assert outcome.blame(ev, 86) == ["node2"]  # the frozen rank's node: it wrote nothing
    _hang(run, 2, "node2")  # every node reported (a hang of all of them): nobody to blame
    assert outcome.blame(_evidence(run, 137, err, before), 86) == []
    assert outcome.cause(ev, 86) == "hang watchdog: node1: tasks 0-1: Exited with exit code 86"


def test_blame_the_nodes_that_could_not_be_reached_first(tmp_path):
    # A node cut off still sees the shared file system here: its ranks' hang records prove nothing.
    run = tmp_path / "run"
    before = outcome.snapshot(run)
    for rank, node in enumerate(["node1", "node2", "node3"]):
        _hang(run, rank, node)
    err = "srun: error: node1: task 0: Exited with exit code 86\nsrun: error: node3: task 2: Exited with exit code 86"
    ev = _evidence(run, 137, err, before)
    assert outcome.blame(ev, 86) == []
    ev.lost = ["node2"]
    assert outcome.blame(ev, 86) == ["node2"]


def test_newest_numbered_step_is_the_one_running():
    text = "42.batch node1\n42.extern node[1-5]\n42.0 node[1-4]\n42.1 node[1,3-5]\n"
    assert reach.newest_step(text) == "node[1,3-5]"
    assert reach.newest_step("42.batch node1\n") is None and reach.newest_step("") is None


def test_unreachable_is_a_refused_or_unanswered_connection(monkeypatch):
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        with socket.socket() as closed:
            closed.bind(("127.0.0.1", 0))  # bound, never listening: a connection is refused
            ports = {"node1": listening.getsockname()[1], "node2": closed.getsockname()[1]}
            monkeypatch.setattr(reach, "address", lambda node: ("127.0.0.1", ports[node]))
            assert reach.unreachable(["node1", "node2"], timeout=2) == ["node2"]
    assert reach.unreachable([]) == []


# ---------------------------------------------------------------- steps lost, spare nodes

@pytest.mark.parametrize("fields, text", [
    ({"checkpoint_step": 4, "step": 6}, "last checkpoint step 4, last trained step 6, steps lost 2"),
    ({"checkpoint_step": None, "checkpoint": None, "step": 3}, "last checkpoint step none, last trained step 3, "
                                                               "steps lost 3"),
    ({"checkpoint_step": 8, "step": 8}, "last checkpoint step 8, last trained step 8, steps lost 0"),
    (None, "last checkpoint step unknown, last trained step unknown, steps lost unknown"),
])
def test_steps_lost_from_the_status(tmp_path, fields, text):
    if fields is not None:
        _status(tmp_path, **fields)
    assert outcome.progress(outcome.rundir.read_status(tmp_path)) == text


def test_spare_nodes_replace_blamed_ones_while_they_last():
    assert outcome.exclusion([], ["node3"], 1) == (["node3"], "")
    assert outcome.exclusion(["node3"], ["node1"], 1) == (["node3"], " (no spare node left: HPCTRAIN_SPARE_NODES=1)")
    assert outcome.exclusion(["node3"], ["node1"], 2) == (["node1", "node3"], "")
    assert outcome.exclusion([], ["node3"], 0) == ([], "")   # no spares: the same nodes again
    assert outcome.exclusion(["node3"], [], 1) == (["node3"], "")


# ---------------------------------------------------------------- the decision table

def _decide(code, signal_=None, state="RUNNING", restarts=0, requeued=0):
    asked = []

    def job_state():
        asked.append(1)
        return state
    s = Situation("42", signal_, restarts, 2, requeued, 20, ["node3"])
    return outcome.decide(code, "node3: task 2: Killed", s, job_state, "12:00:00"), bool(asked)


EXPECTED = {"EXIT_USER_ERROR": STOP, "EXIT_PREEMPTED": REQUEUE, "EXIT_HANG": RESTART, "EXIT_SAVE_FAILED": STOP,
            "EXIT_NONFINITE": STOP, "EXIT_ABORTED": STOP}


def test_every_exit_code_of_hpctrain_has_a_decision():
    # A new code in hpctrain/errors.py must get a line in outcome.ACTIONS and here.
    assert set(CODES) == set(EXPECTED), "hpctrain/errors.py and the supervisor's table differ"
    assert set(CODES.values()) <= set(outcome.ACTIONS)
    for name, code in CODES.items():
        assert outcome.action(code) == EXPECTED[name], name


@pytest.mark.parametrize("code, action, exit_code, words", [
    (0, DONE, 0, None),
    (errors.EXIT_PREEMPTED, REQUEUE, 85, "step stopped on a signal with a checkpoint saved (exit 85): requeueing job "
                                         "42 at 12:00:00"),
    (errors.EXIT_HANG, RESTART, 86, None),
    (1, RESTART, 1, None),
    (137, RESTART, 137, None),
    (errors.EXIT_USER_ERROR, STOP, 2, "step exit 2 (node3: task 2: Killed): not restarting, a relaunch would fail "
                                      "the same way"),
    (errors.EXIT_SAVE_FAILED, STOP, 87, "not restarting, a relaunch would fail the same way"),
    (errors.EXIT_NONFINITE, STOP, 88, "not restarting, a relaunch would fail the same way"),
    (errors.EXIT_ABORTED, STOP, 130, "not restarting, the ranks were aborted"),
])
def test_decision_per_code(code, action, exit_code, words):
    d, _ = _decide(code)
    assert (d.action, d.exit_code) == (action, exit_code)
    assert (d.line is None) if words is None else (words in d.line), d.line


@pytest.mark.parametrize("code", [1, 137, errors.EXIT_HANG])
def test_no_restart_after_a_signal_or_once_slurm_ends_the_job_or_the_limit(code):
    d, asked = _decide(code, signal_="USR1")
    assert d.action == STOP and d.line == f"step exit {code} (node3: task 2: Killed) after SIGUSR1: not restarting"
    assert not asked
    d, _ = _decide(code, state="COMPLETING")
    assert d.action == STOP and d.line.endswith("Slurm is ending job 42 (JobState=COMPLETING): not restarting")
    d, _ = _decide(code, state=None)
    assert d.action == STOP and "(state unknown): not restarting" in d.line
    d, _ = _decide(code, restarts=2)
    assert d.action == STOP and d.line == (f"giving up after 2 restart(s) in the same allocation (HPCTRAIN_MAX_"
                                           f"RESTARTS=2): last step exit {code} (node3: task 2: Killed); blamed "
                                           "node(s) node3")


def test_no_requeue_once_slurm_ends_the_job_or_after_the_limit():
    d, _ = _decide(85, state="COMPLETING", signal_="TERM")
    assert (d.action, d.exit_code) == (STOP, 85)
    assert d.line == ("step stopped on a signal with a checkpoint saved (exit 85); Slurm is ending job 42 "
                      "(JobState=COMPLETING): not requeueing, resubmit to resume")
    d, _ = _decide(85, requeued=20)
    assert d.action == STOP and "already requeued 20 time(s) (HPCTRAIN_MAX_REQUEUES=20): not requeueing" in d.line


@pytest.mark.parametrize("name, value", [("HPCTRAIN_MAX_RESTARTS", "two"), ("HPCTRAIN_MAX_REQUEUES", "-1"),
                                         ("HPCTRAIN_SPARE_NODES", "1;reboot"), ("SLURM_RESTART_COUNT", "x"),
                                         ("HPCTRAIN_STEP_END_WAIT", "20s")])
def test_bad_setting_is_one_line_exit_2(name, value, tmp_path):
    p = _supervise(tmp_path, ["--", "true"], {name: value})
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr == f"hpctrain: error: {name}={value!r} is not a whole number (allowed: 0, 1, 2, ...)\n"


# ---------------------------------------------------------------- the run dir of the step

@pytest.mark.parametrize("command, run_dir", [
    (["python3", "-m", "hpctrain.resnet", "--run-dir", "/scratch/r1"], "/scratch/r1"),
    (["python3", "-m", "hpctrain.resnet", "--config", "configs/tiny.toml"], f"{ROOT}/runs/tiny"),
    (["apptainer", "exec", "x.sif", "python3", "-m", "hpctrain.bert", "--mask-prob", "0.2"], f"{ROOT}/runs/default"),
    (["python3", "-m", "hpctrain.resnet", "--mask-prob", "0.2"], None),  # a BERT flag: the recipe's own parser
    (["bash", "-c", "exit 0"], None),
    (["python3", "-m", "hpctrain.doctor"], None),
    (["python3", "-m", "hpctrain.resnet", "--no-such-flag", "1"], None),  # the ranks will say it
    (["python3", "-m", "hpctrain.resnet", "--print-config"], None),
])
def test_run_dir_found_the_way_hpctrain_resolves_it(command, run_dir, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    found = supervise.find_run_dir(command)
    assert (None if found is None else str(found)) == run_dir
    out = capsys.readouterr().out
    if run_dir is None and command[-2].startswith("--") and command[-2] != "--print-config":
        assert out.startswith(f"hpctrain: note: no run dir for the step (unrecognized arguments: {command[-2]}")
        assert out.endswith("): deciding from srun's lines alone\n") and out.count("\n") == 1
    else:
        assert out == ""


def test_run_dir_fallback_without_the_recipe(tmp_path):
    (tmp_path / "c.toml").write_text('[run]\nrun_dir = "runs/x"\n')
    assert supervise._fallback_run_dir(["--config", str(tmp_path / "c.toml"), "--lr", "1"]) == "runs/x"
    assert supervise._fallback_run_dir(["--config", str(tmp_path / "c.toml"), "--run-dir", "r"]) == "r"
    assert supervise._fallback_run_dir([]) == "runs/default"


def test_run_dir_when_the_recipe_does_not_import_on_the_host(monkeypatch, capsys):
    def missing(name):
        raise ModuleNotFoundError("No module named 'numpy'")
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(recipes, "get", missing)
    found = supervise.find_run_dir(["python3", "-m", "hpctrain.resnet", "--config", "configs/tiny.toml"])
    assert found == ROOT / "runs" / "tiny"
    assert capsys.readouterr().out == ("hpctrain: note: cannot import the resnet recipe here (No module named "
                                       "'numpy'): run dir from --run-dir/--config alone\n")


def test_supervisor_imports_no_framework():
    code = ("import sys; from hpctrain.slurm import supervise; "
            "supervise.find_run_dir(['python3', '-m', 'hpctrain.resnet', '--config', 'configs/tiny.toml']); "
            "supervise.find_run_dir(['python3', '-m', 'hpctrain.bert']); "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'tensorflow', 'keras', 'horovod'}))")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env(), capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and p.stdout.strip() == "[]", p.stdout + p.stderr


# ---------------------------------------------------------------- the supervisor against a stand-in srun

FAKE_SRUN = """#!/bin/bash
# Stand-in srun: logs its arguments and PYTHONPATH, runs launch-<n>.sh (else launch.sh) of $FAKE_DIR as the step.
n=$(( $(cat "$FAKE_DIR/count" 2>/dev/null || echo 0) + 1 )); echo $n > "$FAKE_DIR/count"
printf '%s\\n' "$*" >> "$FAKE_DIR/srun.log"
printf '%s\\n' "${PYTHONPATH-unset}" >> "$FAKE_DIR/pythonpath.log"
s="$FAKE_DIR/launch-$n.sh"; [ -f "$s" ] || s="$FAKE_DIR/launch.sh"
exec bash "$s" "$@"
"""
FAKE_SCONTROL = """#!/bin/bash
printf '%s\\n' "$*" >> "$FAKE_DIR/scontrol.log"
case $1:$2 in
  show:hostnames) echo "${FAKE_HOSTNAMES-}" ;;
  show:node) echo "NodeName=$4 NodeAddr=127.0.0.1 Port=${FAKE_SLURMD_PORT:-1} State=ALLOCATED" ;;
  show:*) echo "JobId=$3 JobName=x JobState=${FAKE_JOB_STATE-RUNNING} Reason=None" ;;
  requeue:*) exit "${FAKE_REQUEUE_RC:-0}" ;;
esac
"""
FAKE_SQUEUE = """#!/bin/bash
printf '%s\\n' "${FAKE_STEPS-}"
"""


def _fake_bin(tmp_path: Path) -> Path:
    b = tmp_path / "bin"
    if not b.exists():
        b.mkdir()
        for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL), ("squeue", FAKE_SQUEUE)):
            (b / name).write_text(text)
            (b / name).chmod(0o755)
    return b


def _job_env(tmp_path: Path, extra: dict | None = None) -> dict:
    e = env()
    e.update(PATH=f"{_fake_bin(tmp_path)}:{e['PATH']}", FAKE_DIR=str(tmp_path), SLURM_JOB_ID="42",
             SLURM_JOB_NUM_NODES="4", **(extra or {}))
    return e


def _launches(tmp_path: Path, *steps: str) -> None:
    """The bash body of each launch in turn (the last one repeats)."""
    for i, body in enumerate(steps, 1):
        (tmp_path / f"launch-{i}.sh").write_text(body + "\n")
    (tmp_path / "launch.sh").write_text(steps[-1] + "\n")


def _supervise(tmp_path, argv, extra=None, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hpctrain.slurm", "supervise", *argv], cwd=ROOT,
                          env=_job_env(tmp_path, extra), capture_output=True, text=True, timeout=120, **kw)


def _train(run_dir: Path) -> list[str]:
    return ["--srun-arg=--mpi=pmix", "--srun-arg=--kill-on-bad-exit=1", "--", "python3", "-m", "hpctrain.resnet",
            "--config", "configs/tiny.toml", "--run-dir", str(run_dir)]


def _log(tmp_path: Path, name: str) -> list[str]:
    path = tmp_path / name
    return path.read_text().splitlines() if path.exists() else []


def _write_status(run_dir: Path, **fields) -> str:
    """A bash line that writes the run's status as rank 0 would, updated now."""
    body = json.dumps({"run_id": "r", "status": fields})[:-2]  # without the closing braces
    return f"echo '{body}, \"updated\": '$(date +%s.%N)'}}}}' > {run_dir}/run.json"


def _fail(code: int, run_dir: Path) -> str:
    """One launch that fails with `code` as hpctrain's ranks would, srun's lines and the status included."""
    if code == errors.EXIT_HANG:
        hang = json.dumps({"rank": 0, "node": "node1", "step": 7})[:-1]
        return (f"echo '{hang}, \"time\": '$(date +%s.%N)'}}' > {run_dir}/hang-0.json\n"
                + _write_status(run_dir, state="failed", step=7, checkpoint_step=4, exit_code=86) + "\n"
                "echo 'srun: error: node1: task 0: Exited with exit code 86' >&2\n"
                "echo 'srun: error: node2: task 1: Killed' >&2\nexit 137")
    if code == errors.EXIT_PREEMPTED:
        return (_write_status(run_dir, state="stopped", step=10, checkpoint_step=10, exit_code=85) + "\n"
                "echo 'srun: error: node2: task 1: Exited with exit code 85' >&2\n"
                "echo 'srun: error: node1: task 0: Terminated' >&2\nexit 143")
    if code == 137:
        return ("echo 'srun: error: node3: task 2: Killed' >&2\n"
                "echo 'srun: error: node1: task 0: Terminated' >&2\nexit 137")
    return f"echo 'srun: error: node1: tasks 0-1: Exited with exit code {code}' >&2\nexit {code}"


# name -> (the job's exit code, launches, scontrol requeue called, words in the output)
END_TO_END = {
    "EXIT_USER_ERROR": (2, 1, False, "hpctrain: step exit 2 (node1: tasks 0-1: Exited with exit code 2): not "
                                     "restarting, a relaunch would fail the same way"),
    "EXIT_PREEMPTED": (0, 1, True, "hpctrain: step stopped on a signal with a checkpoint saved (exit 85): "
                                   "requeueing job 42 at "),
    "EXIT_HANG": (0, 2, False, "hpctrain: restart 1/2 in the same allocation: step exit 86 (hang watchdog: node1: "
                               "task 0: Exited with exit code 86); blamed node(s) node2; excluded none; last "
                               "checkpoint step 4, last trained step 7, steps lost 3; at "),
    "EXIT_SAVE_FAILED": (87, 1, False, "hpctrain: step exit 87 (node1: tasks 0-1: Exited with exit code 87): not "
                                       "restarting, a relaunch would fail the same way"),
    "EXIT_NONFINITE": (88, 1, False, "hpctrain: step exit 88 (node1: tasks 0-1: Exited with exit code 88): not "
                                     "restarting, a relaunch would fail the same way"),
    "EXIT_ABORTED": (130, 1, False, "hpctrain: step exit 130 (node1: tasks 0-1: Exited with exit code 130): not "
                                    "restarting, the ranks were aborted"),
    "crash": (0, 2, False, "hpctrain: restart 1/2 in the same allocation: step exit 1 (node1: tasks 0-1: Exited "
                           "with exit code 1); blamed node(s) node1; excluded none; "),
    "kill -9": (0, 2, False, "hpctrain: restart 1/2 in the same allocation: step exit 137 (node3: task 2: Killed); "
                             "blamed node(s) node3; excluded none; "),
    "done": (0, 1, False, None),
}


@pytest.mark.parametrize("name", [*CODES, "crash", "kill -9", "done"])
def test_every_exit_code_end_to_end(name, tmp_path):
    assert set(CODES) <= set(END_TO_END), "a code of hpctrain/errors.py has no end-to-end case"
    run = tmp_path / "run"
    run.mkdir()
    code = {"crash": 1, "kill -9": 137, "done": 0}[name] if name not in CODES else CODES[name]
    _launches(tmp_path, _fail(code, run) if code else "exit 0", "echo 'step: trained to the end'; exit 0")
    p = _supervise(tmp_path, _train(run))
    exit_code, launches, requeued, words = END_TO_END[name]
    assert p.returncode == exit_code, p.stdout + p.stderr
    assert len(_log(tmp_path, "srun.log")) == launches
    assert ("requeue 42" in _log(tmp_path, "scontrol.log")) == requeued
    assert words is None or words in p.stdout, p.stdout + p.stderr
    # srun's stderr is passed through whole; the supervisor's own lines are one per decision.
    assert _fail(code, run).count("srun: error:") == p.stderr.count("srun: error:") or not code
    for line in RESTART_LINE.findall(p.stdout):
        assert line[0] == "1" and line[1] == "2"


def test_restart_line_steps_lost_and_spare_node(tmp_path):
    # 5 nodes, one spare: kill -9 of a rank on node3 after step 6 (checkpoint 4) -> relaunch without node3;
    # then a crash on node1: no spare left, same nodes; then done.
    run = tmp_path / "run"
    run.mkdir()
    first = _write_status(run, state="running", step=6, checkpoint_step=4) + "\n" + _fail(137, run)
    second = _write_status(run, state="failed", step=9, checkpoint_step=8, exit_code=1) + "\n" + _fail(1, run)
    _launches(tmp_path, first, second, "exit 0")
    p = _supervise(tmp_path, _train(run), {"HPCTRAIN_SPARE_NODES": "1"})
    assert p.returncode == 0, p.stdout + p.stderr
    assert RESTART_LINE.findall(p.stdout) == [
        ("1", "2", "137", "node3: task 2: Killed", "node3", "node3", "4", "6", "2")]
    assert ("hpctrain: restart 2/2 in the same allocation: step exit 1 (node1: tasks 0-1: Exited with exit code 1); "
            "blamed node(s) node1; excluded node3 (no spare node left: HPCTRAIN_SPARE_NODES=1); last checkpoint "
            "step 8, last trained step 9, steps lost 1; at ") in p.stdout
    assert [ln.split()[:3] for ln in _log(tmp_path, "srun.log")] == [
        ["--mpi=pmix", "--kill-on-bad-exit=1", "python3"], ["--mpi=pmix", "--kill-on-bad-exit=1", "--exclude=node3"],
        ["--mpi=pmix", "--kill-on-bad-exit=1", "--exclude=node3"]]


def test_srun_waiting_for_an_unreachable_node_is_ended_and_the_node_replaced(tmp_path):
    # The step's rank on node1 fails; srun never hears from node2 (its stand-in runs on). After
    # HPCTRAIN_STEP_END_WAIT the supervisor finds node2's slurmd refusing connections, ends srun, blames node2
    # and relaunches on the spare, sharing the CPUs the stuck step still holds (--overlap).
    run = tmp_path / "run"
    run.mkdir()
    hung = (_write_status(run, state="running", step=5, checkpoint_step=3) + "\n"
            "echo 'srun: error: node1: task 0: Exited with exit code 86' >&2; exec sleep 600")
    _launches(tmp_path, hung, "exit 0")
    t0 = time.monotonic()
    p = _supervise(tmp_path, _train(run), {"HPCTRAIN_SPARE_NODES": "1", "HPCTRAIN_STEP_END_WAIT": "1",
                                           "FAKE_STEPS": "42.batch node1\n42.0 node[1-2]",
                                           "FAKE_HOSTNAMES": "node1 node2"})
    assert p.returncode == 0 and time.monotonic() - t0 < 30, p.stdout + p.stderr
    assert re.search(r"srun still waits \d+ s after the first failed task: node\(s\) node2 cannot be reached", p.stdout)
    assert RESTART_LINE.findall(p.stdout) == [
        ("1", "2", "86", "hang watchdog: node1: task 0: Exited with exit code 86", "node2", "node2", "3", "5", "2")]
    launches = _log(tmp_path, "srun.log")
    assert "--overlap" not in launches[0] and "--exclude=node2 --overlap" in launches[1]
    probed = [ln for ln in _log(tmp_path, "scontrol.log") if ln.startswith("show node")]
    assert probed == ["show node -o node2"]  # node1 was heard from: never probed


def test_giving_up_names_every_blamed_node(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    _launches(tmp_path, _fail(137, run), "echo 'srun: error: node2: task 0: Killed' >&2\nexit 143")
    p = _supervise(tmp_path, _train(run), {"HPCTRAIN_MAX_RESTARTS": "1"})
    assert p.returncode == 143 and len(RESTART_LINE.findall(p.stdout)) == 1
    assert ("hpctrain: giving up after 1 restart(s) in the same allocation (HPCTRAIN_MAX_RESTARTS=1): last step exit "
            "143 (node2: task 0: Killed); blamed node(s) node2,node3\n") in p.stdout


def test_no_requeue_when_slurm_ends_the_job_or_requeue_fails(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    _launches(tmp_path, _fail(85, run))
    p = _supervise(tmp_path, _train(run), {"FAKE_JOB_STATE": "COMPLETING"})
    assert p.returncode == 85 and "Slurm is ending job 42 (JobState=COMPLETING): not requeueing" in p.stdout
    (tmp_path / "count").unlink()
    p = _supervise(tmp_path, _train(run), {"FAKE_REQUEUE_RC": "1"})
    assert p.returncode == 85 and "hpctrain: error: scontrol requeue 42 failed: resubmit to resume" in p.stderr
    p = _supervise(tmp_path, _train(run), {"SLURM_RESTART_COUNT": "3", "HPCTRAIN_MAX_REQUEUES": "3"})
    assert p.returncode == 85 and "already requeued 3 time(s) (HPCTRAIN_MAX_REQUEUES=3): not requeueing" in p.stdout


def test_array_task_is_requeued_by_its_own_id(tmp_path):
    p = _supervise(tmp_path, ["--status", "85"], {"SLURM_ARRAY_JOB_ID": "40", "SLURM_ARRAY_TASK_ID": "3"})
    assert p.returncode == 0 and "requeueing job 40_3 at" in p.stdout
    assert _log(tmp_path, "scontrol.log") == ["show job 40_3", "requeue 40_3"]
    p = _supervise(tmp_path, ["--status", "87"])  # --status: a step of one's own; only an agreed stop requeues
    assert p.returncode == 87 and p.stdout == ""


WAITING_STEP = """on_usr1() {{ echo "step: got USR1"; {on_signal}; }}
trap on_usr1 USR1
echo ready > {fake}/ready
for i in $(seq 300); do sleep 0.1; done
exit 3"""


@pytest.mark.parametrize("on_signal, words, exit_code", [
    ("echo 'srun: error: node2: task 1: Exited with exit code 85' >&2; exit 85",
     "step stopped on a signal with a checkpoint saved (exit 85): requeueing job 42", 0),
    ("echo 'srun: error: node2: task 1: Killed' >&2; exit 137",
     "hpctrain: step exit 137 (node2: task 1: Killed) after SIGTERM: not restarting", 137),
])
def test_signal_forwarded_to_the_step_as_usr1(tmp_path, on_signal, words, exit_code):
    # SIGTERM to the supervisor (scancel --signal=TERM --batch) reaches the step as SIGUSR1.
    _launches(tmp_path, WAITING_STEP.format(on_signal=on_signal, fake=tmp_path), "exit 0")
    proc = subprocess.Popen([sys.executable, "-m", "hpctrain.slurm", "supervise", "--", "bash", "-c", "true"],
                            cwd=ROOT, env=_job_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not (tmp_path / "ready").exists():
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == exit_code, out + err
    assert re.search(r"hpctrain: batch script got SIGTERM at \d\d:\d\d:\d\d, forwarding it to the job step as "
                     r"SIGUSR1\n", out) and "step: got USR1" in out and words in out, out + err
    assert len(_log(tmp_path, "srun.log")) == 1


def test_signal_before_the_step_is_passed_on(tmp_path):
    # --signal: the batch shell got one before the supervisor ran; the step gets SIGUSR1 as soon as it runs
    # (here: before it can trap it, so the step ends by the signal) and nothing is relaunched.
    _launches(tmp_path, "sleep 5; exit 0")
    p = _supervise(tmp_path, ["--signal", "USR1", "--", "bash", "-c", "true"])
    assert p.returncode == 138 and "step exit 138 (no failed task reported by srun) after SIGUSR1" in p.stdout


@pytest.mark.parametrize("given, seen", [("/repo:/site/lib", "/site/lib"), ("/repo", "unset"),
                                         ("/site/lib", "/site/lib")])
def test_pythonpath_of_the_supervisor_is_not_the_steps(tmp_path, given, seen):
    _launches(tmp_path, "exit 0")
    # (run from the repository: hpctrain imports from the working directory whatever PYTHONPATH says)
    p = _supervise(tmp_path, ["--", "bash", "-c", "true"], {"HPCTRAIN_SUPERVISOR_PYTHONPATH": "/repo",
                                                            "PYTHONPATH": given})
    assert p.returncode == 0 and _log(tmp_path, "pythonpath.log") == [seen], p.stdout + p.stderr


# ---------------------------------------------------------------- slurm/env.sh and the templates

def _batch(tmp_path: Path, script: str, extra: dict | None = None) -> subprocess.CompletedProcess:
    e = _job_env(tmp_path, {"HPCTRAIN_ROOT": str(ROOT), "HPCTRAIN_SITE": "testcluster", **(extra or {})})
    return subprocess.run(["bash", "-c", f'source "$HPCTRAIN_ROOT/slurm/env.sh" || exit $?; {script}'], cwd=tmp_path,
                          env=e, capture_output=True, text=True, timeout=120)


def test_hpctrain_step_becomes_the_supervisor(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    _launches(tmp_path, _fail(137, run), "exit 0")
    p = _batch(tmp_path, f'hpctrain_step -m hpctrain.resnet --run-dir {run}; echo "not reached"')
    assert p.returncode == 0 and "not reached" not in p.stdout, p.stdout + p.stderr
    assert "hpctrain: restart 1/2 in the same allocation: step exit 137 (node3: task 2: Killed)" in p.stdout
    assert _log(tmp_path, "srun.log")[0] == (f"--mpi=pmix --kill-on-bad-exit=1 {ROOT}/.venv/bin/python -m "
                                             f"hpctrain.resnet --run-dir {run}")
    assert _log(tmp_path, "pythonpath.log")[0] == env()["PYTHONPATH"]  # the batch shell's, not the supervisor's


def test_hpctrain_supervise_requeues_a_step_of_ones_own(tmp_path):
    p = _batch(tmp_path, "bash -c 'exit 85' & hpctrain_supervise $!; echo \"returned $?\"")
    assert "requeueing job 42 at" in p.stdout and "returned 0" in p.stdout, p.stdout + p.stderr
    p = _batch(tmp_path, "bash -c 'exit 88' & hpctrain_supervise $!; echo \"returned $?\"")
    assert "returned 88" in p.stdout and "requeueing" not in p.stdout


def test_missing_host_python_is_one_line(tmp_path):
    p = _batch(tmp_path, "hpctrain_step -m hpctrain.resnet", {"HPCTRAIN_HOST_PYTHON": "/no/python3"})
    assert p.returncode == 2
    assert p.stderr == ("hpctrain: error: HPCTRAIN_HOST_PYTHON='/no/python3' not found (allowed: a python3.11 or newer "
                        "on the batch shell's PATH, or its path)\n")


def _code_lines(path: Path) -> str:
    """The shell code of a file without its comments (a `#` that starts a word)."""
    return "\n".join(re.sub(r"(^|\s)#.*$", "", line) for line in path.read_text().splitlines())


def test_shell_side_holds_no_exit_code_of_hpctrain():
    files = [ROOT / "slurm" / "env.sh", *sorted((ROOT / "slurm").glob("*_*.sh"))]
    assert len(files) == 4
    for path in files:
        code = _code_lines(path)
        assert "HPCTRAIN_EXIT" not in code and "scontrol" not in code, path
        for name, value in CODES.items():
            if value == errors.EXIT_USER_ERROR:
                # The shell's own one-line errors end with 2 (as hpctrain's bad input does); nothing reads a 2.
                rest = re.sub(r"(exit|return) 2\b|2>|>&2|\$\{?2|:-2\}|0, 1, 2, \.\.\.", "", code)
                assert not re.search(r"\b2\b", rest), path
            else:
                assert not re.search(rf"\b{value}\b", code), f"{path.name} holds {name}={value}"


def test_env_sh_and_the_supervisor_refuse_a_bad_limit_alike(tmp_path):
    p = _batch(tmp_path, "echo reached", {"HPCTRAIN_MAX_RESTARTS": "two"})
    q = _supervise(tmp_path, ["--", "true"], {"HPCTRAIN_MAX_RESTARTS": "two"})
    assert p.returncode == q.returncode == 2 and "reached" not in p.stdout
    line = "hpctrain: error: HPCTRAIN_MAX_RESTARTS='two' is not a whole number (allowed: 0, 1, 2, ...)\n"
    assert p.stderr == q.stderr == line
