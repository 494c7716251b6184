"""HMTConfig: every hyper-parameter of the HMT wrapper, validated and saved as JSON."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from hiermem.errors import ConfigError
from hiermem.io import check_ints, dataclass_from_dict



@dataclass
class HMTConfig:
    """Hierarchical Memory Transformer configuration (notation of arXiv 2405.06067).

    segment_length: L, new tokens per segment.
    sensory_length: k, tokens of the previous segment repeated before the current one.
    summary_length: j, tokens read by the representation (summary) pass; default L // 2.
    summary_source: what the summary pass reads. "segment" (the paper): the first j tokens of the
        segment itself, which the segment's own first j - 1 positions predict, so recall sees
        tokens it is scored on and generation cannot condition as ``forward`` does. "previous"
        (causal): the last j tokens read before the segment; a segment's prompt depends on the
        past alone, so any split of a document into calls and token-by-token decoding give
        exactly the logits of one call. Checkpoints saved without the field read "segment".
    cache_size: N, memory embeddings kept for recall (paper: 300).
    recall_dim: h, size of the recall query/key projections; default = backbone hidden size.
    stage: 1 = RMT + sensory memory (recall off: P_n = m_{n-1}); 2 = full HMT.
    use_memory: False turns memory off entirely (segments + sensory tokens only).
    eviction: "fifo" or "attention" (evict the slot recall attended to least, EMA with eviction_decay).
    bptt_depth: gradients flow through at most this many segments of memory; None = unlimited.
    memory_projection: "none" (paper), "rmsnorm" or "linear" map from hidden state to memory embedding.
    segment_bos: prepend BOS to every backbone call; None = decided by the backbone: on with memory
        (P must not take the attention-sink position 0) or for Gemma, off for memory-less runs.
    summary_batch: summary passes batched together (they do not depend on memory).
    lora: LoRA adapters on the backbone, e.g. {"r": 8, "alpha": 16, "dropout": 0.0,
        "target_modules": ["q_proj", "v_proj"]}; None = backbone untouched.
    """

    backbone: str = "smollm2-135m"
    segment_length: int = 256
    sensory_length: int = 32
    summary_length: int | None = None
    summary_source: str = "previous"
    cache_size: int = 300
    recall_dim: int | None = None
    stage: int = 2
    use_memory: bool = True
    eviction: str = "fifo"
    eviction_decay: float = 0.9
    bptt_depth: int | None = None
    memory_projection: str = "none"
    segment_bos: bool | None = None
    summary_batch: int = 8
    lora: dict | None = None
    backbone_fingerprint: dict = field(default_factory=dict)
    model_type: str = "hmt"

    def __post_init__(self):
        self.validate()

    @property
    def summary_tokens(self) -> int:
        return self.summary_length if self.summary_length is not None else max(1, self.segment_length // 2)

    def validate(self) -> None:
        check_ints(self, ("segment_length", "cache_size", "summary_batch"))
        check_ints(self, ("summary_length", "recall_dim", "bptt_depth"), allow_none=True)
        if not isinstance(self.sensory_length, int) or self.sensory_length < 0:
            raise ConfigError(f"sensory_length must be an integer >= 0, got {self.sensory_length!r}")
        if self.sensory_length > self.segment_length:
            raise ConfigError(f"sensory_length ({self.sensory_length}) cannot exceed segment_length "
                              f"({self.segment_length}): it repeats tokens of the previous segment")
        if self.summary_tokens > self.segment_length:
            raise ConfigError(f"summary_length ({self.summary_tokens}) cannot exceed segment_length "
                              f"({self.segment_length})")
        if self.summary_source not in ("segment", "previous"):
            raise ConfigError(f"summary_source must be 'segment' (the paper) or 'previous' (causal), got "
                              f"{self.summary_source!r}")
        if self.stage not in (1, 2):
            raise ConfigError(f"stage must be 1 (RMT + sensory memory) or 2 (full HMT), got {self.stage!r}")
        if self.eviction not in ("fifo", "attention"):
            raise ConfigError(f"eviction must be 'fifo' or 'attention', got {self.eviction!r}")
        if not 0.0 <= self.eviction_decay < 1.0:
            raise ConfigError(f"eviction_decay must be in [0, 1), got {self.eviction_decay}")
        if self.memory_projection not in ("none", "rmsnorm", "linear"):
            raise ConfigError(f"memory_projection must be 'none', 'rmsnorm' or 'linear', got "
                              f"{self.memory_projection!r}")
        if self.lora is not None:
            if not isinstance(self.lora, dict) or int(self.lora.get("r", 0)) < 1:
                raise ConfigError(f"lora must be a dict with a positive 'r', got {self.lora!r}")
        if self.model_type != "hmt":
            raise ConfigError(f"HMTConfig got model_type {self.model_type!r}")

    def backbone_positions(self) -> int:
        """Longest sequence the memory-encoding pass feeds the backbone."""
        return int(bool(self.segment_bos)) + self.sensory_length + self.segment_length + 2

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "HMTConfig":
        """Build from JSON; missing fields take defaults, unknown fields are ignored with a warning.
        A config saved before ``summary_source`` existed summarised the segment itself."""
        return dataclass_from_dict(cls, {"summary_source": "segment", **data}, "HMT config")

    def replace(self, **changes) -> "HMTConfig":
        return dataclasses.replace(self, **changes)
