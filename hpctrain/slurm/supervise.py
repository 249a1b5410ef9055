"""The supervisor of a training step inside a Slurm job: `python -m hpctrain.slurm supervise`.

    python -m hpctrain.slurm supervise [--srun-arg=OPT]... -- COMMAND...   run `srun OPT... COMMAND...`
    python -m hpctrain.slurm supervise --status CODE    an srun step of your own ended with CODE: requeue on 85

slurm/env.sh's `hpctrain_step` execs it as the batch shell's last command (`hpctrain_supervise PID` runs
the --status form after waiting for a step of your own), so Slurm's `--signal=B:USR1@lead`, `scancel
--signal=USR1 --batch` and scancel's SIGTERM reach this process. It runs srun with its stderr passed
through (srun's per-task lines are read on the way), forwards SIGUSR1/SIGTERM to srun as SIGUSR1 (srun
forwards SIGUSR1 to every rank but ends the step on SIGTERM; the ranks treat both alike), and after the
step decides from srun's lines, the run's status in run_dir/run.json and this launch's hang records
(hpctrain.slurm.outcome): requeue the job, relaunch the step in the allocation, or end with the step's code.

Standard library and hpctrain's framework-neutral modules only (it runs on the host, outside any
container): never torch or TensorFlow. Settings from the environment: HPCTRAIN_MAX_REQUEUES (20),
HPCTRAIN_MAX_RESTARTS (2), HPCTRAIN_SPARE_NODES (0), HPCTRAIN_STEP_END_WAIT (20: seconds srun may go on after
its first failed task before the nodes it has not heard from are probed, hpctrain.slurm.reach); a bad value is
one line and exit 2.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from hpctrain.errors import EXIT_USER_ERROR, UserError
from hpctrain.slurm import outcome, reach

PREFIX = "hpctrain: "
DEFAULTS = {"HPCTRAIN_MAX_REQUEUES": 20, "HPCTRAIN_MAX_RESTARTS": 2, "HPCTRAIN_SPARE_NODES": 0,
            "HPCTRAIN_STEP_END_WAIT": 20}
_MODULE = re.compile(r"^hpctrain\.([a-z_]+)$")


class SuperviseError(UserError):
    """A bad setting of the supervisor (one line naming it and what is allowed, exit 2)."""


def say(line: str) -> None:
    print(PREFIX + line, flush=True)


# ------------------------------------------------------------------ settings and the job

@dataclass
class Settings:
    max_requeues: int
    max_restarts: int
    spare_nodes: int
    step_end_wait: int  # seconds after srun's first failed task before silent nodes are probed
    requeued: int   # SLURM_RESTART_COUNT
    job: str        # the id scontrol knows the job by


def _whole(env, name: str, default: int) -> int:
    value = env.get(name, "")
    if value == "":
        return default
    if not re.fullmatch(r"[0-9]+", value):
        raise SuperviseError(f"{name}={value!r} is not a whole number (allowed: 0, 1, 2, ...)")
    return int(value)


def job_id(env) -> str:
    """<array job>_<task> in job arrays (scontrol requeue of the plain id would requeue the whole array)."""
    if env.get("SLURM_ARRAY_JOB_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env.get('SLURM_ARRAY_TASK_ID', '')}"
    return env.get("SLURM_JOB_ID", "")


def settings(env=None) -> Settings:
    env = os.environ if env is None else env
    values = {name: _whole(env, name, default) for name, default in DEFAULTS.items()}
    return Settings(values["HPCTRAIN_MAX_REQUEUES"], values["HPCTRAIN_MAX_RESTARTS"], values["HPCTRAIN_SPARE_NODES"],
                    values["HPCTRAIN_STEP_END_WAIT"], _whole(env, "SLURM_RESTART_COUNT", 0), job_id(env))


def job_state(job: str) -> str | None:
    """RUNNING, COMPLETING, ... from `scontrol show job`; None when scontrol cannot tell."""
    try:
        p = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True, timeout=60,
                           stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = re.search(r"\bJobState=([A-Z_]+)", p.stdout)
    return m.group(1) if m else None


def requeue(job: str) -> bool:
    try:
        p = subprocess.run(["scontrol", "requeue", job], timeout=60, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return p.returncode == 0


# ------------------------------------------------------------------ signals

class Signals:
    """SIGUSR1/SIGTERM to the batch shell (this process): remembered, and passed to the running step as SIGUSR1.
    The handler writes with os.write: a print() from a handler could re-enter a print of the main thread."""

    def __init__(self, first: str | None = None):
        self.got = first
        self.step: subprocess.Popen | None = None

    def install(self) -> Signals:
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.got = signal.Signals(signum).name[3:]
        step = self.step
        line = f"{PREFIX}batch script got SIG{self.got} at {time.strftime('%H:%M:%S')}"
        line += ", forwarding it to the job step as SIGUSR1" if step is not None else ""
        with contextlib.suppress(OSError):
            os.write(sys.stdout.fileno(), (line + "\n").encode())
        if step is not None:
            self.forward(step)

    @staticmethod
    def forward(step: subprocess.Popen) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(step.pid, signal.SIGUSR1)


# ------------------------------------------------------------------ the run directory of the step

def _recipe_call(command: list[str]) -> tuple[str, list[str]] | None:
    """(recipe name, its arguments) of `... -m hpctrain.<recipe> ARGS`, else None."""
    from hpctrain import recipes
    for i, word in enumerate(command[:-1]):
        m = _MODULE.match(command[i + 1])
        if word == "-m" and m and m.group(1) in recipes.NAMES:
            return m.group(1), command[i + 2:]
    return None


def _fallback_run_dir(args: list[str]) -> str:
    """--run-dir, else the TOML's [run] run_dir, else the default: for a host that cannot import the recipe."""
    import tomllib

    from hpctrain.config import RunConfig
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--config")
    p.add_argument("--run-dir")
    known, _ = p.parse_known_args(args)
    if known.run_dir:
        return known.run_dir
    if known.config:
        with contextlib.suppress(OSError, ValueError, AttributeError):
            found = tomllib.loads(Path(known.config).read_text()).get("run", {}).get("run_dir")
            if isinstance(found, str):
                return found
    return RunConfig().run_dir


