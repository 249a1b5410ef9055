"""The engine contract, and what every engine's Trainer shares. Framework-neutral.

`TrainerBase` is hpctrain.loop's `Engine` with everything that is not framework code written once: step and
LR bookkeeping, the agreed checkpoint write, resume and the run-directory rules (hpctrain.engine.resume),
restore, evaluation metrics, close. An engine's Trainer (engine/torch/trainer.py, engine/tf/trainer.py)
fills in the abstract methods below: the hooks, every one named and typed, each a few lines of its framework.
"""
from __future__ import annotations

import abc
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, ClassVar

from hpctrain import rundir, watchdog
from hpctrain.checkpoint import CheckpointManager
from hpctrain.config import ConfigError
from hpctrain.engine.resume import Resuming
from hpctrain.engine.runtime import Runtime
from hpctrain.errors import ExitError, NonFiniteError, rebuild
from hpctrain.lr_schedule import lr_at, scaled_lr


@dataclass
class Job:
    """What the entry point knows beyond the trainer's own pieces: the recipe's data, the run's identity
    (framework, recipe, model signature: hpctrain.rundir) and the after-train hook (trainer, cfg), e.g. BERT's
    export. Trainers built directly (tests, benchmarks) get an empty one: no run-directory rules apply."""
    data: Any = None
    identity: dict | None = None
    after_train: Callable | None = None
    extra: dict = field(default_factory=dict)


def run_length(run, steps_per_epoch: int, explicit: frozenset) -> tuple[int, str]:
    """(the LR schedule's horizon in steps, what ends the run, for the start line). --max-steps N runs N steps
    (over as many epochs as that takes) unless --epochs, given explicitly, ends the run before."""
    by_epochs = steps_per_epoch * run.epochs
    if run.max_steps and ("run.epochs" not in explicit or run.max_steps <= by_epochs):
        horizon = run.max_steps if "run.epochs" not in explicit else by_epochs
        return horizon, f"ends after {run.max_steps} steps (--max-steps)"
    epochs = f"{run.epochs} epoch(s) x {steps_per_epoch} steps = {by_epochs} steps"
    if run.max_steps:
        return by_epochs, f"ends after {epochs} (--epochs {run.epochs}, before --max-steps {run.max_steps})"
    return by_epochs, f"ends after {epochs} (--epochs)"


