"""Hang watchdog: a rank that makes no progress for too long dumps its stacks and exits EXIT_HANG.

A frozen rank (SIGSTOP, a hung node, a stuck file system) leaves the healthy ranks waiting in a
collective forever, and Horovod's own stall shutdown cannot fire: its inspector runs in rank 0's
background thread, which is itself blocked in the negotiation with the frozen rank. So every rank
runs a plain thread that watches a heartbeat: the training loop beats at each step boundary, the
evaluation per batch. When the beats stop for longer than the limit, the rank writes every thread's
Python stack to `run_dir/hang-<rank>.txt` (and who, where, when to `hang-<rank>.json`), prints one line naming
itself, its node and the last
step, and exits with EXIT_HANG; the launcher then ends the job (a frozen process dies to SIGKILL).
The frozen rank cannot report the hang, so the batch script blames the nodes whose ranks did not; if
it is resumed (SIGCONT), it notices the gap in its own clock and says it was stopped instead.

Limits: `timeout` between beats, but at least 3x the slowest step seen (a big model's steps are
slow); `PHASE_FACTOR` x that before the first step is timed and inside a `phase()` (start-up until the
first step, resume, checkpoint write and its collective, the pipeline profiler, the final export),
since one long blocking call (torch.save of a large model to a slow file system) cannot beat.
Blocking MPI and Horovod calls release the GIL, so this thread runs while the main thread waits in them;
for calls that do not (mpi4py's pickled allreduce), faulthandler's C-level timer is the backstop.

Framework-neutral and process-global (one watchdog per rank): the engine calls `beat()` and
`phase()` without plumbing; both are no-ops when the watchdog is off.
"""
from __future__ import annotations

import contextlib
import faulthandler
import json
import os
import sys
import threading
import time
from pathlib import Path

from hpctrain import rundir, runlock
from hpctrain.errors import EXIT_HANG

PHASE_FACTOR = 6      # a phase may take this many timeouts (300 s -> 30 min for a checkpoint write)
STEP_MULTIPLE = 3     # the limit between beats is at least this many times the slowest step
BACKSTOP_MARGIN = 2.0  # the C-level backstop fires at this many limits, if our thread never got to run