def find_run_dir(command: list[str]) -> Path | None:
    """The run dir the ranks of `command` use, resolved as hpctrain resolves it (defaults < --config < flags,
    relative to this directory, where srun starts them); None when the command is not a training recipe or
    it cannot be told (then the supervisor decides from srun's lines alone: it must run the step anyway)."""
    try:
        return _run_dir(command)
    except Exception as e:  # a surprise here must not keep the step from running
        say(f"note: no run dir for the step ({type(e).__name__}: {e}): deciding from srun's lines alone")
        return None


def _run_dir(command: list[str]) -> Path | None:
    call = _recipe_call(command)
    if call is None:
        return None
    name, args = call
    from hpctrain import config, recipes
    try:
        config_cls = recipes.get(name).config_cls
    except ImportError as e:  # a package the recipe's data needs is missing on the host
        say(f"note: cannot import the {name} recipe here ({e}): run dir from --run-dir/--config alone")
        return Path(_fallback_run_dir(args)).absolute()
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            cfg = config.parse(args, f"hpctrain.{name}", config_cls)
    except (UserError, SystemExit) as e:  # the ranks will say it (a bad flag), or --help / --print-config
        if not isinstance(e, SystemExit):
            say(f"note: no run dir for the step ({e}): deciding from srun's lines alone")
        return None
    return Path(cfg.run.run_dir).absolute()


# ------------------------------------------------------------------ one launch

def _relay(stream, sink, found: list) -> None:
    """Pass srun's stderr through line by line, keeping its per-task lines."""
    for raw in iter(stream.readline, b""):
        with contextlib.suppress(OSError, ValueError):
            sink.write(raw)
            sink.flush()
        line = outcome.task_line(raw.decode(errors="replace"))
        if line is not None:
            found.append(line)


def _wait_step(step: subprocess.Popen, found: list, s: Settings) -> list[str]:
    """Wait for srun to end. Once it has reported a failed task and still runs `s.step_end_wait` s later, probe
    the step's nodes it has not heard from: when some cannot be reached, end srun (it would wait for them
    until Slurm declares them DOWN) and return them; else wait on and probe again later."""
    first = None
    while True:
        try:
            step.wait(timeout=1.0)
            return []
        except subprocess.TimeoutExpired:
            pass
        if found and first is None:
            first = time.monotonic()
        if first is None or time.monotonic() - first < s.step_end_wait:
            continue
        heard = {t.node for t in list(found)}
        lost = reach.unreachable([n for n in reach.step_nodes(s.job) if n not in heard])
        if lost:
            say(f"srun still waits {time.monotonic() - first:.0f} s after the first failed task: node(s) "
                f"{','.join(lost)} cannot be reached (no connection to slurmd); ending the step without them")
            step.kill()
            step.wait()
            return lost
        first = time.monotonic()


def launch(cmd: list[str], run_dir: Path | None, signals: Signals, s: Settings) -> outcome.Evidence:
    """Run one srun step to its end; what it left behind."""
    before = outcome.snapshot(run_dir)
    found: list = []
    try:
        step = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    except OSError as e:
        raise SuperviseError(f"cannot run {cmd[0]}: {e.strerror} (allowed: inside a Slurm job, srun on PATH)") from None
    signals.step = step
    if signals.got:  # a signal that came before the step ran
        signals.forward(step)
    relay = threading.Thread(target=_relay, args=(step.stderr, sys.stderr.buffer, found), daemon=True)
    relay.start()
    lost = _wait_step(step, found, s)
    status = step.returncode
    signals.step = None
    relay.join(timeout=None if not lost else 10)  # a killed srun's stderr ends with it
    step.stderr.close()
    ev = outcome.evidence(status if status >= 0 else 128 - status, found, run_dir, before)
    ev.lost = lost
    return ev


# ------------------------------------------------------------------ the loop

def _situation(s: Settings, signals: Signals, restarts: int, blamed_all: list[str]) -> outcome.Situation:
    return outcome.Situation(s.job, signals.got, restarts, s.max_restarts, s.requeued, s.max_requeues, blamed_all)


