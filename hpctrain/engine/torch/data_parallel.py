"""The data-parallel step plan: the whole model on every rank, combined over the ranks as the synchronization
strategy decides (engine/torch/sync: every gradient by the backend's own way — Horovod hooks, DDP buckets, one MPI
Allreduce — or local SGD, PowerSGD, ZeRO-1), or not at all for one process. The pipeline plan (pipeline/step.py)
has the same methods; the Trainer drives either."""
from __future__ import annotations

import time

import torch

from hpctrain.engine.torch.sync import make_sync
from hpctrain.engine.torch.util import to_device
from hpctrain.sync import Policy


class DataParallel:
    counts_samples = True  # every rank's samples are its own

    def __init__(self, backend, model, optimizer, accumulate: int, policy: Policy | None = None):
        self.backend = backend
        self.sync = make_sync(backend, policy or Policy())
        self.model, self.optimizer = self.sync.wrap(model, optimizer)
        self.serves = self.sync.serves  # a parameter server's server: no data, no evaluation
        self.counts_samples = not self.serves
        self.micro_batches = accumulate
        self.waited = 0.0  # seconds in sync.step since take_waited()
        self.scaler = None  # the trainer's AMP loss scaler, as of the last step (settle makes it equal on every rank)

    @property
    def traffic(self):
        return self.backend.traffic

    def whole_model(self):
        return self.backend.unwrap(self.model)

    def run(self, micro_batches, trainer) -> torch.Tensor:
        """Forward/backward over the micro-batches (no sync until the last), combine gradients, update.
        Returns the local [loss x samples, correct, samples]."""
        stats = torch.zeros(3, dtype=torch.float64, device=trainer.device)
        if self.serves:
            self.sync.step(self.model, self.optimizer, None, trainer.step)
            return stats
        self.optimizer.zero_grad()  # Horovod's override takes no set_to_none; torch defaults to it
        scaler = self.scaler = trainer.scaler
        self.sync.begin(trainer.step)
        n_micro = len(micro_batches)
        for i, batch in enumerate(micro_batches):
            batch = to_device(batch, trainer.device)
            with self.sync.accumulation(self.model, last=i == n_micro - 1):
                with trainer.autocast():
                    loss, batch_stats = trainer.task(self.model, batch)
                scaled = loss / n_micro  # mean over the whole accumulated batch
                (scaler.scale(scaled) if scaler else scaled).backward()
            stats += batch_stats
        started = time.perf_counter()
        self.sync.step(self.model, self.optimizer, scaler, trainer.step)  # where a rank waits for the others
        self.waited += time.perf_counter() - started
        return stats

    def take_waited(self) -> float:
        """Seconds in the gradient exchange since the last call (hpctrain.stragglers; on ddp the wait is inside the
        backward pass instead, so a straggler does not show there). NaN on a server: it has no compute of its own."""
        waited, self.waited = self.waited, 0.0
        return float("nan") if self.serves else waited

    def eval_batch(self, batch, trainer) -> torch.Tensor:
        with trainer.autocast():
            return trainer.task(self.model, batch)[1]

    def sync_buffers(self) -> None:
        """Every rank the same model before an evaluation or a save: the strategy settles what differs across ranks
        (local SGD: the weights and the optimizer state), else BatchNorm running statistics are averaged."""
        if self.sync.settle(self.model, self.optimizer, self.scaler):
            return
        for buf in self.whole_model().buffers():
            if buf.is_floating_point():
                buf.copy_(self.backend.allreduce(buf, "mean"))

    def state(self, trainer) -> dict | None:
        """The checkpoint, on rank 0 (None elsewhere): whole-model weights and optimizer state whatever the strategy,
        and what the strategy keeps itself ("sync"); a collective where the strategy gathers (ZeRO, PowerSGD)."""
        optimizer, sync = self.sync.optimizer_state(self.optimizer), self.sync.state()
        if trainer.cluster.rank != 0:
            return None
        return {"model": self.whole_model().state_dict(), "optimizer": optimizer,
                "scaler": trainer.scaler.state_dict() if trainer.scaler else None, "sync": sync,
                **trainer.checkpoint_meta()}

    def layout_mismatch(self, state: dict) -> str | None:
        return None  # any whole-model checkpoint loads here, pipelined or not

    def load_state(self, state: dict, trainer) -> None:
        """Rank 0 takes the checkpoint's weights, optimizer state and loss scale."""
        self.whole_model().load_state_dict(state["model"])
        if state.get("optimizer") is not None:
            self.sync.load_optimizer_state(self.optimizer, state["optimizer"])
        else:  # written by a pipelined run: its optimizer state is per stage
            trainer.log("note: checkpoint of a pipelined run: weights loaded, optimizer state starts fresh")
        if trainer.scaler and state.get("scaler"):
            trainer.scaler.load_state_dict(state["scaler"])
        self.sync.load_state(state.get("sync"), state.get("world_size"), trainer.log)

    def broadcast_state(self, trainer) -> None:
        """Every rank gets rank 0's weights, optimizer state and loss scale (resumed or freshly initialised), and its
        part of the strategy's state."""
        self.sync.broadcast(self.model, self.optimizer)
        if trainer.scaler is not None:  # fp16 loss scale: every rank must resume with rank 0's
            trainer.scaler.load_state_dict(self.backend.broadcast_object(
                trainer.scaler.state_dict() if trainer.cluster.rank == 0 else None))
