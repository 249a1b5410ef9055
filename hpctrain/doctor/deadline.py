"""A rank that never arrives becomes a FAIL line after --timeout, not a hang.

Each stage (a check, the gather, the verdict) has its own limit, counted from its start: --timeout for a stage
that waits for the other ranks (MPI_Init, the ranks check, the collectives, the gather, the verdict), at least
LOCAL_FLOOR_S for one that works alone (importing TensorFlow from a slow shared file system is slow, not stuck).
A missing or stuck peer, a blocked network or a hung file system ends in
`FAIL  doctor: no answer within T s while in '<stage>'` and exit 1.
A threading.Timer per stage runs `on_expiry` when the main thread waits in a call that releases the GIL (MPI
buffer calls, Horovod, I/O); faulthandler's own C thread is the backstop for one that does not (stacks on stderr,
exit 1). The other ranks wait longer, so rank 0 reports before any of them gives up.

Why not hpctrain.watchdog, the training run's hang watchdog: what it does when it fires is fixed, and wrong
here. It writes the stacks to run_dir/hang-<rank>.txt and hang-<rank>.json, marks the run failed in run.json,
releases the run's locks and exits 86 (EXIT_HANG); the doctor must leave nothing in the run directory it is
testing (which may be unwritable or not exist yet), must print its verdict as a check line on stdout, and exits 1.
Its limits are a training run's too: PHASE_FACTOR (6) timeouts until a first step has been timed, so
`--timeout 8` would wait 48 s. It has no hook for either, so this module keeps the smallest mechanism of its own.
"""
from __future__ import annotations

import faulthandler
import threading
from collections.abc import Callable

LOCAL_FLOOR_S = 120.0  # the least a stage that waits for no other rank gets
PEER_GRACE_S = 30.0  # ranks other than 0 wait this much longer: rank 0 is the one that reports
BACKSTOP_S = 30.0  # faulthandler's exit comes this much after the timer's


class Deadline:
    def __init__(self, seconds: float, rank: int, on_expiry: Callable[[float], None]):
        self.seconds, self.grace = seconds, 0 if rank == 0 else PEER_GRACE_S
        self.on_expiry = on_expiry  # called with the limit that passed
        self.timer: threading.Timer | None = None

    def enter(self, stage: str, waits: bool) -> None:
        """Restart the clock for `stage`; `waits`: it waits for the other ranks."""
        self.cancel()
        limit = self.seconds if waits else max(self.seconds, LOCAL_FLOOR_S)
        self.timer = threading.Timer(limit + self.grace, self.on_expiry, args=(limit,))
        self.timer.daemon = True
        self.timer.start()
        faulthandler.dump_traceback_later(limit + self.grace + BACKSTOP_S, exit=True)

    def cancel(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
        faulthandler.cancel_dump_traceback_later()