class Watchdog:
    def __init__(self, timeout: float, run_dir: str | os.PathLike, rank: int, node: str, startup: float = 0.0):
        self.timeout, self.rank, self.node = float(timeout), rank, node
        self.startup = float(startup)  # the bound of rank 0's wait in a start-up collective (0: none)
        self.collectives: list[str] = []  # the start-up collectives rank 0 is in now, innermost last
        self.report = Path(run_dir) / f"hang-{rank}.txt"
        self.last = time.monotonic()
        self.step: int | None = None
        self.slowest = 0.0
        self.phases: list[str] = []
        self.counting = False  # the last beat was a step boundary with no phase since: time the next step
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="hpctrain-watchdog", daemon=True)
        self._armed = (0.0, 0.0)  # (when, limit) the backstop was last armed

    def limit(self) -> float:
        base = max(self.timeout, STEP_MULTIPLE * self.slowest)
        # Until one step has been timed, its length is unknown (a big model's step may exceed the timeout).
        phase = PHASE_FACTOR * base if self.phases or not self.slowest else base
        return min(phase, self.startup) if self.collectives and self.startup else phase

    def beat(self, step: int | None = None) -> None:
        now = time.monotonic()
        if step is not None:
            if "start-up" in self.phases:
                self.phases.remove("start-up")
            if self.counting:
                self.slowest = max(self.slowest, now - self.last)
            self.step, self.counting = step, True
        self.last = now
        if now - self._armed[0] > self.timeout / 4 or self.limit() != self._armed[1]:
            self._arm(now)

    def _arm(self, now: float) -> None:
        """Backstop for a main thread that holds the GIL while it waits (mpi4py's pickled allreduce does),
        so our thread cannot run: faulthandler's C thread dumps the stacks to stderr and exits 1. Re-armed
        every timeout/4 at most, since each call starts a thread."""
        limit = self.limit()
        faulthandler.dump_traceback_later(BACKSTOP_MARGIN * limit + self.timeout / 4, exit=True)
        self._armed = (now, limit)

    @contextlib.contextmanager
    def phase(self, name: str):
        self.phases.append(name)
        self.last, self.counting = time.monotonic(), False
        self._arm(self.last)
        try:
            yield
        finally:
            self.phases.remove(name)
            self.last, self.counting = time.monotonic(), False
            self._arm(self.last)

    @contextlib.contextmanager
    def collective(self, name: str):
        """A collective every rank enters at start-up (backend init, a state broadcast). Rank 0 arrives last at
        these (it does the run dir and checkpoint I/O first), so rank 0 waiting in one longer than --startup-
        timeout means a peer never came or the transport between ranks is broken: end the job then, naming the
        collective, not after the start-up allowance (PHASE_FACTOR x the hang timeout)."""
        if self.rank != 0:
            yield
            return
        self.collectives.append(name)
        self.last, self.counting = time.monotonic(), False
        self._arm(self.last)
        try:
            yield
        finally:
            self.collectives.pop()
            self.last = time.monotonic()
            self._arm(self.last)

    def start(self) -> Watchdog:
        self.phases.append("start-up")  # until the first step boundary
        self._arm(time.monotonic())
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        faulthandler.cancel_dump_traceback_later()

    def _watch(self) -> None:
        poll = min(5.0, max(0.1, self.timeout / 20))
        woke, cpu = time.monotonic(), time.process_time()
        while not self._stop.wait(poll):
            now, now_cpu = time.monotonic(), time.process_time()
            gap, used = now - woke, now_cpu - cpu
            woke, cpu = now, now_cpu
            if gap > 2 * poll + 2.0 and used < 0.5 * gap:
                # Late and little CPU time used meanwhile (what the threads used in the last poll before a
                # stop can be a good part of a short gap): this whole process was stopped (SIGSTOP, a frozen
                # VM), not merely kept from the GIL by a busy main thread, which uses the whole gap. The hang was
                # ours and the healthy ranks report it: do not count our own pause, say we were stopped.
                self.last += gap
                when = f"after step {self.step}" if self.step is not None else "before its first step"
                sys.stderr.write(f"hpctrain: rank {self.rank} on node {self.node}: this process was stopped for "
                                 f"{gap:.0f} s {when} (not counted as a hang here)\n")
                sys.stderr.flush()
            elif now - self.last > self.limit():
                self._fire(now - self.last)

    def _fire(self, age: float) -> None:
        if self.collectives:
            where = (f"waiting in the start-up collective '{self.collectives[-1]}' (a peer never came, or the "
                     "transport between ranks is broken)")
        else:
            where = f"during {self.phases[-1]}" if self.phases else f"after step {self.step}"
        line = (f"hpctrain: rank {self.rank} on node {self.node}: no progress for {age:.0f} s {where} "
                f"({'startup' if self.collectives else 'hang'} timeout {self.limit():.3g} s): stacks in {self.report}; "
                f"exiting {EXIT_HANG}")
        record = {"rank": self.rank, "node": self.node, "step": self.step,
                  "phase": self.phases[-1] if self.phases else None,
                  "collective": self.collectives[-1] if self.collectives else None, "seconds": round(age, 1),
                  "limit": self.limit(), "pid": os.getpid(), "time": round(time.time(), 3)}
        try:
            self.report.parent.mkdir(parents=True, exist_ok=True)
            with open(self.report, "w") as f:
                f.write(f"{line}\nslowest step so far {self.slowest:.1f} s, pid {os.getpid()}\n\n")
                f.flush()
                faulthandler.dump_traceback(f, all_threads=True)
            # What a supervisor reads: which ranks (and so which nodes) were alive to report the hang.
            self.report.with_suffix(".json").write_text(json.dumps(record) + "\n")
        except OSError as e:  # the run dir may be on the very file system that hangs: still say it
            line += f" (could not write the stacks: {e.strerror})"
        sys.stderr.write(line + "\n")
        sys.stderr.flush()
        rundir.update_status(state="failed", exit_code=EXIT_HANG, reason=line)
        runlock.release_all()
        os._exit(EXIT_HANG)  # from this thread: the main thread is stuck, a normal exit would wait for it


_current: Watchdog | None = None


def start(timeout: float, run_dir, rank: int, node: str, startup: float = 0.0) -> Watchdog | None:
    """Start this rank's watchdog (timeout 0: off; startup: the bound of a start-up collective, 0: none)."""
    global _current
    stop()
    if timeout > 0:
        _current = Watchdog(timeout, run_dir, rank, node, startup).start()
    return _current


def stop() -> None:
    global _current
    if _current is not None:
        _current.stop()
        _current = None


def beat(step: int | None = None) -> None:
    if _current is not None:
        _current.beat(step)


def phase(name: str):
    return _current.phase(name) if _current is not None else contextlib.nullcontext()


def collective(name: str):
    return _current.collective(name) if _current is not None else contextlib.nullcontext()


def launcher_defaults(timeout: float) -> dict[str, str]:
    """Horovod's stall inspector and PyTorch's NCCL watchdog set consistently with ours (a user's own
    settings win): they warn after one timeout and shut down only after our longest allowance (a
    phase: ranks waiting for rank 0's checkpoint sit in a collective that long without being hung),
    as a backstop for a hang our thread cannot see; NCCL's flight recorder is on, so its timeout
    dumps the last collectives."""
    if timeout <= 0:
        return {}
    warn, shutdown = str(max(1, int(timeout))), str(int((PHASE_FACTOR + 1) * timeout))
    return {"HOROVOD_STALL_CHECK_TIME_SECONDS": warn, "HOROVOD_STALL_SHUTDOWN_TIME_SECONDS": shutdown,
            "TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC": shutdown, "TORCH_NCCL_TRACE_BUFFER_SIZE": "2000",
            "TORCH_NCCL_DUMP_ON_TIMEOUT": "1"}
