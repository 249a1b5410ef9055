"""What every engine's trainer shares, framework-neutral: the runtime record, the run-dir lock, step
and LR bookkeeping, the agreed checkpoint write, resume orchestration and close.

An engine's Trainer subclasses `EngineBase` and supplies the framework parts: `train_step`,
`evaluate`, `reduce_sum`, `agree`, `epoch_batches` (hpctrain.loop's protocol), and for checkpoints
`state()` (rank 0's whole state, or None elsewhere), `restore(found) -> step`, `write_state(state,
fileobj)`, `read_state(path)` and `nonfinite(state)`."""
from __future__ import annotations

import atexit
import os
from dataclasses import dataclass
from pathlib import Path

from hpctrain import loop, watchdog
from hpctrain.checkpoint import CheckpointManager
from hpctrain.cluster import ClusterEnv
from hpctrain.config import ConfigError, TrainConfig
from hpctrain.data.sharding import ShardedBatchSampler
from hpctrain.errors import CheckpointSaveError, ExitError, NonFiniteError
from hpctrain.lr_schedule import lr_at, scaled_lr
from hpctrain.runlock import RunLock, RunLockError


@dataclass
class Runtime:
    cluster: ClusterEnv
    device: object      # torch.device, or a TF device string
    threads: int
    backend: object
    data_rank: int = 0  # this rank's data-parallel replica (its rank, unless pipeline stages share a replica)
    data_size: int = 1  # number of data-parallel replicas (world size / pipeline stages)
    run_lock: RunLock | None = None  # rank 0's lock on run_dir
    local_replicas: int = 1  # replicas this rank feeds (tf.distribute: its devices); the sampler deals it their batches


def lock_run_dir(run_dir: str, rt: Runtime) -> RunLock | None:
    """Rank 0 holds run_dir's lock for the run's lifetime (released by close, at exit on an error, or
    found stale after a crash); every rank learns the verdict, so a second run into the same
    directory stops whole."""
    lock, error = None, None
    if rt.cluster.rank == 0:
        try:
            lock = RunLock(run_dir, job_id=rt.cluster.job_id, restart=rt.cluster.restart_count,
                           step=rt.cluster.step_id).acquire()
            atexit.register(lock.release)
        except RunLockError as e:
            error = str(e)
    error = rt.backend.broadcast_object(error)
    if error:
        raise RunLockError(error)
    return lock


def open_data(recipe, cfg: TrainConfig, rt: Runtime):
    """The recipe's data and this rank's samplers over it: (data, train_sampler, val_sampler or None)."""
    from hpctrain.recipes.base import World
    log = print if rt.cluster.rank == 0 else (lambda *_: None)
    data = recipe.data(cfg, World(rt.cluster.rank, rt.data_rank, rt.data_size, rt.backend.broadcast_object, log))
    d, seed = cfg.data, cfg.run.seed
    train = ShardedBatchSampler(len(data.train), rt.data_rank, rt.data_size, d.batch_size * rt.local_replicas, seed,
                                contiguous=data.contiguous)
    val = None
    if data.val is not None:
        val = ShardedBatchSampler(len(data.val), rt.data_rank, rt.data_size, d.eval_batch_size or d.batch_size, seed,
                                  shuffle=False, drop_last=False, pad=False)
    return data, train, val


def announce(trainer, recipe, cfg, data, params: int) -> None:
    rt = trainer.rt
    trainer.log(f"{recipe.prog}: {recipe.describe(cfg, data, params)}, {rt.backend.name} backend, device {rt.device}, "
                f"{rt.threads} thread(s) per rank, {trainer.steps_per_epoch} steps/epoch, batch {cfg.data.batch_size} per "
                f"replica x {trainer.data_size} replica(s) x {trainer.micro_batches} micro-batch(es) = "
                f"{cfg.data.batch_size * trainer.data_size * trainer.micro_batches} global")


def start_horovod(hvd, cfg, cluster: ClusterEnv, on_gpu: bool) -> None:
    """hvd.init() (hvd: horovod.torch or horovod.tensorflow) with hpctrain's cycle time, and a check that
    Horovod sees the launcher's world. Horovod reads its tuning from the environment at init. Measured on
    2 CPU cores, 2 ranks: cycle 1 ms (default) 39 img/s/rank, 5 ms 80, 10 ms 78, 20 ms 89 (ResNet-18,
    32 px). An explicit --hvd-cycle-time-ms wins; else a value set by the user/horovodrun; else ours on CPU."""
    if cfg.hvd_cycle_time_ms:
        os.environ["HOROVOD_CYCLE_TIME"] = str(cfg.hvd_cycle_time_ms)
    elif not on_gpu:
        os.environ.setdefault("HOROVOD_CYCLE_TIME", "10")
    hvd.init()
    if (hvd.rank(), hvd.size()) != (cluster.rank, cluster.size):
        raise RuntimeError(f"Horovod sees rank {hvd.rank()} of {hvd.size()} but the launcher says "
                           f"{cluster.rank} of {cluster.size} ({cluster.launcher}): is mpi4py/Horovod "
                           "built against the MPI that launched this job?")


