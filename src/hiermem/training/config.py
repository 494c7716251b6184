"""TrainConfig: every hyper-parameter of one training run, validated and saved with each checkpoint."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from hiermem.errors import ConfigError
from hiermem.io import check_ints, dataclass_from_dict


SCHEDULES = ("constant", "cosine", "linear", "step")
SCHEDULE_BY = ("steps", "time")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
TRAINABLE = ("default", "memory", "lora", "full")


@dataclass
class TrainConfig:
    """Optimisation, checkpointing and logging settings of one trainer run.

    The defaults are those of HMT's recipe for the bundled backbone (memory parameters only).

    steps: optimizer steps (each one consumes ``grad_accum`` batches per process).
    batch_size: windows per batch and process; grad_accum: batches per optimizer step.
    lr, weight_decay, betas, eps: AdamW (fused where the device supports it).
    schedule: "constant", "cosine", "linear" or "step" (multiply by ``decay_gamma`` every
        ``decay_every`` steps), after ``warmup`` linear warm-up steps; cosine/linear end at
        ``min_lr_ratio * lr``.
    schedule_by: what the cosine/linear decay follows: "steps" (step / ``steps``) or "time" (training
        time spent / ``max_minutes``, accumulated across resumes, so the rate reaches its minimum
        when the budget is spent; warm-up still counts steps). Needs ``max_minutes``.
    clip: gradient-norm clipping (0 = off).
    precision: "fp32", "bf16" (autocast, CUDA or CPU), "fp16" (autocast + loss scaling, CUDA),
        "auto" (bf16 on CUDA when supported, else fp32).
    trainable: "default" (the model's own choice: HMT's memory, everything for from-scratch models),
        "memory" (HMT memory parameters), "lora" (memory + LoRA adapters) or "full".
    lr_scales: learning-rate multiplier per parameter group of the model (e.g. {"no_decay": 0.5}).
    max_minutes: stop once this much training time (validation excluded) has been spent: in this
        invocation with ``schedule_by`` "steps", in the whole run (all resumes) with "time".
    carry_state: carry the model's state, detached, from each batch to the next (contiguous-stream
        loaders; truncated BPTT across windows of the same document).
    gradient_checkpointing: recompute backbone activations in the backward pass.
    loss_skip_segments: leading segments of each window left out of the loss (memory warm-up).
    eval_every / eval_batches: validation period in steps (0 = only at the end) and batches per
        evaluation (None = one pass over the validation loader).
    patience: stop after this many evaluations without improvement (0 = never stop early).
    save_every / keep_last: checkpoint period in steps (0 = only at the end) and how many
        periodic checkpoints to keep (the best one is kept apart).
    max_nonfinite: consecutive non-finite steps (skipped) tolerated before the run stops.
    log_every: steps between log lines / TensorBoard points.
    """

    steps: int = 150
    batch_size: int = 1
    grad_accum: int = 1
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    schedule: str = "step"
    schedule_by: str = "steps"
    warmup: int = 10
    min_lr_ratio: float = 0.1
    decay_every: int = 50
    decay_gamma: float = 0.8
    clip: float = 1.0
    precision: str = "auto"
    trainable: str = "default"
    lr_scales: dict = field(default_factory=dict)
    carry_state: bool = False
    max_minutes: float | None = None
    gradient_checkpointing: bool = False
    loss_skip_segments: int = 0
    eval_every: int = 50
    eval_batches: int | None = 16
    patience: int = 0
    save_every: int = 25
    keep_last: int = 2
    max_nonfinite: int = 10
    log_every: int = 10
    seed: int = 0
    tensorboard: bool = True
    progress: bool = True
    wandb_project: str | None = None
    wandb_run_name: str | None = None

    def __post_init__(self):
        self.betas = tuple(self.betas)
        self.validate()

    def validate(self) -> None:
        check_ints(self, ("steps", "batch_size", "grad_accum", "decay_every", "keep_last", "max_nonfinite", "log_every"))
        check_ints(self, ("warmup", "eval_every", "save_every", "patience", "loss_skip_segments", "seed"), low=0)
        check_ints(self, ("eval_batches",), allow_none=True)
        if self.max_minutes is not None and not self.max_minutes > 0:
            raise ConfigError(f"max_minutes must be > 0 (or unset), got {self.max_minutes!r}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"lr must be a positive number, got {self.lr!r}")
        if self.weight_decay < 0 or self.clip < 0 or self.eps <= 0:
            raise ConfigError("weight_decay and clip must be >= 0 and eps > 0")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"betas must be two numbers in [0, 1), got {self.betas!r}")
        if not 0 <= self.min_lr_ratio <= 1 or not 0 < self.decay_gamma <= 1:
            raise ConfigError("min_lr_ratio must be in [0, 1] and decay_gamma in (0, 1]")
        if not isinstance(self.lr_scales, dict) or any(
                not isinstance(v, (int, float)) or v < 0 for v in self.lr_scales.values()):
            raise ConfigError(f"lr_scales must map parameter-group names to numbers >= 0, got {self.lr_scales!r}")
        for name, choices in (("schedule", SCHEDULES), ("schedule_by", SCHEDULE_BY), ("precision", PRECISIONS),
                              ("trainable", TRAINABLE)):
            if getattr(self, name) not in choices:
                raise ConfigError(f"{name} must be one of {', '.join(choices)}, got {getattr(self, name)!r}")
        if self.schedule_by == "time" and (self.max_minutes is None or self.schedule not in ("cosine", "linear")):
            raise ConfigError("schedule_by time decays the learning rate over the training-time budget: set "
                              f"max_minutes and schedule cosine or linear (got max_minutes={self.max_minutes!r}, "
                              f"schedule={self.schedule!r})")

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["betas"] = list(self.betas)
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        """Build from saved JSON; missing fields take defaults, unknown ones are ignored."""
        return dataclass_from_dict(cls, data, "training config")

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)
