"""Learning-rate schedules: linear warm-up, then constant, cosine, linear or step decay.

A schedule is a pure function of the step, so its whole state is the step counter saved with
every checkpoint, and a resumed run sets exactly the learning rates of an uninterrupted one.
"""

from __future__ import annotations

import math

from hiermem.training.config import TrainConfig


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of ``cfg.lr`` for optimizer step ``step`` (0-based)."""
    if cfg.warmup and step < cfg.warmup:
        return (step + 1) / (cfg.warmup + 1)
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "step":
        return cfg.decay_gamma ** ((step - cfg.warmup) // cfg.decay_every)
    span = max(1, cfg.steps - cfg.warmup - 1)
    progress = min(1.0, (step - cfg.warmup) / span)
    if cfg.schedule == "linear":
        shape = 1.0 - progress
    else:  # cosine
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * shape


def set_lr(optimizer, step: int, cfg: TrainConfig) -> float:
    """Set every parameter group's learning rate for ``step`` (times the group's ``lr_scale``);
    return the base rate."""
    lr = cfg.lr * lr_factor(step, cfg)
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    return lr
