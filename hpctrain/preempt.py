"""Preemption, wall time and Ctrl-C: signal -> flag -> ranks agree at a step boundary -> save -> exit 85.

Framework-neutral (no torch import): the engine hands in the collective that combines the flag.

- `Preemption.install()` makes these signals only set a flag and remember which came first: SIGUSR1
  (Slurm's `--signal=B:USR1@<lead>`, forwarded by the batch script; `kill -USR1` of mpirun, which
  forwards it), SIGTERM (scancel, node drain, time limit, preemption), SIGINT (Ctrl-C where the ranks are
  in the terminal's process group: a single process, srun), and SIGCONT. Open MPI's mpirun answers Ctrl-C
  (and Slurm ends a job) with SIGCONT to every rank at once, then SIGTERM and SIGKILL each
  `odls_base_sigkill_timeout` seconds later (Slurm: KillWait): SIGCONT is the first and earliest notice
  that the job is ending. A SIGCONT that resumes a job-control stop (Ctrl-Z, which mpirun forwards as
  SIGTSTP) is not a stop request: SIGTSTP is handled here, noted, and then stops the process.
  A second SIGINT ends the process at once (exit 130), without a checkpoint.
- Nothing is saved inside the handler: a handler runs between two bytecodes of whatever the main thread
  is doing, possibly inside a collective.
- At a step boundary every rank calls `should_stop(step, every, combine)`; every `every` steps it
  combines the local flag across ranks (one allreduce of one number), so a signal seen by any rank
  stops all ranks at the same step and the collective checkpoint that follows cannot deadlock.
- The trainer then saves a checkpoint and the entry point exits with `EXIT_PREEMPTED`. The batch
  template (slurm/resnet_8node.sh) requeues the job on exactly that code; the restarted job resumes
  from the checkpoint (`--resume auto`).
- Data-loader workers get `worker_ignores_foreign_sigterm` as `worker_init_fn`: Slurm's SIGTERM
  reaches them too, and a dead worker would break the trainer before it reaches the checkpoint.
"""
from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable

from hpctrain.errors import EXIT_ABORTED

SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT, signal.SIGCONT)
REASONS = {signal.SIGINT: "SIGINT (Ctrl-C)",
           signal.SIGCONT: "SIGCONT from the launcher (Ctrl-C on mpirun, or the job is ending)"}


ENDING = (signal.SIGCONT, signal.SIGTERM)  # the launcher's notices that the job is ending
_job_ending = threading.Event()


def _note_job_ending(signum, frame) -> None:
    _job_ending.set()


def watch_for_job_end() -> None:
    """From a rank's start until `Preemption.install` takes the signal over: note a SIGCONT, the launcher's first
    notice that the job is ending (mpirun sends it to every rank as soon as one has failed, SIGTERM follows
    `odls_base_sigkill_timeout` seconds later). SIGTERM keeps its default until then: it ends the process."""
    signal.signal(signal.SIGCONT, _note_job_ending)


def job_ending_within(seconds: float, preemption: Preemption | None = None) -> bool:
    """Whether the launcher has begun, or begins within `seconds`, to end the job (SIGCONT or SIGTERM): another
    rank failed first. How a rank with an error learns, without a collective, that rank 0 has reported one."""
    if preemption is not None and any(s in ENDING for s in preemption.received):
        return True
    try:
        for s in ENDING:
            signal.signal(s, _note_job_ending)
    except ValueError:  # not the main thread: only what was noted so far counts
        return _job_ending.is_set()
    return _job_ending.wait(seconds)


def agree(local: bool, combine: Callable[[int], float]) -> bool:
    """True on every rank when any rank has the flag. `combine(x)` reduces x across ranks with max
    or sum (for a 0/1 flag both are > 0 exactly when some rank has it)."""
    return combine(1 if local else 0) > 0


# Set at interpreter exit of the training process; forked data-loader workers inherit it (see below).
_exiting = None


def _prepare_workers() -> None:
    global _exiting
    if _exiting is None:
        import atexit
        import multiprocessing.util  # registers multiprocessing's own exit hook first, so ours runs before it
        _exiting = multiprocessing.Event()
        atexit.register(_exiting.set)


def _worker_sigterm(signum, frame) -> None:
    # At exit multiprocessing terminates (SIGTERM) and joins its worker processes: leave then. Any
    # other SIGTERM (Slurm signals every process of a step) is the trainer's business, not ours.
    if _exiting is None or _exiting.is_set():
        os._exit(0)


def worker_ignores_foreign_sigterm(worker_id: int = 0) -> None:
    """`worker_init_fn` for data-loader worker processes. PyTorch's workers die on a SIGTERM that is
    not from their parent, and the trainer's next batch then raises instead of reaching the agreed
    stop and its checkpoint. With this, a forked worker ignores SIGTERM until its training process
    exits (a worker that did not inherit the exit flag, e.g. under 'spawn', still exits on SIGTERM)."""
    signal.signal(signal.SIGTERM, _worker_sigterm)


class Preemption:
    """Signal flag for one process. Use `install()` before training and `uninstall()` after."""

    def __init__(self, signals: tuple[int, ...] = SIGNALS):
        self.signals = signals
        self.signum: int | None = None  # the first signal received
        self.received: list[int] = []  # every stop signal, in order
        self._job_stopped = False  # a SIGTSTP stopped us: the next SIGCONT resumes, it does not stop
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        # Only record: the decision is taken at the next agreed step boundary.
        if signum == signal.SIGCONT and self._job_stopped:
            self._job_stopped = False
            return
        if signum == signal.SIGINT and signal.SIGINT in self.received:
            from hpctrain import rundir, runlock  # the second Ctrl-C: leave now, freeing the run dir
            rundir.update_status(state="failed", exit_code=EXIT_ABORTED, reason="a second Ctrl-C")
            runlock.release_all()
            os._exit(EXIT_ABORTED)
        if self.signum is None:
            self.signum = signum
        self.received.append(signum)

    def _job_control_stop(self, signum, frame) -> None:
        self._job_stopped = True
        signal.signal(signal.SIGTSTP, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTSTP)  # stops here; SIGCONT resumes
        signal.signal(signal.SIGTSTP, self._job_control_stop)

    def install(self) -> Preemption:
        _prepare_workers()
        for s in self.signals:
            self._previous[s] = signal.signal(s, self._handle)
        if signal.SIGCONT in self.signals:
            self._previous[signal.SIGTSTP] = signal.signal(signal.SIGTSTP, self._job_control_stop)
        return self

    def uninstall(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()

    def __enter__(self) -> Preemption:
        return self.install()

    def __exit__(self, *exc) -> None:
        self.uninstall()

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def reason(self) -> str:
        """Name of the signal this process received, or a note that another rank received one."""
        if self.signum is None:
            return "a signal on another rank"
        return REASONS.get(self.signum, signal.Signals(self.signum).name)

    def should_stop(self, step: int, every: int, combine: Callable[[int], float]) -> bool:
        """Collective every `every` steps (all ranks must call it at the same steps)."""
        if step % every:
            return False
        return agree(self.requested, combine)
