"""Torch helpers shared by the Trainer and the step plans: loaders, optimizer, batches to the device."""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from hpctrain import preempt
from hpctrain.errors import UserError


def to_device(batch, device: torch.device):
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return type(batch)(to_device(v, device) for v in batch)


def nonfinite(tensors: dict) -> str | None:
    """Names of the floating-point tensors holding NaN or inf (None when all are finite)."""
    bad = [k for k, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    return f"{len(bad)} tensor(s), e.g. {bad[0]}" if bad else None


def make_loader(source, sampler, workers: int, device: torch.device) -> torch.utils.data.DataLoader:
    # The sampler yields lists of (index, epoch) keys; workers decode/augment, the main process trains.
    # Workers ignore Slurm's SIGTERM (it reaches the whole process group): the trainer must live to save.
    return torch.utils.data.DataLoader(source, batch_sampler=sampler, num_workers=workers,
                                       worker_init_fn=preempt.worker_ignores_foreign_sigterm,
                                       pin_memory=device.type == "cuda", persistent_workers=workers > 0,
                                       prefetch_factor=4 if workers > 0 else None)


def batches(loader):
    """Iterate a DataLoader; a user error raised in a loader worker comes back as our own one-line message
    (torch re-raises it with the worker's whole traceback folded into the message)."""
    it = iter(loader)
    while True:
        try:
            batch = next(it)
        except StopIteration:
            return
        except UserError as e:
            raise type(e)(worker_message(str(e))) from None
        yield batch


def worker_message(text: str) -> str:
    """'Caught DataError in DataLoader worker process 0.\nOriginal Traceback ...\npkg.DataError: msg' -> 'msg'."""
    if not text.startswith("Caught ") or "Traceback" not in text:
        return text
    last = text.rstrip().splitlines()[-1]
    name, sep, message = last.partition(": ")
    return message if sep and " " not in name else last


def build_optimizer(model: nn.Module, cfg) -> torch.optim.Optimizer:
    # No weight decay on biases and BN parameters (standard for ResNet/BERT recipes).
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "sgd":  # config.py allows sgd and adamw only
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=False)
    return torch.optim.AdamW(groups, lr=cfg.lr)


def autocast_factory(amp: str, device: torch.device):
    """A no-argument callable giving the AMP context for --amp (bf16/fp16), or a null context."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    if dtype is None:
        return contextlib.nullcontext
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)
