"""The torch engine of hpctrain.loop: a Trainer over a step plan (data-parallel or pipeline).

The Trainer owns what both plans share: loaders, LR, AMP, the agreed checkpoint write, resume
orchestration, logging and close. The plan (data_parallel.py, pipeline/step.py) owns the model:
how a step runs, how buffers are synced and how state is collected and restored."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from hpctrain import loop, watchdog
from hpctrain.checkpoint import CheckpointManager
from hpctrain.config import ConfigError, TrainConfig
from hpctrain.data.sharding import ShardedBatchSampler
from hpctrain.engine.torch.data_parallel import DataParallel
from hpctrain.engine.torch.tasks import Classification
from hpctrain.engine.torch.util import autocast_factory, nonfinite, to_device
from hpctrain.errors import CheckpointSaveError, ExitError, NonFiniteError
from hpctrain.lr_schedule import lr_at, scaled_lr


class Trainer:
    """`Trainer(model, optimizer, loaders, runtime, cfg, task)` trains data-parallel; pipeline runs
    pass `plan=` (a PipelinePlan) instead of a model and optimizer."""

    def __init__(self, model: nn.Module | None, optimizer: torch.optim.Optimizer | None, train_loader, val_loader,
                 runtime, cfg: TrainConfig, task=None, plan=None):
        self.rt, self.cfg = runtime, cfg
        self.backend, self.device, self.cluster = runtime.backend, runtime.device, runtime.cluster
        self.task = task or Classification(cfg.optim.label_smoothing)
        self.plan = plan or DataParallel(self.backend, model.to(self.device), optimizer, cfg.dist.accumulate)
        self.train_loader, self.val_loader = train_loader, val_loader
        self.has_validation = val_loader is not None
        self.sampler: ShardedBatchSampler = train_loader.batch_sampler
        self.autocast = autocast_factory(cfg.dist.amp, self.device)
        # fp16 gradients underflow without loss scaling; bf16 has fp32's range and needs none.
        self.scaler = torch.amp.GradScaler("cuda") if cfg.dist.amp == "fp16" else None
        self.step = 0
        self.micro_batches = self.plan.micro_batches
        self.counts_samples = self.plan.counts_samples
        self.samples_per_step = cfg.data.batch_size * self.micro_batches
        self.data_size = runtime.data_size
        self.steps_per_epoch = len(self.sampler) // self.micro_batches
        if self.steps_per_epoch < 1:
            raise ConfigError(f"data.batch_size (--batch-size): {cfg.data.batch_size} x {self.micro_batches} "
                              f"micro-batch(es) x {self.data_size} replica(s) is more than the "
                              f"{self.sampler.num_samples} training samples: not one step per epoch")
        self.total_steps = self.steps_per_epoch * cfg.run.epochs  # the LR schedule's horizon
        o = cfg.optim
        self.base_lr = o.lr
        self.peak_lr = scaled_lr(o.lr, self.data_size, o.lr_scaling)
        self.warmup_steps = int(round(o.warmup_epochs * self.steps_per_epoch))
        self.checkpoints = CheckpointManager(Path(cfg.run.run_dir) / "checkpoints", cfg.run.keep_checkpoints,
                                             log=self.log)
        self.logger = None  # set by hpctrain.loop.train
        self.data = None  # the recipe's Data, and its after-train hook (trainer, cfg): set by build_trainer
        self.after_train = None

    @property
    def model(self) -> nn.Module:
        return self.plan.model  # what runs on this rank (wrapped by the backend, or this rank's stage)

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.plan.optimizer

    def whole_model(self) -> nn.Module:
        """The plain model (all stages' weights on rank 0 after a pipeline save) for exports."""
        return self.plan.whole_model()

    # ---- helpers -------------------------------------------------------------------------------
    def log(self, message: str) -> None:
        if self.cluster.rank == 0:
            (self.logger.info if self.logger else print)(message)

    def lr(self, step: int) -> float:
        return lr_at(step, base_lr=self.base_lr, peak_lr=self.peak_lr, warmup_steps=self.warmup_steps,
                     total_steps=self.total_steps, schedule=self.cfg.optim.schedule)

    # ---- the loop's engine protocol (hpctrain.loop.Engine) -------------------------------------------
    def epoch_batches(self, epoch: int, skip_batches: int):
        self.sampler.set_epoch(epoch, skip_batches=skip_batches)
        return iter(self.train_loader)

    def train_step(self, micro_batches) -> torch.Tensor:
        """One optimizer step over the micro-batches. Returns the local [loss x samples, correct,
        samples] (not yet reduced: no sync on the hot path)."""
        self.model.train()
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr(self.step)
        stats = self.plan.run(micro_batches, self)
        self.step += 1
        return stats

    def reduce_sum(self, stats: torch.Tensor, extra: list[float]) -> list[float]:
        values = torch.cat([stats, torch.tensor(extra, dtype=torch.float64, device=stats.device)])
        return self.backend.allreduce(values, "sum").tolist()

    def agree(self, flag: bool) -> float:
        return self.backend.allreduce(torch.tensor([float(flag)], device=self.device), "sum").item()

    def train(self, preemption=None) -> dict:
        return loop.train(self, self.cfg.run, self.cluster.rank, preemption)

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Top-1 over the whole validation set: each rank scores its shard, counts are summed."""
        self.plan.sync_buffers()
        self.model.eval()
        stats = torch.zeros(3, dtype=torch.float64, device=self.device)
        for batch in self.val_loader:
            stats += self.plan.eval_batch(to_device(batch, self.device), self)
            watchdog.beat()
        loss_n, correct, n = self.reduce_sum(stats, [])
        metrics = {"val_loss": loss_n / max(1.0, n), "val_top1": correct / max(1.0, n), "val_samples": int(n)}
        if self.logger:
            self.logger.log(self.step, "eval", metrics)
        return metrics

    # ---- state ---------------------------------------------------------------------------------
    def state_dict(self) -> dict | None:
        """The whole checkpoint on rank 0 (None elsewhere); a collective under the pipeline plan."""
        return self.plan.state(self)

    def save(self) -> None:
        with watchdog.phase("checkpoint"):  # the other ranks wait in a collective meanwhile: not hung
            self.plan.sync_buffers()  # collective: every rank takes part, only rank 0 writes
            self.write_checkpoint(self.plan.state(self))

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
        """Rank 0 reads the newest good checkpoint (or --resume FILE); the plan hands its state to
        every rank (or, found nothing, makes every rank start from rank 0's initial weights)."""
        with watchdog.phase("resume"):
            found = None
            if self.cluster.rank == 0:
                self.remove_stale_temps()
                found = self.read_checkpoint()
            self.step = self.plan.restore(found, self)
            return self.step

    def read_checkpoint(self):
        """(path, state) of the checkpoint to resume from, or None (rank 0 only)."""
        mode = self.cfg.run.resume
        if mode == "never":
            return None
        read = lambda p: torch.load(p, map_location="cpu", weights_only=True)  # noqa: E731
        if mode == "auto":
            return self.checkpoints.load_latest(read)
        return Path(mode), self.checkpoints.load(Path(mode), read)

    def remove_stale_temps(self) -> None:
        removed = self.checkpoints.remove_stale_temps()
        if removed:
            self.log(f"removed {len(removed)} temp file(s) of an interrupted save: {', '.join(removed)}")

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
