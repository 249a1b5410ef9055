"""PyTorch engine: set up the process, build loaders and optimizer, and the Trainer.

The Trainer receives a built model, optimizer and loaders and a backend that knows how gradients
are combined; it exposes `train_step`, `train`, `evaluate`, `state_dict` / `load_state_dict`.
"""
from __future__ import annotations

import atexit
import contextlib
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from hpctrain import watchdog
from hpctrain.backends import build_backend
from hpctrain.checkpoint import CheckpointManager
from hpctrain.cluster import ClusterEnv, threads_per_rank, visible_gpu_index
from hpctrain.config import ConfigError, TrainConfig
from hpctrain.errors import CheckpointSaveError, ExitError, NonFiniteError
from hpctrain.data.sharding import ShardedBatchSampler
from hpctrain.metrics import MetricsLogger, Throughput
from hpctrain.preempt import worker_ignores_foreign_sigterm
from hpctrain.runlock import RunLock, RunLockError
from hpctrain.schedule import lr_at, scaled_lr


@dataclass
class Runtime:
    cluster: ClusterEnv
    device: torch.device
    threads: int
    backend: object
    data_rank: int = 0  # this rank's data-parallel replica (its rank, unless pipeline stages share a replica)
    data_size: int = 1  # number of data-parallel replicas (world size / pipeline stages)
    run_lock: RunLock | None = None  # rank 0's lock on run_dir


def setup(cfg: TrainConfig, cluster: ClusterEnv) -> Runtime:
    """Pin the device by local rank, size the thread pool, seed, and start the backend."""
    d = cfg.dist
    gpus = torch.cuda.device_count() if d.device != "cpu" else 0
    if d.device == "cuda" and gpus == 0:
        raise ConfigError("dist.device (--device): 'cuda' requested but no GPU is visible (allowed here: auto, cpu)")
    gpu = visible_gpu_index(cluster, gpus)
    if gpu is not None:
        torch.cuda.set_device(gpu)  # one GPU per rank, chosen by local rank
    device = torch.device("cuda", gpu) if gpu is not None else torch.device("cpu")
    if d.amp == "fp16" and device.type != "cuda":
        raise ConfigError("dist.amp (--amp): 'fp16' needs a GPU (allowed on CPU: none, bf16)")
    threads = d.threads or threads_per_rank(cluster)
    torch.set_num_threads(threads)  # ranks sharing a node split its cores instead of oversubscribing
    torch.manual_seed(cfg.run.seed)
    if cfg.run.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    for name, value in watchdog.launcher_defaults(cfg.run.hang_timeout).items():
        os.environ.setdefault(name, value)  # read by Horovod / NCCL at init; the user's own settings win
    stages = cfg.pipeline.stages
    if stages > 1:
        from hpctrain.backends.pipeline import PipelineBackend
        try:
            backend = PipelineBackend(d, cluster, device, stages)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        rt = Runtime(cluster, device, threads, backend, backend.data_rank, backend.data_size)
    else:
        rt = Runtime(cluster, device, threads, build_backend(d, cluster, device), cluster.rank, cluster.size)
    rt.run_lock = lock_run_dir(cfg.run.run_dir, rt)
    return rt


