"""The training loop, framework-neutral: epochs, the mid-epoch resume offset, metric windows with one
reduction per log interval, checkpoint cadence, the agreed stop, and evaluation at each epoch's end.

It drives an engine (the torch Trainer; the TensorFlow one joins it) through the `Engine` protocol
below and never touches a tensor itself: the engine's per-step statistics are opaque values that
support `+`, and leave the device only in `reduce_sum`, once per log interval."""
from __future__ import annotations

import math
import resource
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol

from hpctrain import linkrate, stragglers, watchdog
from hpctrain.config import RunConfig
from hpctrain.errors import NonFiniteError
from hpctrain.metrics import MetricsLogger, Throughput, Traffic, window_metrics


class Engine(Protocol):
    step: int                 # optimizer steps taken (restored by resume)
    steps_per_epoch: int
    total_steps: int          # the LR schedule's horizon: steps_per_epoch x epochs
    micro_batches: int        # batches per optimizer step (accumulation, or pipeline micro-batches)
    samples_per_step: int     # this rank's samples per optimizer step
    counts_samples: bool      # False where another rank of the same replica counts them (pipeline stages)
    data_size: int            # data-parallel replicas in sync
    local_replicas: int       # replicas this process feeds (tf.distribute: its devices; else 1)
    has_validation: bool
    logger: MetricsLogger | None  # given by the loop; the engine logs evaluations and messages to it
    traffic: Traffic | None   # optional: bytes this rank handed to its training collectives (None: not counted)
    # optional, with rank_nodes() and cluster: seconds this rank waited for the others since the last call (the
    # straggler watch, hpctrain.stragglers; and the link watch, hpctrain.linkrate, read where cluster.size > local_size)
    wait_seconds: Callable[[], float]
    # optional: bytes of optimizer state this rank holds (ZeRO and the parameter server shard it)
    optimizer_state_bytes: Callable[[], int]

    def epoch_batches(self, epoch: int, skip_batches: int) -> Iterator: ...
    def train_step(self, micro_batches: list): ...           # -> local [loss x n, correct, n], opaque
    def reduce_sum(self, stats, extra: list[float]) -> list[float]: ...  # one collective: stats + extra
    def agree(self, flag: bool) -> float: ...                # sum of a flag over ranks
    def lr(self, step: int) -> float: ...
    def save(self) -> None: ...
    def evaluate(self) -> dict: ...
    def log(self, message: str) -> None: ...
    def progress(self, step: int) -> None: ...                # the last step trained, for the run's status


