"""HierarchosConfig: the hyper-parameters of the Hierarchos memory-reasoning LM."""

from __future__ import annotations

from dataclasses import dataclass

from hiermem.errors import ConfigError
from hiermem.io import check_ints
from hiermem.models.scratch_config import ScratchConfig

# fields that neither shape the state nor change what a carried state means: training-only
# weights and run-time knobs (a saved session stays readable when they are changed at load time)
RUNTIME_FIELDS = ("dropout", "n_ctx", "tokenizer", "ponder_loss_weight", "commitment_loss_weight",
                  "commitment_threshold", "ltm_lr", "ltm_momentum", "ltm_forget", "h_halt_thresh",
                  "l_conv_atol", "max_h_steps", "max_l_steps")


@dataclass
class HierarchosConfig(ScratchConfig):
    """Titans-style long-term memory + HRM manager/worker reasoning over RWKV-style cells.

    vocab_size: size of the tokenizer it is trained with (required).
    context_dim: C, token embedding / context width. persistent_dim: the learned persistent memory.
    ltm_slots, ltm_key_dim, ltm_val_dim: slots S of the long-term memory, their key and value widths.
    ltm_topk: slots read (and written) per token.
    ltm_lr: step size of the run-time (surprise) update of the memory values; ltm_momentum: its
        momentum; ltm_forget: share of the fast values forgotten per token; ltm_clamp: bound of the
        fast values (the momentum is bounded at 2.5x that).
    h_hidden, l_hidden: manager and worker cell widths. h_stride: the manager sets a goal every
        h_stride tokens. max_h_steps, h_halt_thresh: manager pondering (ACT) steps at most, and the
        halting probability at which it stops. max_l_steps, l_conv_atol: worker refinement steps at
        most, and the output change below which it stops.
    ponder_loss_weight, commitment_loss_weight: weights of the "ponder" and "commitment" auxiliary
        losses; commitment_threshold: drift^2 below this is not penalised.
    n_ctx: truncated-BPTT window in training (informational at inference).
    dropout: on embeddings and the output features (never inside the recurrence).
    tie_embeddings: the output head is the embedding matrix.
    bos/eos/pad_token_id, tokenizer: the tokenizer's special ids and name (informational).
    """

    vocab_size: int
    context_dim: int = 768
    persistent_dim: int = 128
    ltm_slots: int = 1024
    ltm_key_dim: int = 128
    ltm_val_dim: int = 128
    ltm_topk: int = 4
    ltm_lr: float = 0.01
    ltm_momentum: float = 0.9
    ltm_forget: float = 1e-4
    ltm_clamp: float = 20.0
    h_hidden: int = 768
    l_hidden: int = 768
    h_stride: int = 4
    max_h_steps: int = 5
    max_l_steps: int = 5
    l_conv_atol: float = 1e-4
    h_halt_thresh: float = 0.9
    ponder_loss_weight: float = 0.01
    commitment_loss_weight: float = 0.5
    commitment_threshold: float = 0.05
    n_ctx: int = 256
    dropout: float = 0.0
    tie_embeddings: bool = True
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    tokenizer: str | None = None
    model_type: str = "hierarchos"

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        check_ints(self, ("vocab_size", "context_dim", "persistent_dim", "ltm_slots", "ltm_key_dim", "ltm_val_dim",
                          "ltm_topk", "h_hidden", "l_hidden", "h_stride", "max_h_steps", "max_l_steps", "n_ctx"),
                   what="hierarchos ")
        self.check_common("hierarchos")
        if self.ltm_topk > self.ltm_slots:
            raise ConfigError(f"hierarchos ltm_topk ({self.ltm_topk}) cannot exceed ltm_slots ({self.ltm_slots})")
        ranges = {  # name: (low, high, low inclusive, high inclusive)
            "ltm_lr": (0.0, float("inf"), True, False), "ltm_momentum": (0.0, 1.0, True, False),
            "ltm_forget": (0.0, 1.0, True, False), "ltm_clamp": (0.0, float("inf"), False, False),
            "l_conv_atol": (0.0, float("inf"), True, False), "h_halt_thresh": (0.0, 1.0, False, True),
            "ponder_loss_weight": (0.0, float("inf"), True, False),
            "commitment_loss_weight": (0.0, float("inf"), True, False),
            "commitment_threshold": (0.0, float("inf"), True, False)}
        for name, (low, high, low_in, high_in) in ranges.items():
            v = getattr(self, name)
            ok = isinstance(v, (int, float)) and not isinstance(v, bool)
            ok = ok and (v >= low if low_in else v > low) and (v <= high if high_in else v < high)
            if not ok:
                bounds = f"{'[' if low_in else '('}{low:g}, {high:g}{']' if high_in else ')'}"
                raise ConfigError(f"hierarchos {name} must be a number in {bounds}, got {v!r}")
        if not isinstance(self.tie_embeddings, bool):
            raise ConfigError(f"hierarchos tie_embeddings must be true or false, got {self.tie_embeddings!r}")
