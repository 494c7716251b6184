"""What the configs of models trained from scratch share: serialisation, the tokenizer's special
ids (checked against the vocabulary) and the checks every such config makes."""

from __future__ import annotations

import dataclasses

from hiermem.errors import ConfigError
from hiermem.io import dataclass_from_dict


class ScratchConfig:
    """Mixin for the config dataclass of a from-scratch model (fields ``model_type``,
    ``vocab_size``, ``dropout``, ``bos/eos/pad_token_id``)."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict):
        """Build from JSON; missing fields take defaults, unknown fields are ignored with a warning."""
        name = cls.__dataclass_fields__["model_type"].default
        if "vocab_size" not in data:
            raise ConfigError(f"{name} config needs vocab_size (the size of its tokenizer's vocabulary)")
        return dataclass_from_dict(cls, data, f"{name} config")

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)

    def check_common(self, model_type: str) -> None:
        """The model type, dropout in [0, 1) and special ids inside the vocabulary."""
        if self.model_type != model_type:
            raise ConfigError(f"{type(self).__name__} got model_type {self.model_type!r}")
        if not (isinstance(self.dropout, (int, float)) and 0.0 <= self.dropout < 1.0):
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout!r}")
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < self.vocab_size):
                raise ConfigError(f"{name} {v!r} must be an id in [0, vocab_size={self.vocab_size}) or None")
