"""TransformerConfig: the hyper-parameters of the from-scratch Llama-style control model."""

from __future__ import annotations

from dataclasses import dataclass

from hiermem.errors import ConfigError
from hiermem.io import check_ints
from hiermem.models.scratch_config import ScratchConfig


@dataclass
class TransformerConfig(ScratchConfig):
    """A small Llama-style decoder (RMSNorm, RoPE, SwiGLU, grouped-query attention) trained from scratch.

    vocab_size: size of the tokenizer it is trained with (required).
    hidden_size, num_layers, num_heads: width, depth, attention heads (hidden_size % num_heads == 0).
    num_kv_heads: key/value heads (grouped-query attention); None = num_heads.
    intermediate_size: SwiGLU width; None = 8/3 * hidden_size rounded up to a multiple of 64.
    context_length: C, the attention window (tokens one pass attends over; RoPE positions 0..C-1).
    stride: S, new tokens per pass when reading beyond the window (each later pass re-reads the
        last C - S tokens as context); None = C // 2. S = C: disjoint windows, no overlap.
    rope_theta: RoPE base. dropout: attention-probability dropout (training only).
    tie_embeddings: the output head shares the input embedding matrix.
    bos/eos/pad_token_id: the tokenizer's special ids (informational; pad is not a padding_idx).
    tokenizer: path or name of the tokenizer it was trained with (informational).
    init_std: standard deviation of the normal initialisation of every matrix.
    """

    vocab_size: int
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int | None = None
    intermediate_size: int | None = None
    context_length: int = 512
    stride: int | None = None
    rope_theta: float = 10000.0
    dropout: float = 0.0
    tie_embeddings: bool = True
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    tokenizer: str | None = None
    init_std: float = 0.02
    model_type: str = "transformer"

    def __post_init__(self):
        self.validate()

    # --- derived values ---------------------------------------------------------------------
    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads if self.num_kv_heads is not None else self.num_heads

    @property
    def ffn_size(self) -> int:
        if self.intermediate_size is not None:
            return self.intermediate_size
        return -(-8 * self.hidden_size // (3 * 64)) * 64  # ceil(8/3 * hidden / 64) * 64

    @property
    def stride_tokens(self) -> int:
        return self.stride if self.stride is not None else max(1, self.context_length // 2)

    @property
    def overlap(self) -> int:
        """C - S: tokens of context every pass after the first re-reads (and the state keeps)."""
        return self.context_length - self.stride_tokens

    def param_count(self, include_embeddings: bool = True) -> int:
        """Parameters of the model this config builds (tied embeddings counted once)."""
        d, f, v = self.hidden_size, self.ffn_size, self.vocab_size
        head_dim = d // self.num_heads
        attn = d * d * 2 + 2 * d * self.kv_heads * head_dim  # q, o and k, v projections
        layer = attn + 3 * d * f + 2 * d  # SwiGLU (gate, up, down) and two RMSNorms
        body = self.num_layers * layer + d  # final norm
        emb = v * d * (1 if self.tie_embeddings else 2)
        return body + (emb if include_embeddings else 0)

    # --- validation -------------------------------------------------------------------------
    def validate(self) -> None:
        check_ints(self, ("vocab_size", "hidden_size", "num_layers", "num_heads", "context_length"), what="transformer ")
        self.check_common("transformer")
        check_ints(self, ("num_kv_heads", "intermediate_size", "stride"), allow_none=True, what="transformer ")
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}; "
                              f"use a hidden_size that is a multiple of num_heads (e.g. "
                              f"{-(-self.hidden_size // self.num_heads) * self.num_heads})")
        if (self.hidden_size // self.num_heads) % 2:
            raise ConfigError(f"the head size hidden_size / num_heads = {self.hidden_size // self.num_heads} must "
                              "be even (rotary embeddings rotate pairs of dimensions)")
        if self.num_heads % self.kv_heads:
            raise ConfigError(f"num_heads {self.num_heads} is not divisible by num_kv_heads {self.kv_heads}; "
                              "every key/value head must serve the same number of query heads")
        if not 1 <= self.stride_tokens <= self.context_length:
            raise ConfigError(f"stride {self.stride_tokens} must be in [1, context_length={self.context_length}] "
                              "(new tokens per pass beyond the window)")
        if not (isinstance(self.rope_theta, (int, float)) and self.rope_theta > 0):
            raise ConfigError(f"rope_theta must be > 0, got {self.rope_theta!r}")
        if not (isinstance(self.init_std, (int, float)) and self.init_std > 0):
            raise ConfigError(f"init_std must be > 0, got {self.init_std!r}")