def train(engine: Engine, cfg: RunConfig, rank: int, preemption=None) -> dict:
    """Train to the step limit, or until `preemption` (hpctrain.preempt.Preemption) reports an agreed
    stop: then save and return with result["stopped_by_signal"] set to the signal's name. A
    non-finite rank-averaged loss raises NonFiniteError before anything of those weights is saved."""
    limit = min(engine.total_steps, cfg.max_steps) if cfg.max_steps else engine.total_steps
    engine.logger = MetricsLogger(cfg.run_dir, enabled=rank == 0, total_steps=limit, progress=cfg.progress,
                                  tensorboard=cfg.tensorboard, initial_step=engine.step)
    window = Window(engine)
    result: dict = {}
    stopped_by, noticed = None, False
    while engine.step < limit and stopped_by is None:
        epoch, offset = divmod(engine.step, engine.steps_per_epoch)
        epoch_rate = Throughput()
        batches = engine.epoch_batches(epoch, offset * engine.micro_batches)
        saved = False
        for _ in range(offset, engine.steps_per_epoch):
            started = time.perf_counter()
            window.add(engine.train_step([next(batches) for _ in range(engine.micro_batches)]),
                       time.perf_counter() - started)
            watchdog.beat(engine.step)
            epoch_rate.update(engine.samples_per_step)
            engine.logger.advance()
            if engine.step % cfg.log_every == 0 or engine.step == limit:
                result = window.report(epoch)
            saved = bool(cfg.checkpoint_every and engine.step % cfg.checkpoint_every == 0)
            if saved:
                engine.save()
            if evaluates_between_epochs(cfg, engine):
                result.update(engine.evaluate())
            if engine.step >= limit:
                break
            if preemption is not None and preemption.requested and not noticed:
                noticed = True
                engine.log(f"{preemption.reason} received: stopping at the next agreed step (every "
                           f"{cfg.preempt_check_every}) after a checkpoint; a second Ctrl-C ends at once, unsaved")
            # Preemption: all ranks agree at the same step (one collective), so all save and stop together.
            if preemption is not None and preemption.should_stop(engine.step, cfg.preempt_check_every,
                                                                 engine.agree):
                stopped_by = preemption.reason
                break
        rate = epoch_rate.rate()  # the epoch's training steps, before the end-of-epoch save
        if not saved:
            engine.save()  # end of epoch, a stop at max_steps or on a signal: always resumable from here
        if engine.step % engine.steps_per_epoch == 0:  # also when the stop fell on an epoch's last step
            # per replica, like the log windows' (a tf.distribute process feeds several replicas)
            per_replica = rate / engine.local_replicas
            engine.logger.log(engine.step, "epoch", {"epoch": epoch, "samples_per_s_rank": per_replica})
            if cfg.eval_every_epoch and engine.has_validation:
                result.update(engine.evaluate())
    if stopped_by is not None:
        engine.log(f"stopping at step {engine.step} on {stopped_by}: checkpoint saved")
        return {**result, "stopped_by_signal": stopped_by}
    return result


def evaluates_between_epochs(cfg: RunConfig, engine: Engine) -> bool:
    """--eval-every N: an evaluation after every N-th step, except where the epoch's end evaluates anyway."""
    epoch_end = engine.step % engine.steps_per_epoch == 0 and cfg.eval_every_epoch
    return bool(cfg.eval_every and engine.step % cfg.eval_every == 0 and engine.has_validation and not epoch_end)


def peak_rss_mib() -> float:
    """This process's peak resident memory so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mib() -> float:
    """This process's resident memory now (what training holds, not a start-up peak); 0 where /proc is missing."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return 0.0
    return pages * resource.getpagesize() / 2**20