def lock_run_dir(run_dir: str, rt: Runtime) -> RunLock | None:
    """Rank 0 holds run_dir's lock for the run's lifetime (released by Trainer.close, at exit on an
    error, or found stale after a crash); every rank learns the verdict, so a second run into the same
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


def make_trainer(model: nn.Module, train_loader, val_loader, rt: Runtime, cfg: TrainConfig, task=None):
    """Data parallel (the backend wraps the whole model), or pipeline x data parallel when
    --pipeline-stages > 1 (the model is split into stages; each rank optimizes its stage only)."""
    if cfg.pipeline.stages > 1:
        from hpctrain.pipeline.trainer import PipelineTrainer
        return PipelineTrainer(model, train_loader, val_loader, rt, cfg, task)
    return Trainer(model, build_optimizer(model, cfg.optim), train_loader, val_loader, rt, cfg, task)


def make_loader(source, sampler, workers: int, device: torch.device) -> torch.utils.data.DataLoader:
    # The sampler yields lists of (index, epoch) keys; workers decode/augment, the main process trains.
    # Workers ignore Slurm's SIGTERM (it reaches the whole process group): the trainer must live to save.
    return torch.utils.data.DataLoader(source, batch_sampler=sampler, num_workers=workers,
                                       worker_init_fn=worker_ignores_foreign_sigterm,
                                       pin_memory=device.type == "cuda", persistent_workers=workers > 0,
                                       prefetch_factor=4 if workers > 0 else None)


def build_optimizer(model: nn.Module, cfg) -> torch.optim.Optimizer:
    # No weight decay on biases and BN parameters (standard for ResNet/BERT recipes).
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=False)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr)
    raise ConfigError(f"optim.optimizer (--optimizer): {cfg.optimizer!r} is not allowed (allowed: sgd, adamw)")


class Classification:
    """The default task: batch = (inputs, labels); cross-entropy; accuracy = argmax == label.

    A task is any callable (model, batch) -> (loss, stats) where stats is a float64 tensor
    [loss x count, correct, count] on the batch's device; BERT's MLM task counts masked tokens."""

    def __init__(self, label_smoothing: float = 0.0):
        self.loss_fn = nn.CrossEntropyLoss(label_smoothing=label_smoothing)

    def __call__(self, model: nn.Module, batch) -> tuple[torch.Tensor, torch.Tensor]:
        return self.loss(model(batch[0]), batch)

    # ---- the pipeline runtime's view of the task: blocks, first input, loss on the last output -------
    def loss(self, logits: torch.Tensor, batch) -> tuple[torch.Tensor, torch.Tensor]:
        y = batch[1]
        loss = self.loss_fn(logits.float(), y)
        return loss, torch.stack([loss.detach().double() * y.numel(), (logits.detach().argmax(1) == y).sum().double(),
                                  torch.tensor(float(y.numel()), dtype=torch.float64, device=y.device)])

    def inputs(self, batch) -> torch.Tensor:
        return batch[0]

    def blocks(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        return model.blocks()

def nonfinite(tensors: dict) -> str | None:
    """Names of the floating-point tensors holding NaN or inf (None when all are finite)."""
    bad = [k for k, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    return f"{len(bad)} tensor(s), e.g. {bad[0]}" if bad else None


def to_device(batch, device: torch.device):
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return type(batch)(to_device(v, device) for v in batch)


class Trainer:
    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, train_loader, val_loader,
                 runtime: Runtime, cfg: TrainConfig, task=None):
        self.rt, self.cfg = runtime, cfg
        self.backend, self.device, self.cluster = runtime.backend, runtime.device, runtime.cluster
        self.model, self.optimizer = self.backend.wrap(model.to(self.device), optimizer)
        self.train_loader, self.val_loader = train_loader, val_loader
        self.sampler: ShardedBatchSampler = train_loader.batch_sampler
        self.task = task or Classification(cfg.optim.label_smoothing)
        amp = cfg.dist.amp
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
        # fp16 gradients underflow without loss scaling; bf16 has fp32's range and needs none.
        self.scaler = torch.amp.GradScaler("cuda") if amp == "fp16" else None
        self.step = 0
        self.accumulate = self.micro_batches_per_step()
        self.data_size = runtime.data_size
        self.counts_samples = True  # this rank's samples are its own (not another stage's of the same replica)
        self.steps_per_epoch = len(self.sampler) // self.accumulate
        if self.steps_per_epoch < 1:
            raise ConfigError(f"data.batch_size (--batch-size): {cfg.data.batch_size} x {self.accumulate} "
                              f"micro-batch(es) x {self.data_size} replica(s) is more than the "
                              f"{self.sampler.num_samples} training samples: not one step per epoch")
        self.total_steps = self.steps_per_epoch * cfg.run.epochs  # the LR schedule's horizon
        o = cfg.optim
        self.base_lr = o.lr
        self.peak_lr = scaled_lr(o.lr, self.data_size, o.lr_scaling)
        self.warmup_steps = int(round(o.warmup_epochs * self.steps_per_epoch))
        self.checkpoints = CheckpointManager(Path(cfg.run.run_dir) / "checkpoints", cfg.run.keep_checkpoints,
                                             log=self.log)
        self.logger: MetricsLogger | None = None

    # ---- helpers -------------------------------------------------------------------------------
    def micro_batches_per_step(self) -> int:
        return self.cfg.dist.accumulate

    def log(self, message: str) -> None:
        if self.cluster.rank == 0:
            (self.logger.info if self.logger else print)(message)

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def lr(self, step: int) -> float:
        return lr_at(step, base_lr=self.base_lr, peak_lr=self.peak_lr, warmup_steps=self.warmup_steps,
                     total_steps=self.total_steps, schedule=self.cfg.optim.schedule)

    def sync_buffers(self) -> None:
        """Average BatchNorm running statistics so every rank evaluates and saves the same model."""
        for buf in self.backend.unwrap(self.model).buffers():
            if buf.is_floating_point():
                buf.copy_(self.backend.allreduce(buf, "mean"))

    # ---- one step --------------------------------------------------------------------------------
    def train_step(self, micro_batches) -> torch.Tensor:
        """Forward/backward over the micro-batches, combine gradients, update. Returns the local
        [loss x samples, correct, samples] (not yet reduced: no sync on the hot path)."""
        self.model.train()
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr(self.step)
        self.optimizer.zero_grad()  # Horovod's override takes no set_to_none; torch defaults to it
        stats = torch.zeros(3, dtype=torch.float64, device=self.device)
        n_micro = len(micro_batches)
        for i, batch in enumerate(micro_batches):
            batch = to_device(batch, self.device)
            with self.backend.accumulation(self.model, last=i == n_micro - 1):
                with self._autocast():
                    loss, batch_stats = self.task(self.model, batch)
                scaled = loss / n_micro  # mean over the whole accumulated batch
                (self.scaler.scale(scaled) if self.scaler else scaled).backward()
            stats += batch_stats
        self.backend.step(self.optimizer, self.scaler)
        self.step += 1
        return stats

    # ---- loop ------------------------------------------------------------------------------------
    def train(self, preemption=None) -> dict:
        """Train to the step limit, or until `preemption` (hpctrain.preempt.Preemption) reports an agreed
        stop: then save and return with result["stopped_by_signal"] set to the signal's name. A
        non-finite rank-averaged loss raises NonFiniteError before anything of those weights is saved."""
        cfg = self.cfg.run
        limit = min(self.total_steps, cfg.max_steps) if cfg.max_steps else self.total_steps
        self.logger = MetricsLogger(cfg.run_dir, enabled=self.cluster.rank == 0, total_steps=limit,
                                    progress=cfg.progress, tensorboard=cfg.tensorboard, initial_step=self.step)
        per_step = self.cfg.data.batch_size * self.accumulate
        result: dict = {}
        stopped_by = None
        window = torch.zeros(3, dtype=torch.float64, device=self.device)
        window_start, window_steps = time.perf_counter(), 0
        while self.step < limit and stopped_by is None:
            epoch, offset = divmod(self.step, self.steps_per_epoch)
            self.sampler.set_epoch(epoch, skip_batches=offset * self.accumulate)
            epoch_rate = Throughput()
            batches = iter(self.train_loader)
            saved = False
            for _ in range(offset, self.steps_per_epoch):
                micro = [next(batches) for _ in range(self.accumulate)]
                window += self.train_step(micro)
                watchdog.beat(self.step)
                window_steps += 1
                epoch_rate.update(per_step)
                self.logger.advance()
                if self.step % cfg.log_every == 0 or self.step == limit:
                    # Metrics: one allreduce per log interval, not per step.
                    total = self.backend.allreduce(window, "sum").tolist()
                    loss = total[0] / total[2]
                    if not math.isfinite(loss):
                        raise NonFiniteError(f"rank-averaged loss is {loss} at step {self.step} (steps "
                                             f"{self.step - window_steps + 1}..{self.step}): stopped, these weights "
                                             "were not saved; lower --lr or check the data")
                    rate = per_step * window_steps / (time.perf_counter() - window_start)
                    mine = rate if self.counts_samples else 0.0  # a pipeline replica's samples count once
                    rates = self.backend.allreduce(torch.tensor([mine], dtype=torch.float64, device=self.device), "sum").item()
                    result = {"loss": loss, "accuracy": total[1] / total[2],
                              "lr": self.lr(self.step - 1), "epoch": epoch,
                              "samples_per_s_rank": rates / self.data_size, "samples_per_s_total": rates}
                    self.logger.log(self.step, "train", result)
                    window.zero_()
                    window_start, window_steps = time.perf_counter(), 0
                saved = bool(cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0)
                if saved:
                    self.save()
                if self.step >= limit:
                    break
                # Preemption: all ranks agree at the same step (one allreduce), so all save and stop together.
                if preemption is not None and preemption.should_stop(
                        self.step, cfg.preempt_check_every,
                        lambda flag: self.backend.allreduce(torch.tensor([float(flag)], device=self.device), "sum").item()):
                    stopped_by = preemption.reason
                    break
            if not saved:
                self.save()  # end of epoch, a stop at max_steps or on a signal: always resumable from here
            if self.step % self.steps_per_epoch == 0:  # also when the stop fell on an epoch's last step
                self.logger.log(self.step, "epoch", {"epoch": epoch, "samples_per_s_rank": epoch_rate.rate()})
                if cfg.eval_every_epoch and self.val_loader is not None:
                    result.update(self.evaluate())
        if stopped_by is not None:
            self.log(f"stopping at step {self.step} on {stopped_by}: checkpoint saved")
            return {**result, "stopped_by_signal": stopped_by}
        return result

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Top-1 over the whole validation set: each rank scores its shard, counts are summed."""
        self.sync_buffers()
        self.model.eval()
        stats = torch.zeros(3, dtype=torch.float64, device=self.device)
        for batch in self.val_loader:
            stats += self.eval_batch(to_device(batch, self.device))
            watchdog.beat()
        total = self.backend.allreduce(stats, "sum").tolist()
        metrics = {"val_loss": total[0] / max(1.0, total[2]), "val_top1": total[1] / max(1.0, total[2]),
                   "val_samples": int(total[2])}
        if self.logger:
            self.logger.log(self.step, "eval", metrics)
        return metrics

    def eval_batch(self, batch) -> torch.Tensor:
        with self._autocast():
            return self.task(self.model, batch)[1]

    # ---- state ---------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"model": self.backend.unwrap(self.model).state_dict(), "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler else None, "step": self.step,
                "world_size": self.cluster.size, "config": self.cfg.to_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.backend.unwrap(self.model).load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])

    def save(self) -> None:
        with watchdog.phase("checkpoint"):  # the other ranks wait in a collective meanwhile: not hung
            self.sync_buffers()  # collective: every rank takes part, only rank 0 writes
            self.write_checkpoint(self.state_dict() if self.cluster.rank == 0 else None)

    def write_checkpoint(self, state: dict | None) -> None:
        """Rank 0 writes `state` (the others pass None); then one broadcast tells every rank the outcome.
        So no rank returns (and exits, which makes the launcher kill rank 0) while rank 0 is still
        writing, and a failed or refused save stops every rank with the same error."""
        verdict = None
        if state is not None:
            try:
                bad = nonfinite(state["model"])
                if bad:
                    raise NonFiniteError(f"weights are not finite at step {self.step} ({bad}): checkpoint not "
                                         "written; lower --lr or check the data")
                path = self.checkpoints.save(self.step, lambda f: torch.save(state, f))
                self.log(f"saved checkpoint {path} (step {self.step})")
            except ExitError as e:
                verdict = (type(e).__name__, str(e))
        verdict = self.backend.broadcast_object(verdict)
        if verdict is not None:
            raise {"NonFiniteError": NonFiniteError}.get(verdict[0], CheckpointSaveError)(verdict[1])

    def resume(self) -> int:
        """Rank 0 reads the newest good checkpoint (or --resume FILE); its state goes to every rank."""
        with watchdog.phase("resume"):
            return self._resume()

    def _resume(self) -> int:
        mode = self.cfg.run.resume
        found = None
        if self.cluster.rank == 0:
            self.remove_stale_temps()
        if mode != "never" and self.cluster.rank == 0:
            read = lambda p: torch.load(p, map_location="cpu", weights_only=True)  # noqa: E731
            if mode == "auto":
                found = self.checkpoints.load_latest(read)
            else:
                found = (Path(mode), self.checkpoints.load(Path(mode), read))
            if found:
                self.load_state_dict(found[1])
                if found[1].get("world_size") != self.cluster.size:
                    self.log(f"note: checkpoint was written by {found[1].get('world_size')} rank(s), "
                             f"now {self.cluster.size}: data order per rank changes from here")
                self.log(f"resumed from {found[0]} at step {self.step}")
        # Every rank gets rank 0's weights, optimizer state and step, resumed or freshly initialised.
        self.backend.broadcast_state(self.model, self.optimizer)
        if self.scaler is not None:  # fp16 loss scale: every rank must resume with rank 0's
            self.scaler.load_state_dict(self.backend.broadcast_object(self.scaler.state_dict()
                                                                     if self.cluster.rank == 0 else None))
        self.step = self.backend.broadcast_object(self.step)
        return self.step

    def remove_stale_temps(self) -> None:
        removed = self.checkpoints.remove_stale_temps()
        if removed:
            self.log(f"removed {len(removed)} temp file(s) of an interrupted save: {', '.join(removed)}")

    def close(self) -> None:
        if self.logger:
            self.logger.close()
        if self.rt.run_lock is not None:  # now, not at exit: the launcher may kill rank 0 once others exit
            self.rt.run_lock.release()
        # No rank exits before rank 0 has finished writing: the launcher kills the job on the first exit.
        self.backend.barrier()
        self.backend.shutdown()

