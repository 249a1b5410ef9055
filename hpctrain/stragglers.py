"""Which rank holds the others up. In synchronous data-parallel training every rank's step takes as long as the
slowest one's: the ranks differ only in how long each was busy (data, forward, backward, update) before it waited
for the others in the gradient exchange. Each rank times its steps and its waits; the per-rank busy time per step
travels in the log window's one reduction (a vector with this rank's value at its index: no extra collective per
step), and rank 0 names a rank whose busy time is well above the others' median: a throttled CPU, a noisy
neighbour, a slow disk. Framework-neutral.

A slow link does not show here: every rank of a ring waits for it alike (the doctor's network check names it)."""
from __future__ import annotations

import math
import statistics

FACTOR = 1.5      # busy this many times the other ranks' median ...
MIN_GAP_S = 0.02  # ... and at least this much longer per step (short steps jitter)


def timed(busy: list[float]) -> dict[int, float]:
    """The ranks that compute (a parameter server's servers report NaN) and their busy seconds per step."""
    return {r: b for r, b in enumerate(busy) if math.isfinite(b)}


def slowest(busy: list[float]) -> tuple[int, float, float] | None:
    """(rank, its busy seconds per step, the other ranks' median) for a straggler; None when there is none."""
    ranks = timed(busy)
    if len(ranks) < 2:
        return None
    rank = max(ranks, key=ranks.__getitem__)
    median = statistics.median(b for r, b in ranks.items() if r != rank)
    if busy[rank] > FACTOR * median and busy[rank] - median >= MIN_GAP_S:
        return rank, busy[rank], median
    return None


class Watch:
    """Rank 0's view across log windows: one line when a rank is the straggler in two windows in a row (one short
    window is noise) or another rank becomes it, one when it is gone; the figures go to every window's record."""

    def __init__(self, nodes: list[str]):
        self.nodes, self.current, self.candidate = nodes, None, None

    def window(self, busy: list[float], first: int, last: int, quiet: bool = False) -> tuple[dict, str | None]:
        """The record's figures and the line to log, if any, for the window of steps first..last (`quiet`: only
        the figures)."""
        found = slowest(busy)
        values = list(timed(busy).values()) or [0.0]
        record = {"busy_s_per_step_median": statistics.median(values), "busy_s_per_step_max": max(values)}
        if found:
            record["straggler_rank"] = found[0]
        if quiet:
            return record, None
        line = None
        seen_before, self.candidate = self.candidate, found[0] if found else None
        if found and found[0] != self.current and found[0] != seen_before:
            return record, None  # once: wait for the next window
        if found and found[0] != self.current:
            rank, mine, median = found
            line = (f"straggler: rank {rank} on node {self.nodes[rank]} was busy {mine:.3g} s per step, "
                    f"{mine / median:.1f}x the other ranks' median {median:.3g} s (steps {first}..{last}); the "
                    "others wait for it at every gradient exchange")
        elif not found and self.current is not None:
            line = (f"straggler gone: rank {self.current} on node {self.nodes[self.current]} is busy like the "
                    f"others again (steps {first}..{last})")
        self.current = found[0] if found else None
        return record, line
