"""Learning-rate schedules: linear warm-up, then constant, cosine, linear or step decay.

A schedule is a pure function of the step (and, with ``schedule_by: time``, of the training time
spent), both saved with every checkpoint, so a resumed run continues from the same point: with
steps it sets exactly the learning rates of an uninterrupted run; with time it continues the decay
from the time already spent.
"""

from __future__ import annotations

import math

from hiermem.training.config import TrainConfig


def progress(step: int, cfg: TrainConfig, seconds: float = 0.0) -> float:
    """Share of the decay done, in [0, 1]: after warm-up, steps over ``steps`` or (``schedule_by``
    "time") ``seconds`` of training over the ``max_minutes`` budget."""
    if cfg.schedule_by == "time":
        return min(1.0, max(0.0, seconds / (60.0 * cfg.max_minutes)))
    span = max(1, cfg.steps - cfg.warmup - 1)
    return min(1.0, (step - cfg.warmup) / span)


def lr_factor(step: int, cfg: TrainConfig, seconds: float = 0.0) -> float:
    """Multiplier of ``cfg.lr`` for optimizer step ``step`` (0-based) after ``seconds`` of training."""
    if cfg.warmup and step < cfg.warmup:
        return (step + 1) / (cfg.warmup + 1)
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "step":
        return cfg.decay_gamma ** ((step - cfg.warmup) // cfg.decay_every)
    done = progress(step, cfg, seconds)
    if cfg.schedule == "linear":
        shape = 1.0 - done
    else:  # cosine
        shape = 0.5 * (1.0 + math.cos(math.pi * done))
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * shape


def set_lr(optimizer, step: int, cfg: TrainConfig, seconds: float = 0.0) -> float:
    """Set every parameter group's learning rate for ``step`` (times the group's ``lr_scale``);
    return the base rate."""
    lr = cfg.lr * lr_factor(step, cfg, seconds)
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    return lr
