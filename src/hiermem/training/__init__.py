"""One trainer for every hiermem model, and the training recipes built on it (HMT's two stages)."""

from hiermem.training.config import TrainConfig
from hiermem.training.trainer import Trainer, TrainingError, TrainResult, make_accelerator, select_trainable

__all__ = ["TrainConfig", "Trainer", "TrainResult", "TrainingError", "make_accelerator", "select_trainable"]
