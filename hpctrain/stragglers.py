"""Which rank holds the others up. In synchronous data-parallel training every rank's step takes as long as the
slowest one's: the ranks differ only in how long each was busy (data, forward, backward, update) before it waited
for the others in the gradient exchange. Each rank times its steps and its waits; the per-rank busy time per step
travels in the log window's one reduction (a vector with this rank's value at its index: no extra collective per
step), and rank 0 names a rank whose busy time is well above the others' median: a throttled CPU, a noisy
neighbour, a slow disk. Framework-neutral.

A slow link does not show here: every rank of a ring waits for it alike (hpctrain.linkrate watches the links)."""
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


class Persistent:
    """A rank named in two log windows in a row (one short window is noise), or another rank becoming it, is news;
    so is its going. `update(rank)` -> ("new", rank) / ("gone", the rank that was) / (None, None)."""

    def __init__(self):
        self.current, self.candidate = None, None

    def update(self, rank: int | None) -> tuple[str | None, int | None]:
        seen_before, self.candidate = self.candidate, rank
        if rank is not None and rank != self.current and rank != seen_before:
            return None, None  # once: wait for the next window
        before, self.current = self.current, rank
        if rank is not None and rank != before:
            return "new", rank
        if rank is None and before is not None:
            return "gone", before
        return None, None


class RankWatch:
    """Rank 0's view across log windows: one line when a rank is named in two windows in a row or another rank
    becomes it, one when it is gone; the figures go to every window's record. Subclasses measure and word it."""

    key = ""  # the record's field naming the rank

    def __init__(self, nodes: list[str]):
        self.nodes, self.named = nodes, Persistent()

    def measure(self, values: list[float]) -> tuple[dict, tuple | None]:
        """The record's figures and (rank, its figure, the others' median) when a rank is named."""
        raise NotImplementedError

    def named_line(self, found: tuple, steps: str) -> str:
        raise NotImplementedError

    def gone_line(self, rank: int, steps: str) -> str:
        raise NotImplementedError

    def window(self, values: list[float], first: int, last: int, quiet: bool = False) -> tuple[dict, str | None]:
        """The record's figures and the line to log, if any, for the window of steps first..last (`quiet`: only
        the figures)."""
        record, found = self.measure(values)
        if found:
            record[self.key] = found[0]
        if quiet or not record:
            return record, None
        event, rank = self.named.update(found[0] if found else None)
        steps = f"steps {first}..{last}"
        if event == "new":
            return record, self.named_line(found, steps)
        if event == "gone":
            return record, self.gone_line(rank, steps)
        return record, None


class Watch(RankWatch):
    """The straggler watch: busy seconds per step."""

    key = "straggler_rank"

    def measure(self, busy: list[float]) -> tuple[dict, tuple | None]:
        values = list(timed(busy).values()) or [0.0]
        return {"busy_s_per_step_median": statistics.median(values), "busy_s_per_step_max": max(values)}, slowest(busy)

    def named_line(self, found: tuple, steps: str) -> str:
        rank, mine, median = found
        return (f"straggler: rank {rank} on node {self.nodes[rank]} was busy {mine:.3g} s per step, "
                f"{mine / median:.1f}x the other ranks' median {median:.3g} s ({steps}); the others wait for it at "
                "every gradient exchange")

    def gone_line(self, rank: int, steps: str) -> str:
        return f"straggler gone: rank {rank} on node {self.nodes[rank]} is busy like the others again ({steps})"