class TrainerBase(Resuming, abc.ABC):
    checkpoint_suffix: ClassVar[str] = ".pt"

    def __init__(self, runtime: Runtime, cfg, sampler, micro_batches: int, counts_samples: bool,
                 has_validation: bool, job: Job | None = None):
        self.rt, self.cfg, self.job = runtime, cfg, job or Job()
        self.backend, self.cluster, self.device = runtime.backend, runtime.cluster, runtime.device
        self.sampler, self.step = sampler, 0
        self.micro_batches, self.counts_samples, self.has_validation = micro_batches, counts_samples, has_validation
        self.local_replicas = runtime.local_replicas
        self.samples_per_step = cfg.data.batch_size * micro_batches * runtime.local_replicas  # this rank's
        self.data_size = runtime.data_size * runtime.local_replicas  # replicas in sync: LR scaling, per-replica rates
        self.steps_per_epoch = len(sampler) // micro_batches
        if self.steps_per_epoch < 1:
            raise ConfigError(f"data.batch_size (--batch-size): {cfg.data.batch_size} x {micro_batches} "
                              f"micro-batch(es) x {self.data_size} replica(s) is more than the "
                              f"{sampler.num_samples} training samples: not one step per epoch")
        self.total_steps, self.bound = run_length(cfg.run, self.steps_per_epoch, getattr(cfg, "explicit", frozenset()))
        o = cfg.optim
        self.peak_lr = scaled_lr(o.lr, self.data_size, o.lr_scaling)
        self.base_lr = 0.0 if o.warmup_from == "zero" else o.lr
        warmup = o.warmup_ratio * self.total_steps if o.warmup_ratio else o.warmup_epochs * self.steps_per_epoch
        self.warmup_steps = int(round(warmup))
        self.checkpoints = CheckpointManager(Path(cfg.run.run_dir) / "checkpoints", cfg.run.keep_checkpoints,
                                             log=self.log, suffix=self.checkpoint_suffix)
        self.logger = None  # given by hpctrain.loop.train
        self.traffic = None  # the backend's byte counter (hpctrain.metrics.Traffic) where the engine counts
        self.run_id: str | None = None  # the run this trainer continues or began (rank 0, after resume)

    def rank_nodes(self) -> list[str]:
        """Every rank's node name, by rank (one object allgather)."""
        return self.backend.allgather_object(self.cluster.node_name or self.cluster.hostname)

    # ---- the framework's part: hpctrain.loop's protocol --------------------------------------------------
    @abc.abstractmethod
    def epoch_batches(self, epoch: int, skip_batches: int) -> Iterator: ...

    @abc.abstractmethod
    def train_step(self, micro_batches: list) -> Any:
        """One optimizer step; returns this rank's [loss x n, correct, n] as an opaque value supporting +."""

    @abc.abstractmethod
    def reduce_sum(self, stats: Any, extra: list[float]) -> list[float]:
        """stats + extra summed over ranks in ONE collective, as floats."""

    @abc.abstractmethod
    def agree(self, flag: bool) -> float:
        """The flag summed over ranks (a collective)."""

    @abc.abstractmethod
    def evaluate(self) -> dict: ...

    # ---- the framework's part: model and state -------------------------------------------------------
    @abc.abstractmethod
    def whole_model(self) -> Any:
        """The plain model (every stage's weights on rank 0 after a pipeline save), for exports."""

    @abc.abstractmethod
    def parameter_count(self) -> int: ...

    @abc.abstractmethod
    def sync_buffers(self) -> None:
        """Make non-trained state (BatchNorm statistics) equal on every rank; a collective."""

    @abc.abstractmethod
    def state(self) -> dict | None:
        """The whole checkpoint (tensors + checkpoint_meta()) on rank 0, None elsewhere; may be a collective."""

    @abc.abstractmethod
    def load_state(self, state: dict) -> None:
        """Rank 0: take the weights and optimizer state of a checkpoint that fits (check_fits passed)."""

    @abc.abstractmethod
    def broadcast_state(self) -> None:
        """Rank 0's weights and optimizer state to every rank (a collective; also when nothing was loaded)."""

    @abc.abstractmethod
    def shape_mismatch(self, state: dict) -> str | None:
        """The first tensor of `state` whose name or shape differs from this model's, in words."""

    @staticmethod
    @abc.abstractmethod
    def write_state(state: dict, f: BinaryIO) -> None: ...

    @staticmethod
    @abc.abstractmethod
    def read_state(path: Path) -> dict: ...

    @staticmethod
    @abc.abstractmethod
    def nonfinite(state: dict) -> str | None:
        """What in `state` is NaN or inf, in words; None when every weight is finite."""

    # ---- shared ------------------------------------------------------------------------------------------
    @property
    def after_train(self) -> Callable | None:
        return self.job.after_train

    @property
    def data(self):
        return self.job.data

    def log(self, message: str) -> None:
        if self.cluster.rank == 0:
            (self.logger.info if self.logger else print)(message)

    def lr(self, step: int) -> float:
        return lr_at(step, base_lr=self.base_lr, peak_lr=self.peak_lr, warmup_steps=self.warmup_steps,
                     total_steps=self.total_steps, schedule=self.cfg.optim.schedule)

    def progress(self, step: int) -> None:
        """The loop reports the last step trained (each log interval): kept in run.json's status, written in the
        background (the ranks go on training meanwhile)."""
        rundir.update_status(step=step, later=True)

    def finish_evaluation(self, stats) -> dict:
        """This rank's [loss x n, correct, n] over its validation shard -> the whole set's metrics (summed
        over ranks, one collective), logged."""
        loss_n, correct, n = self.reduce_sum(stats, [])
        metrics = {"val_loss": loss_n / max(1.0, n), "val_top1": correct / max(1.0, n), "val_samples": int(n)}
        if self.logger:
            self.logger.log(self.step, "eval", metrics)
        return metrics

    def save(self) -> None:
        with watchdog.phase("checkpoint"):  # the other ranks wait in a collective meanwhile: not hung
            self.sync_buffers()  # collective: every rank takes part, only rank 0 writes
            self.write_checkpoint(self.state())

    def write_checkpoint(self, state: dict | None) -> None:
        """Rank 0 writes `state` (the others pass None); then one broadcast tells every rank the outcome.
        So no rank returns (and exits, which makes the launcher kill rank 0) while rank 0 is still
        writing, and a failed or refused save stops every rank with the same error."""
        verdict = None
        if state is not None:
            try:
                bad = self.nonfinite(state)
                if bad:
                    raise NonFiniteError(f"weights are not finite at step {self.step} ({bad}): checkpoint not "
                                         "written; lower --lr or check the data")
                path = self.checkpoints.save(self.step, lambda f: self.write_state(state, f))
                self.log(f"saved checkpoint {path} (step {self.step})")
                rundir.update_status(step=self.step, checkpoint=path.name, checkpoint_step=self.step)
            except ExitError as e:
                verdict = (e.exit_code, str(e))
        verdict = self.backend.broadcast_object(verdict)
        if verdict is not None:
            raise rebuild(*verdict)

    def checkpoint_meta(self) -> dict:
        """What every checkpoint carries besides the tensors."""
        return {"step": self.step, "world_size": self.cluster.size, "config": self.cfg.to_dict(),
                "run_id": self.run_id, "identity": self.job.identity}

    def restore(self, found) -> int:
        """`found` = (path, state) on rank 0 if it read a checkpoint. Every rank gets rank 0's weights, optimizer
        state and step, resumed or freshly initialised. Returns the step."""
        step = self.step
        if found:
            where, state = found
            self.load_state(state)
            step = int(state["step"])
            if state.get("world_size") != self.cluster.size:
                self.log(f"note: checkpoint was written by {state.get('world_size')} rank(s), now "
                         f"{self.cluster.size}: data order per rank changes from here")
            self.log(f"resumed from {where} at step {step}")
        with watchdog.collective("the broadcast of rank 0's model state"):  # the first large messages
            self.broadcast_state()
            return self.backend.broadcast_object(step)

    def close(self, collective: bool = True) -> None:
        """Flush metrics and release run_dir's lock; then (collective=True, the normal end) wait for
        every rank and shut the backend down. After an error only the local part runs: the peers may
        be anywhere, and a barrier could hang."""
        if self.logger:
            self.logger.close()
            self.logger = None
        if self.rt.run_lock is not None:  # now, not at exit: the launcher may kill rank 0 once others exit
            self.rt.run_lock.release()
        if collective:
            # No rank exits before rank 0 has finished writing: the launcher kills the job on the first exit.
            self.backend.barrier()
            self.backend.shutdown()
