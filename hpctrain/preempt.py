"""Preemption and wall time: signal -> flag -> ranks agree at a step boundary -> save -> exit 85 -> requeue.

Framework-neutral (no torch import): the engine hands in the collective that combines the flag.

- `Preemption.install()` makes SIGUSR1 (Slurm's `--signal=B:USR1@<lead>`, forwarded by the batch
  script) and SIGTERM (scancel, node drain, time limit, preemption) only set a flag and remember
  which signal came. Nothing is saved inside the handler: a handler runs between two bytecodes of
  whatever the main thread is doing, possibly inside a collective.
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
from typing import Callable

# Exit code of a rank that stopped on a signal after saving a checkpoint: "requeue me". Distinct from
# 0-2 (done, error, bad input), 126/127 (not executable / not found) and 128+N (killed by signal N).
EXIT_PREEMPTED = 85

SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


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
        self.count = 0
        self.stopped_at: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        # Only record: the decision is taken at the next agreed step boundary.
        if self.signum is None:
            self.signum = signum
        self.count += 1

    def install(self) -> "Preemption":
        _prepare_workers()
        for s in self.signals:
            self._previous[s] = signal.signal(s, self._handle)
        return self

    def uninstall(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()

    def __enter__(self) -> "Preemption":
        return self.install()

    def __exit__(self, *exc) -> None:
        self.uninstall()

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def reason(self) -> str:
        """Name of the signal this process received, or a note that another rank received one."""
        return signal.Signals(self.signum).name if self.signum is not None else "a signal on another rank"

    def should_stop(self, step: int, every: int, combine: Callable[[int], float]) -> bool:
        """Collective every `every` steps (all ranks must call it at the same steps)."""
        if step % every:
            return False
        if agree(self.requested, combine):
            self.stopped_at = step
            return True
        return False