class EngineBase:
    checkpoint_suffix = ".pt"

    def __init__(self, runtime: Runtime, cfg: TrainConfig, sampler, micro_batches: int, counts_samples: bool,
                 has_validation: bool):
        self.rt, self.cfg = runtime, cfg
        self.backend, self.cluster, self.device = runtime.backend, runtime.cluster, runtime.device
        self.sampler = sampler
        self.step = 0
        self.micro_batches, self.counts_samples, self.has_validation = micro_batches, counts_samples, has_validation
        self.samples_per_step = cfg.data.batch_size * micro_batches * runtime.local_replicas  # this rank's
        self.data_size = runtime.data_size * runtime.local_replicas  # replicas in sync: LR scaling, per-replica rates
        self.steps_per_epoch = len(sampler) // micro_batches
        if self.steps_per_epoch < 1:
            raise ConfigError(f"data.batch_size (--batch-size): {cfg.data.batch_size} x {micro_batches} "
                              f"micro-batch(es) x {self.data_size} replica(s) is more than the "
                              f"{sampler.num_samples} training samples: not one step per epoch")
        self.total_steps = self.steps_per_epoch * cfg.run.epochs  # the LR schedule's horizon
        o = cfg.optim
        self.base_lr = o.lr
        self.peak_lr = scaled_lr(o.lr, self.data_size, o.lr_scaling)
        self.warmup_steps = int(round(o.warmup_epochs * self.steps_per_epoch))
        self.checkpoints = CheckpointManager(Path(cfg.run.run_dir) / "checkpoints", cfg.run.keep_checkpoints,
                                             log=self.log, suffix=self.checkpoint_suffix)
        self.logger = None  # set by hpctrain.loop.train
        self.data = None  # the recipe's Data, and its after-train hook (trainer, cfg): set by build_trainer
        self.after_train = None

    def log(self, message: str) -> None:
        if self.cluster.rank == 0:
            (self.logger.info if self.logger else print)(message)

    def lr(self, step: int) -> float:
        return lr_at(step, base_lr=self.base_lr, peak_lr=self.peak_lr, warmup_steps=self.warmup_steps,
                     total_steps=self.total_steps, schedule=self.cfg.optim.schedule)

    def train(self, preemption=None) -> dict:
        return loop.train(self, self.cfg.run, self.cluster.rank, preemption)

    def finish_evaluation(self, stats) -> dict:
        """This rank's [loss x n, correct, n] over its validation shard -> the whole set's metrics (summed
        over ranks, one collective), logged."""
        loss_n, correct, n = self.reduce_sum(stats, [])
        metrics = {"val_loss": loss_n / max(1.0, n), "val_top1": correct / max(1.0, n), "val_samples": int(n)}
        if self.logger:
            self.logger.log(self.step, "eval", metrics)
        return metrics

    # ---- checkpoints -------------------------------------------------------------------------------
    def save(self) -> None:
        with watchdog.phase("checkpoint"):  # the other ranks wait in a collective meanwhile: not hung
            self.sync_buffers()  # collective: every rank takes part, only rank 0 writes
            self.write_checkpoint(self.state())

    def sync_buffers(self) -> None:
        """Make non-trained state (BatchNorm statistics) equal on every rank; a collective."""

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
            except ExitError as e:
                verdict = (type(e).__name__, str(e))
        verdict = self.backend.broadcast_object(verdict)
        if verdict is not None:
            raise {"NonFiniteError": NonFiniteError}.get(verdict[0], CheckpointSaveError)(verdict[1])

    def resume(self) -> int:
        """Rank 0 reads the newest good checkpoint (or --resume FILE); `restore` hands its state to every
        rank (or, found nothing, makes every rank start from rank 0's initial weights)."""
        with watchdog.phase("resume"):
            found = None
            if self.cluster.rank == 0:
                removed = self.checkpoints.remove_stale_temps()
                if removed:
                    self.log(f"removed {len(removed)} temp file(s) of an interrupted save: {', '.join(removed)}")
                found = self.read_checkpoint()
            self.step = self.restore(found)
            return self.step

    def read_checkpoint(self):
        """(path, state) of the checkpoint to resume from, or None (rank 0 only)."""
        mode = self.cfg.run.resume
        if mode == "never":
            return None
        if mode == "auto":
            return self.checkpoints.load_latest(self.read_state)
        return Path(mode), self.checkpoints.load(Path(mode), self.read_state)

    def note_world_size(self, state: dict) -> None:
        if state.get("world_size") != self.cluster.size:
            self.log(f"note: checkpoint was written by {state.get('world_size')} rank(s), "
                     f"now {self.cluster.size}: data order per rank changes from here")

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