class Window:
    """Training statistics since the last log line: summed locally each step, reduced once."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.stats = None
        self.steps, self.start, self.seconds = 0, time.perf_counter(), 0.0
        self.watch: stragglers.Watch | None = None
        # Links are only worth reading where this rank has peers on other hosts (once a window: a getsockopt per
        # connection); the figure's slot rides the reduction on every engine that reports per-rank figures
        # (wait_seconds), NaN where nothing is read, so that every rank hands the reduction the same length.
        cluster = getattr(engine, "cluster", None)
        self.watches_links = hasattr(engine, "wait_seconds")
        other_hosts = cluster is not None and cluster.size > getattr(cluster, "local_size", cluster.size)
        self.links = linkrate.Sampler() if self.watches_links and other_hosts else None
        self.link_watch: linkrate.Watch | None = None
        self.nodes: list[str] | None = None  # every rank's node, gathered at the first window that names any
        self.first_step = engine.step + 1

    def add(self, stats, seconds: float = 0.0) -> None:
        """One step's local statistics and its wall time (fetching the batch included)."""
        self.stats = stats if self.stats is None else self.stats + stats
        self.steps += 1
        self.seconds += seconds

    def busy(self) -> list[float]:
        """This rank's busy seconds per step at its index of a world-sized vector, summed over ranks by the window's
        one reduction; empty where the engine does not time its waits."""
        e = self.engine
        waits = getattr(e, "wait_seconds", None)
        if waits is None:
            return []
        vector = [0.0] * e.cluster.size
        mine = (self.seconds - waits()) / self.steps  # NaN where the rank does not compute (a server)
        vector[e.cluster.rank] = max(0.0, mine) if math.isfinite(mine) else math.nan
        return vector

    def link(self) -> list[float]:
        """This rank's fastest connection to another host in the window (bits/s, NaN: none read or none moved data)
        at its index of a world-sized vector, summed by the window's one reduction; empty where the engine reports
        no per-rank figures."""
        if not self.watches_links:
            return []
        vector = [0.0] * self.engine.cluster.size
        vector[self.engine.cluster.rank] = self.links.take() if self.links is not None else math.nan
        return vector

    def state(self) -> list[float]:
        """This rank's optimizer state in MiB at its index of a world-sized vector (summed by the window's one
        reduction: every rank's figure on rank 0); empty where the engine does not report it."""
        e = self.engine
        held = getattr(e, "optimizer_state_bytes", None)
        if held is None:
            return []
        vector = [0.0] * e.cluster.size
        vector[e.cluster.rank] = held() / 2**20
        return vector

    def _watched(self, attr: str, kind, values: list[float]) -> dict:
        """Feed a watch (stragglers.Watch, linkrate.Watch) the window's reduced values: its figures for the record,
        its line, if any, logged. Its first window warms up (allocator, caches, connections): nothing is named."""
        e = self.engine
        watch = getattr(self, attr)
        first = watch is None
        if first:
            if self.nodes is None:
                self.nodes = e.rank_nodes()  # one allgather, the same window on every rank
            watch = kind(self.nodes)
            setattr(self, attr, watch)
        figures, line = watch.window(values, self.first_step, e.step, quiet=first)
        if line:
            e.log(line)
        return figures

    def report(self, epoch: int) -> dict:
        e = self.engine
        rate = e.samples_per_step * self.steps / (time.perf_counter() - self.start)
        mine = rate if e.counts_samples else 0.0  # a pipeline replica's samples count once
        counter = getattr(e, "traffic", None)  # optional in the protocol
        traffic = counter.take() if counter is not None else []
        now = rss_mib()  # the kernel updates the peak lazily: it can lag the present
        memory = [max(peak_rss_mib(), now), now, 1.0]  # summed with the processes counted: the mean of a process
        busy, state, link = self.busy(), self.state(), self.link()
        loss_n, correct, n, rates, peak, now, processes, *rest = e.reduce_sum(
            self.stats, [mine, *memory, *traffic, *busy, *state, *link])
        k, b, s = len(traffic), len(busy), len(state)
        sent, busy, state, link = rest[:k], rest[k:k + b], rest[k + b:k + b + s], rest[k + b + s:]
        loss = loss_n / n
        if not math.isfinite(loss):
            raise NonFiniteError(f"rank-averaged loss is {loss} at step {e.step} (steps "
                                 f"{e.step - self.steps + 1}..{e.step}): stopped, these weights "
                                 "were not saved; lower --lr or check the data")
        result = {"loss": loss, "accuracy": correct / n, "lr": e.lr(e.step - 1), "epoch": epoch,
                  "samples_per_s_rank": rates / e.data_size, "samples_per_s_total": rates,
                  "peak_rss_mib": peak / processes, "rss_mib": now / processes}
        if state:  # the largest rank's share: what a rank must fit
            result["optimizer_state_mib_max"] = max(state)
        if sent:  # bytes per rank in the window, per step, per model average
            result.update(window_metrics(sent, self.steps, e.data_size // e.local_replicas, counter.shapes()))
        if busy:
            result.update(self._watched("watch", stragglers.Watch, busy))
        if link:
            result.update(self._watched("link_watch", linkrate.Watch, link))
        e.logger.log(e.step, "train", result)
        e.progress(e.step)
        self.stats, self.steps, self.start, self.seconds = None, 0, time.perf_counter(), 0.0
        self.first_step = e.step + 1
        return result