def _finish(decision: outcome.Decision, job: str) -> int:
    """Print the decision; requeue when it says so. The job's exit code."""
    if decision.line:
        say(decision.line)
    if decision.action != outcome.REQUEUE:
        return decision.exit_code
    if requeue(job):
        return 0
    print(f"{PREFIX}error: scontrol requeue {job} failed: resubmit to resume", file=sys.stderr, flush=True)
    return decision.exit_code


def run(srun_args: list[str], command: list[str], s: Settings, signals: Signals) -> int:
    """Launch, decide, relaunch (in the same allocation) until done, requeued or given up."""
    run_dir = find_run_dir(command)
    restarts, excluded, blamed_all, lost_any = 0, [], [], False
    while True:
        where = [f"--exclude={','.join(excluded)}"] if excluded else []
        # A step srun was ended without holds its CPUs on the nodes that did answer until Slurm declares the lost
        # node DOWN (minutes): its tasks there have ended, so the relaunch may share them.
        where += ["--overlap"] if lost_any else []
        ev = launch(["srun", *srun_args, *where, *command], run_dir, signals, s)
        lost_any = lost_any or bool(ev.lost)
        code = outcome.step_code(ev)
        cause = outcome.cause(ev, code)
        blamed = outcome.blame(ev, code) if outcome.action(code) == outcome.RESTART else []
        blamed_all = sorted(set(blamed_all) | set(blamed))
        decision = outcome.decide(code, cause, _situation(s, signals, restarts, blamed_all),
                                  lambda: job_state(s.job), time.strftime("%H:%M:%S"))
        if decision.action != outcome.RESTART:
            return _finish(decision, s.job)
        excluded, note = outcome.exclusion(excluded, blamed, s.spare_nodes)
        restarts += 1
        say(f"restart {restarts}/{s.max_restarts} in the same allocation: step exit {code} ({cause}); blamed node(s) "
            f"{','.join(blamed) or 'none'}; excluded {','.join(excluded) or 'none'}{note}; "
            f"{outcome.progress(ev.status)}; at {time.strftime('%H:%M:%S')}")


def after_own_step(code: int, s: Settings, signals: Signals) -> int:
    """--status: a step the batch script ran itself ended with `code`; requeue it on an agreed stop."""
    if outcome.action(code) != outcome.REQUEUE:
        return code
    decision = outcome.decide(code, "", _situation(s, signals, 0, []), lambda: job_state(s.job),
                              time.strftime("%H:%M:%S"))
    return _finish(decision, s.job)


# ------------------------------------------------------------------ command line

class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage dump
        self.exit(EXIT_USER_ERROR, f"{PREFIX}error: {self.prog}: {message}\n")


def build_parser() -> _Parser:
    p = _Parser(prog="hpctrain.slurm supervise",
                description="Run and supervise the training step of a Slurm job (see docs/slurm.md).")
    p.add_argument("--srun-arg", action="append", default=[], metavar="OPT",
                   help="an srun option, as --srun-arg=--mpi=pmix (repeat it; before COMMAND)")
    p.add_argument("--signal", choices=["USR1", "TERM"], help="the batch shell already got this signal")
    p.add_argument("--status", type=int, metavar="CODE",
                   help="no COMMAND: a step of your own ended with CODE; requeue the job on an agreed stop")
    p.add_argument("command", nargs=argparse.REMAINDER, help="after --: what srun runs on every rank")
    return p


def _restore_pythonpath(env) -> None:
    """slurm/env.sh put the repository first on PYTHONPATH for this process only: not for srun and the ranks."""
    added = env.pop("HPCTRAIN_SUPERVISOR_PYTHONPATH", None)
    path = env.get("PYTHONPATH", "")
    if added and (path == added or path.startswith(added + os.pathsep)):
        rest = path[len(added) + 1:]
        if rest:
            env["PYTHONPATH"] = rest
        else:
            del env["PYTHONPATH"]


def main(argv: list[str] | None = None) -> int:
    signals = Signals().install()  # first: from here a signal is remembered, not fatal
    try:
        return _main(argv, signals)
    finally:
        # Decided: a late signal of the job (the SIGTERM that follows a requeue) is nothing to act on, and an
        # ignored signal is not reset to its default action (death, exit 143) while the interpreter exits.
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)


def _main(argv: list[str] | None, signals: Signals) -> int:
    _restore_pythonpath(os.environ)
    args = build_parser().parse_args(argv)
    signals.got = signals.got or args.signal
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    try:
        s = settings()
        if args.status is not None:
            if command:
                raise SuperviseError(f"--status {args.status} runs no command (allowed: --status CODE, or -- COMMAND)")
            return after_own_step(args.status, s, signals)
        if not command:
            raise SuperviseError("no command to run (allowed: -- COMMAND..., or --status CODE)")
        return run(args.srun_arg, command, s, signals)
    except SuperviseError as e:
        print(f"{PREFIX}error: {e}", file=sys.stderr, flush=True)
        return e.exit_code
