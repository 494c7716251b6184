"""Transformer — the Llama-style model trained from scratch that every from-scratch family is compared with."""

from hiermem.models.transformer.config import TransformerConfig
from hiermem.models.transformer.model import Transformer, TransformerDecoder, TransformerState

__all__ = ["Transformer", "TransformerConfig", "TransformerDecoder", "TransformerState"]
