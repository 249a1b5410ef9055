"""Rank-0 reporting: progress bar, JSONL metrics, TensorBoard events, throughput. Framework-neutral.

Values arrive already averaged across ranks (the engine does the allreduce); this module only
times, formats and writes. Non-root ranks get a logger whose methods do nothing, so callers never
branch on rank.
"""
from __future__ import annotations

import contextlib
import json
import math
import sys
import time
import types
from pathlib import Path

from tqdm import tqdm


class Throughput:
    """Samples per second over a window, excluding the first `warmup` calls (allocator, caches)."""

    def __init__(self, warmup: int = 2):
        self.warmup = warmup
        self.reset()

    def reset(self):
        self.calls, self.samples, self.start = 0, 0, None

    def update(self, samples: int) -> None:
        self.calls += 1
        if self.calls == self.warmup:
            self.start = time.perf_counter()  # timing starts after the warm-up steps have finished
        elif self.calls > self.warmup:
            self.samples += samples

    def rate(self) -> float:
        if self.start is None or self.samples == 0:
            return float("nan")
        return self.samples / (time.perf_counter() - self.start)


def event_writer(directory: Path):
    """TensorBoard's numpy-only event writer, kept from importing TensorFlow.

    tensorboard resolves its file I/O through `tensorboard.compat.tf`, which imports TensorFlow whenever it
    is installed (it is, for the TF engine): 2-3 s, hundreds of MB and a screen of TF start-up lines in every
    PyTorch run. The module `tensorboard.compat.notf` is tensorboard's own switch to its TF-free stub (its
    `no_tensorflow` build target provides it; see tensorboard/compat/__init__.py); we register an empty one
    unless TF is already loaded. Tested against the pinned tensorboard (tests/unit/test_lr_schedule_metrics.py)."""
    if "tensorflow" not in sys.modules:
        sys.modules.setdefault("tensorboard.compat.notf", types.ModuleType("tensorboard.compat.notf"))
    from tensorboard.summary import Writer
    return Writer(str(directory))


class MetricsLogger:
    def __init__(self, run_dir: str | Path, enabled: bool, total_steps: int, progress: str = "auto",
                 tensorboard: bool = True, initial_step: int = 0):
        self.enabled = enabled
        self.bar = None
        self.jsonl = None
        self.tb = None
        if not enabled:
            return
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        # Records after initial_step, which a resumed run trains again, were set aside by hpctrain.rundir.
        self.jsonl = open(run_dir / "metrics.jsonl", "a", buffering=1)
        if tensorboard:
            self.tb = event_writer(run_dir / "tb")
        show = progress == "always" or (progress == "auto" and sys.stderr.isatty())
        if show:
            self.bar = tqdm(total=total_steps, initial=initial_step, unit="step", dynamic_ncols=True)

    def info(self, message: str) -> None:
        if not self.enabled:
            return
        (self.bar.write if self.bar else print)(message, **({} if self.bar else {"flush": True}))

    def log(self, step: int, kind: str, values: dict) -> None:
        """One record: JSONL line, TensorBoard scalars under `kind/`, progress-bar postfix."""
        if not self.enabled:
            return
        clean = {k: (float(v) if isinstance(v, (int, float)) else v) for k, v in values.items()}
        self.jsonl.write(json.dumps({"kind": kind, "step": step, "time": time.time(), **clean}) + "\n")
        if self.tb:
            for k, v in clean.items():
                if isinstance(v, float) and math.isfinite(v):
                    self.tb.add_scalar(f"{kind}/{k}", v, step=step)
        if self.bar and kind == "train":
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in clean.items() if isinstance(v, float)}, refresh=False)
        elif not self.bar:
            shown = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in clean.items())
            print(f"[{kind} step {step}] {shown}", flush=True)

    def advance(self, steps: int = 1) -> None:
        if self.bar:
            self.bar.update(steps)

    def close(self) -> None:
        if self.bar:
            self.bar.close()
        if self.jsonl:
            self.jsonl.close()
        if self.tb:
            self.tb.close()
        self.bar = self.jsonl = self.tb = None


# How far apart the models are where ranks train apart: the L2 distance from this rank's parameters to
#   peer_distance       the peer's it mixed with (gossip; every step, free: both are at hand)
#   consensus_distance  the average over ranks, at a save or an evaluation (where the ranks are averaged anyway)
#   staleness           (an asynchronous parameter server) how many updates old the weights were that an applied
#                       gradient was computed on
DISTANCES = ("peer_distance", "consensus_distance", "staleness")
# Counted per replica where a strategy enables it on every rank (`Traffic.histogram`):
#   staleness_histogram (an asynchronous parameter server) per worker, how many of its gradients were applied on
#                       weights 0, 1, 2, ... updates old (the last bin: that many or more)
HISTOGRAMS = ("staleness_histogram",)


