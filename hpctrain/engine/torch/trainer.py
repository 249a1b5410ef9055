"""The torch engine's Trainer: the engine contract (hpctrain.engine.trainer) over a step plan (data-parallel
or pipeline). The shared part is TrainerBase's; this adds the torch parts: loaders, AMP, torch.save/load. The
plan (data_parallel.py, pipeline/step.py) owns the model: how a step runs, how buffers are synced and how state
is collected, loaded and broadcast."""
from __future__ import annotations

import itertools

import torch
from torch import nn

from hpctrain import watchdog
from hpctrain.checkpoint import tensor_mismatch
from hpctrain.engine.torch.data_parallel import DataParallel
from hpctrain.engine.torch.sync.zero import state_bytes
from hpctrain.engine.torch.util import autocast_factory, batches, nonfinite, to_device
from hpctrain.engine.trainer import Job, TrainerBase
from hpctrain.models.tasks import Classification
from hpctrain.sync import Policy


class Trainer(TrainerBase):
    """`Trainer(model, optimizer, loaders, runtime, cfg, task)` trains data-parallel; pipeline runs
    pass `plan=` (a PipelinePlan) instead of a model and optimizer."""
    checkpoint_suffix = ".pt"

    def __init__(self, model: nn.Module | None, optimizer: torch.optim.Optimizer | None, train_loader, val_loader,
                 runtime, cfg, task=None, plan=None, job: Job | None = None):
        self.plan = plan or DataParallel(runtime.backend, model.to(runtime.device), optimizer, cfg.dist.accumulate,
                                         Policy.of(cfg))
        super().__init__(runtime, cfg, train_loader.batch_sampler, self.plan.micro_batches, self.plan.counts_samples,
                         val_loader is not None, job)
        self.traffic = getattr(self.plan, "traffic", None)  # the pipeline plan's stage traffic is not counted
        if isinstance(self.plan, DataParallel) and self.device.type == "cpu":
            # the loop's straggler watch (hpctrain.stragglers); on GPUs the exchange also waits for the kernels
            self.wait_seconds = self.plan.take_waited
        if isinstance(self.plan, DataParallel):
            self.optimizer_state_bytes = lambda: state_bytes(self.optimizer)
        self.task = task or Classification(cfg.optim.label_smoothing)
        self.train_loader, self.val_loader = train_loader, val_loader
        self.autocast = autocast_factory(cfg.dist.amp, self.device)
        # fp16 gradients underflow without loss scaling; bf16 has fp32's range and needs none.
        self.scaler = torch.amp.GradScaler("cuda") if cfg.dist.amp == "fp16" else None

    @property
    def model(self) -> nn.Module:
        return self.plan.model  # what runs on this rank (wrapped by the backend, or this rank's stage)

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.plan.optimizer

    def whole_model(self) -> nn.Module:
        """The plain model (all stages' weights on rank 0 after a pipeline save) for exports."""
        return self.plan.whole_model()

    # ---- the loop's engine protocol (hpctrain.loop.Engine) -------------------------------------------
    def epoch_batches(self, epoch: int, skip_batches: int):
        if getattr(self.plan, "serves", False):
            return itertools.repeat(None)  # a parameter server's server reads no data
        self.sampler.set_epoch(epoch, skip_batches=skip_batches)
        return batches(self.train_loader)

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

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Top-1 over the whole validation set: each rank scores its shard, counts are summed."""
        self.plan.sync_buffers()
        self.model.eval()
        stats = torch.zeros(3, dtype=torch.float64, device=self.device)
        for batch in () if getattr(self.plan, "serves", False) else batches(self.val_loader):
            stats += self.plan.eval_batch(to_device(batch, self.device), self)
            watchdog.beat()
        return self.finish_evaluation(stats)

    # ---- state (TrainerBase's checkpoint hooks) ----------------------------------------------------
    def sync_buffers(self) -> None:
        self.plan.sync_buffers()

    def state(self) -> dict | None:
        """The whole checkpoint on rank 0 (None elsewhere); a collective under the pipeline plan."""
        return self.plan.state(self)

    def load_state(self, state: dict) -> None:
        self.plan.load_state(state, self)

    def broadcast_state(self) -> None:
        self.plan.broadcast_state(self)

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.whole_model().parameters())

    @staticmethod
    def write_state(state: dict, f) -> None:
        torch.save(state, f)

    @staticmethod
    def read_state(path) -> dict:
        return torch.load(path, map_location="cpu", weights_only=True)

    @staticmethod
    def nonfinite(state: dict) -> str | None:
        return nonfinite(state["model"])

    def shape_mismatch(self, state: dict) -> str | None:
        theirs = state.get("model")
        if not isinstance(theirs, dict):
            return "it holds no model state"
        return self.plan.layout_mismatch(state) or tensor_mismatch({k: tuple(v.shape) for k, v in theirs.items()},
                               {k: tuple(v.shape) for k, v in self.whole_model().state_dict().items()})

