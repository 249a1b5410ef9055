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

from hpctrain import loop, rundir, watchdog
from hpctrain.checkpoint import CheckpointError, CheckpointManager, engine_of
from hpctrain.cluster import ClusterEnv
from hpctrain.config import ConfigError, TrainConfig
from hpctrain.data.sharding import ShardedBatchSampler
from hpctrain.errors import ExitError, NonFiniteError, rebuild
from hpctrain.lr_schedule import lr_at, scaled_lr
from hpctrain.runlock import RunLock


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
    opened: rundir.Opened | None = None  # rank 0: the run found in run_dir and the resume mode to apply


def open_run_dir(recipe, cfg, rt: Runtime) -> None:
    """Rank 0 takes run_dir's lock for the run's lifetime (released by close, at exit on an error, or found
    stale after a crash) and applies the run-directory rules (hpctrain.rundir) before anything is written;
    every rank learns the verdict, so a refused run stops whole."""
    error = None
    if rt.cluster.rank == 0:
        r = cfg.run
        try:
            rt.run_lock = RunLock(r.run_dir, job_id=rt.cluster.job_id, restart=rt.cluster.restart_count,
                                  step=rt.cluster.step_id).acquire()
            atexit.register(rt.run_lock.release)
            rt.opened = rundir.open_run(r.run_dir, recipe.identity(cfg), r.resume, r.new_run, rt.cluster.job_id,
                                        log=print)
        except ExitError as e:
            error = (e.exit_code, str(e))
    error = rt.backend.broadcast_object(error)
    if error:
        raise rebuild(*error)


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
                f"{cfg.data.batch_size * trainer.data_size * trainer.micro_batches} global; {trainer.bound}")


def explicit_fields(cfg) -> frozenset:
    return getattr(cfg, "explicit", frozenset())