class Traffic:
    """Bytes this rank hands to its training collectives (gradients, parameters, factors, shards), counted by the
    backend as it hands them; `take()` returns and clears what accumulated since the last call. Bytes counted inside
    `sync()` (a model average) are also counted as a sync. Not counted: the once-per-window metrics reduction, the
    stop agreement, start-up and checkpoint collectives (`paused()`)."""

    def __init__(self):
        self.sent = self.sync_bytes = self.syncs = 0
        self.distances = {name: [0.0, 0] for name in DISTANCES}  # sum, count since the last take()
        self.histograms: dict[str, list[list[float]]] = {}  # name -> rows x bins, counts since the last take()
        self._in_sync = self._paused = False

    def histogram(self, name: str, rows: int, bins: int) -> None:
        """Count `name` (one of `HISTOGRAMS`) per row from now on; every rank must enable the same ones (the
        window's reduction sums equal-length vectors)."""
        if name not in HISTOGRAMS:
            raise ValueError(f"unknown histogram {name!r}; known: {', '.join(HISTOGRAMS)}")
        self.histograms[name] = [[0.0] * bins for _ in range(rows)]

    def count(self, name: str, row: int, value: int) -> None:
        counts = self.histograms[name][row]
        counts[min(int(value), len(counts) - 1)] += 1

    def shapes(self) -> list[tuple[str, int, int]]:
        """The enabled histograms as (name, rows, bins), in `take()`'s order."""
        return [(name, len(h), len(h[0]) if h else 0) for name, h in self.histograms.items()]

    def distance(self, name: str, value: float) -> None:
        """How far this rank's model was from another (`DISTANCES`): logged as the mean over ranks and the window."""
        self.distances[name][0] += float(value)
        self.distances[name][1] += 1

    def add(self, nbytes: int) -> None:
        if self._paused:
            return
        self.sent += int(nbytes)
        if self._in_sync:
            self.sync_bytes += int(nbytes)

    @contextlib.contextmanager
    def sync(self):
        self._in_sync = True
        try:
            yield
        finally:
            self._in_sync = False
            if not self._paused:
                self.syncs += 1

    @contextlib.contextmanager
    def paused(self):
        was, self._paused = self._paused, True
        try:
            yield
        finally:
            self._paused = was

    def take(self) -> list[float]:
        """[bytes, of which in syncs, syncs, then a sum and a count per distance, then each enabled histogram's
        counts row by row] since the last call."""
        out = [float(self.sent), float(self.sync_bytes), float(self.syncs)]
        for name in DISTANCES:
            out += [self.distances[name][0], float(self.distances[name][1])]
            self.distances[name] = [0.0, 0]
        for rows in self.histograms.values():
            for row in rows:
                out += row
                row[:] = [0.0] * len(row)
        self.sent = self.sync_bytes = self.syncs = 0
        return out


def window_metrics(summed: list[float], steps: int, ranks: int, histograms=()) -> dict:
    """`Traffic.take()` summed over the job for a window of `steps` steps -> the metrics logged per window: per
    replica (the sum over `ranks` data-parallel replicas: every rank, or with a parameter server the workers, its
    servers' bytes included) in the window, per step, and per model average (local SGD); the histograms
    (`Traffic.shapes()`) as the job's counts, one list per row, trailing empty bins dropped."""
    sent, sync_bytes, syncs = (v / max(1, ranks) for v in summed[:3])
    out = {"sent_bytes": sent, "sent_bytes_per_step": sent / max(1, steps)}
    if syncs:
        out.update(syncs=syncs, sent_bytes_per_sync=sync_bytes / syncs)
    for i, name in enumerate(DISTANCES):
        total, count = summed[3 + 2 * i:5 + 2 * i] if len(summed) >= 5 + 2 * i else (0.0, 0.0)
        if count:
            out[name] = total / count
    at = 3 + 2 * len(DISTANCES)
    for name, rows, bins in histograms:
        counts = [[int(c) for c in summed[at + r * bins:at + (r + 1) * bins]] for r in range(rows)]
        at += rows * bins
        width = max((max((i + 1 for i, c in enumerate(row) if c), default=0) for row in counts), default=0)
        if width:
            out[name] = [row[:width] for row in counts]
    return out
