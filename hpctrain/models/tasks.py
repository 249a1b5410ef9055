"""Tasks of the torch models: what a batch means to the model. A task is any callable (model, batch) ->
(loss, stats), stats a float64 tensor [loss x count, correct, count] on the batch's device. BERT's MLM task
(models/bert.py) counts masked tokens."""
from __future__ import annotations

import torch
from torch import nn


class Classification:
    """The default task: batch = (inputs, labels); cross-entropy; accuracy = argmax == label."""

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
