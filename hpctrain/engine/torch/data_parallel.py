"""The data-parallel step plan: the whole model on every rank, gradients combined by the backend
(Horovod hooks, DDP buckets, or nothing for one process). The pipeline plan (pipeline/step.py)
has the same methods; the Trainer drives either."""
from __future__ import annotations

import torch

from hpctrain.engine.torch.util import to_device


class DataParallel:
    counts_samples = True  # every rank's samples are its own

    def __init__(self, backend, model, optimizer, accumulate: int):
        self.backend = backend
        self.model, self.optimizer = backend.wrap(model, optimizer)
        self.micro_batches = accumulate

    def whole_model(self):
        return self.backend.unwrap(self.model)

    def run(self, micro_batches, trainer) -> torch.Tensor:
        """Forward/backward over the micro-batches (no sync until the last), combine gradients, update.
        Returns the local [loss x samples, correct, samples]."""
        self.optimizer.zero_grad()  # Horovod's override takes no set_to_none; torch defaults to it
        scaler = trainer.scaler
        stats = torch.zeros(3, dtype=torch.float64, device=trainer.device)
        n_micro = len(micro_batches)
        for i, batch in enumerate(micro_batches):
            batch = to_device(batch, trainer.device)
            with self.backend.accumulation(self.model, last=i == n_micro - 1):
                with trainer.autocast():
                    loss, batch_stats = trainer.task(self.model, batch)
                scaled = loss / n_micro  # mean over the whole accumulated batch
                (scaler.scale(scaled) if scaler else scaled).backward()
            stats += batch_stats
        self.backend.step(self.optimizer, scaler)
        return stats

    def eval_batch(self, batch, trainer) -> torch.Tensor:
        with trainer.autocast():
            return trainer.task(self.model, batch)[1]

    def sync_buffers(self) -> None:
        """Average BatchNorm running statistics so every rank evaluates and saves the same model."""
        for buf in self.whole_model().buffers():
            if buf.is_floating_point():
                buf.copy_(self.backend.allreduce(buf, "mean"))

    def state(self, trainer) -> dict | None:
        """The checkpoint, on rank 0 (None elsewhere); no collective."""
        if trainer.cluster.rank != 0:
            return None
        return {"model": self.whole_model().state_dict(), "optimizer": self.optimizer.state_dict(),
                "scaler": trainer.scaler.state_dict() if trainer.scaler else None, **trainer.checkpoint_meta()}

    def layout_mismatch(self, state: dict) -> str | None:
        return None  # any whole-model checkpoint loads here, pipelined or not

    def load_state(self, state: dict, trainer) -> None:
        """Rank 0 takes the checkpoint's weights, optimizer state and loss scale."""
        self.whole_model().load_state_dict(state["model"])
        if state.get("optimizer") is not None:
            self.optimizer.load_state_dict(state["optimizer"])
        else:  # written by a pipelined run: its optimizer state is per stage
            trainer.log("note: checkpoint of a pipelined run: weights loaded, optimizer state starts fresh")
        if trainer.scaler and state.get("scaler"):
            trainer.scaler.load_state_dict(state["scaler"])

    def broadcast_state(self, trainer) -> None:
        """Every rank gets rank 0's weights, optimizer state and loss scale (resumed or freshly initialised)."""
        self.backend.broadcast_state(self.model, self.optimizer)
        if trainer.scaler is not None:  # fp16 loss scale: every rank must resume with rank 0's
            trainer.scaler.load_state_dict(self.backend.broadcast_object(
                trainer.scaler.state_dict() if trainer.cluster.rank == 0 else None))
