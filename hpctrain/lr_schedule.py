"""Learning-rate schedule as a pure function of the step: framework-neutral and trivially resumable."""
from __future__ import annotations

import math

from hpctrain.choices import LR_SCALINGS


def scaled_lr(base_lr: float, world_size: int, scaling: str) -> float:
    """linear (Goyal et al., SGD): with k times the global batch, k times the learning rate; sqrt (the rule
    for Adam-type optimizers, e.g. Hoffer et al. 2017, You et al. 2020): sqrt(k) times; none: unchanged."""
    if scaling not in LR_SCALINGS:
        raise ValueError(f"lr scaling {scaling!r} is not one of: {', '.join(LR_SCALINGS)}")
    return base_lr * {"linear": world_size, "sqrt": world_size ** 0.5, "none": 1}[scaling]


def lr_at(step: int, *, base_lr: float, peak_lr: float, warmup_steps: int, total_steps: int,
          schedule: str) -> float:
    """Linear warm-up from base_lr (0 for a warm-up from zero) to peak_lr, then cosine / step (x0.1 at 1/2 and
    3/4) / constant / poly."""
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr + (peak_lr - base_lr) * step / warmup_steps
    if schedule == "constant" or total_steps <= warmup_steps:
        return peak_lr
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if schedule == "cosine":
        return peak_lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "step":
        return peak_lr * (0.1 ** (int(progress >= 0.5) + int(progress >= 0.75)))
    if schedule == "poly":
        return peak_lr * (1.0 - progress)  # BERT: polynomial (power 1, i.e. linear) decay to 0 at the last step
    raise ValueError(f"schedule {schedule!r} is not one of: cosine, step, constant, poly")