def run_length(run, steps_per_epoch: int, explicit: frozenset) -> tuple[int, str]:
    """(the LR schedule's horizon in steps, what ends the run, for the start line). --max-steps N runs N steps
    (over as many epochs as that takes) unless --epochs, given explicitly, ends the run before."""
    by_epochs = steps_per_epoch * run.epochs
    if run.max_steps and ("run.epochs" not in explicit or run.max_steps <= by_epochs):
        horizon = run.max_steps if "run.epochs" not in explicit else by_epochs
        return horizon, f"ends after {run.max_steps} steps (--max-steps)"
    epochs = f"{run.epochs} epoch(s) x {steps_per_epoch} steps"
    if run.max_steps:
        return by_epochs, f"ends after {epochs} = {by_epochs} steps (--epochs {run.epochs}, before --max-steps {run.max_steps})"
    return by_epochs, f"ends after {epochs} = {by_epochs} steps (--epochs)"


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
        self.total_steps, self.bound = run_length(cfg.run, self.steps_per_epoch, explicit_fields(cfg))
        o = cfg.optim
        self.peak_lr = scaled_lr(o.lr, self.data_size, o.lr_scaling)
        self.base_lr = 0.0 if o.warmup_from == "zero" else o.lr
        warmup = o.warmup_ratio * self.total_steps if o.warmup_ratio else o.warmup_epochs * self.steps_per_epoch
        self.warmup_steps = int(round(warmup))
        self.checkpoints = CheckpointManager(Path(cfg.run.run_dir) / "checkpoints", cfg.run.keep_checkpoints,
                                             log=self.log, suffix=self.checkpoint_suffix)
        self.logger = None  # set by hpctrain.loop.train
        self.data = None  # the recipe's Data, and its after-train hook (trainer, cfg): set by build_trainer
        self.after_train = None
        self.identity: dict | None = None  # the run's framework, recipe and model signature: set by build_trainer
        self.run_id: str | None = None  # the run this trainer continues or began (rank 0, after resume)

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
                rundir.update_status(step=self.step, checkpoint=path.name, checkpoint_step=self.step)
            except ExitError as e:
                verdict = (e.exit_code, str(e))
        verdict = self.backend.broadcast_object(verdict)
        if verdict is not None:
            raise rebuild(*verdict)

    def resume(self) -> int:
        """Rank 0 reads the checkpoint to resume from (the newest good one of this run, or --resume FILE) and
        checks that it fits; `restore` hands its state to every rank (or, found nothing, makes every rank start
        from rank 0's initial weights). A refusal reaches every rank before any collective of the restore."""
        with watchdog.phase("resume"):
            found, error = None, None
            if self.cluster.rank == 0:
                removed = self.checkpoints.remove_stale_temps()
                if removed:
                    self.log(f"removed {len(removed)} temp file(s) of an interrupted save: {', '.join(removed)}")
                try:
                    found = self.read_checkpoint()
                except ExitError as e:
                    error = (e.exit_code, str(e))
            error = self.backend.broadcast_object(error)
            if error:
                raise rebuild(*error)
            self.step = self.restore(found)
            return self.step

    def read_checkpoint(self):
        """(path, state) of the checkpoint to resume from, or None (rank 0 only); then the run directory is
        settled for this run: what it trains again set aside, its run.json written."""
        opened = self.rt.opened or rundir.Opened(None, self.cfg.run.resume)
        record = opened.record
        if record is not None and self.identity is not None:
            diff = rundir.difference(self.identity, record.identity())
            if diff:
                raise rundir.RunDirError(f"run dir {self.cfg.run.run_dir} holds another run ({diff}): "
                                         f"{rundir.ways_out(self.cfg.run.run_dir)}")
        found = None
        if opened.resume == "auto":
            found = self.checkpoints.load_latest(self.read_state)
        elif opened.resume != "never":
            path = Path(opened.resume)
            found = path, self.read_named(path)
        if found is not None:
            self.check_fits(*found, record, explicit=opened.resume not in ("auto", "never"))
        if self.identity is not None:
            self.settle_run_dir(found, record, opened.resume)
        return found

    def read_named(self, path: Path) -> dict:
        """--resume FILE: a checkpoint of this engine, or one line saying what it is instead."""
        try:
            return self.checkpoints.load(path, self.read_state)
        except CheckpointError:
            raise
        except Exception as e:
            writer = engine_of(path)
            mine = self.cfg.dist.framework
            hint = (f"it was written by the {writer} engine: add --framework {writer}" if writer and writer != mine
                    else f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}")
            raise CheckpointError(f"run.resume (--resume): {path} is not a checkpoint of the {mine} engine "
                                  f"({hint})") from None

    def check_fits(self, where, state: dict, record, explicit: bool) -> None:
        """The checkpoint belongs to this run (or, named by --resume, may start or rewind it) and matches the
        model: its identity, then every tensor's name and shape. One line naming the first difference."""
        theirs = state.get("run_id")
        if record is not None and theirs and theirs != record.run_id:
            began = (record.started_from or {}).get("run_id")
            if not explicit or theirs != began:
                raise rundir.RunDirError(f"checkpoint {where} belongs to run {theirs}, but run dir "
                                         f"{self.cfg.run.run_dir} holds {record.describe()}: "
                                         f"{rundir.ways_out(self.cfg.run.run_dir)}")
        diff = rundir.difference(self.identity, state["identity"]) if self.identity and state.get("identity") else None
        problem = diff and f"it has {diff}" or self.shape_mismatch(state)
        if problem:
            raise CheckpointError(f"checkpoint {where} does not fit this model: {problem}")

    def settle_run_dir(self, found, record, mode: str) -> None:
        """Set aside what a run resumed at its step trains again; write run.json for a new run (or note this
        Slurm job in it, so a requeue of the job resumes the run whatever its --resume says)."""
        run_dir, step = self.cfg.run.run_dir, int(found[1]["step"]) if found else 0
        aside, names, records = rundir.set_aside_redone(run_dir, step)
        if aside is not None:
            self.log(f"run dir: moved what this run trains again after step {step} to {aside} ({len(names)} "
                     f"checkpoint(s){': ' + ', '.join(names) if names else ''}; {records} metrics record(s))")
        job = self.cluster.job_id
        if record is None:
            began = None
            if found and mode not in ("auto", "never"):
                began = {"path": str(found[0]), "run_id": found[1].get("run_id"), "step": step}
            record = rundir.new_record(self.identity, job, began)
            rundir.write_record(run_dir, record)
            self.log(f"run dir {run_dir}: {'new ' if not found else ''}{record.describe()}")
        elif job and record.slurm_job != job:
            record.slurm_job = job
            rundir.write_record(run_dir, record)
        self.run_id = record.run_id
        c = self.cluster
        rundir.keep_status(run_dir)
        rundir.update_status(state="running", step=step, resumed_at=step, exit_code=None, reason=None,
                             checkpoint=found[0].name if found else None, checkpoint_step=step if found else None,
                             launch={"job": job, "restart": c.restart_count, "step_id": c.step_id, "ranks": c.size,
                                     "nodes": c.num_nodes, "launcher": c.launcher})

    def progress(self, step: int) -> None:
        """The loop reports the last step trained (each log interval): kept in run.json's status."""
        rundir.update_status(step=step)

    def checkpoint_meta(self) -> dict:
        """What every checkpoint carries besides the tensors."""
        return {"step": self.step, "world_size": self.cluster.size, "config": self.cfg.to_dict(),
                "run_id": self.run_id, "identity": self.identity}

    def shape_mismatch(self, state: dict) -> str | None:
        """The first tensor of `state` whose name or shape differs from this model's (engine-specific)."""
        return None

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
