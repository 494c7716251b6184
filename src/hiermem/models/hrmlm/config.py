"""HRMLMConfig: the hyper-parameters of the hierarchical recurrent memory LM."""

from __future__ import annotations

from dataclasses import dataclass

from hiermem.errors import ConfigError
from hiermem.io import check_ints
from hiermem.models.scratch_config import ScratchConfig


@dataclass
class HRMLMConfig(ScratchConfig):
    """Two GRU levels per token: N high-level cycles, each of T low-level steps then one high step.

    vocab_size: size of the tokenizer it is trained with (required).
    n_embd: token embedding width; n_hidden: low-level (fast) state width; n_high_hidden:
        high-level (slow) state width. All three are independent.
    T: low-level steps per high-level cycle; N: high-level cycles per token.
    n_ctx: the truncated-BPTT window in training (informational at inference: the state carries
        any length).
    layer_norm: layer-normalised GRU cells (each gate's input and recurrent pre-activations).
    dropout: on embeddings and on the states fed to the output layer (training only; never inside
        the recurrence, so a carried state means the same in training and inference).
    tie_embeddings: the output matrix is the embedding matrix (needs n_high_hidden == n_embd).
    bos/eos/pad_token_id, tokenizer: the tokenizer's special ids and name (informational).
    """

    vocab_size: int
    n_embd: int = 256
    n_hidden: int = 512
    n_high_hidden: int = 256
    T: int = 3
    N: int = 2
    n_ctx: int = 256
    layer_norm: bool = True
    dropout: float = 0.0
    tie_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    tokenizer: str | None = None
    model_type: str = "hrmlm"

    def __post_init__(self):
        self.validate()

    @property
    def cell_steps(self) -> int:
        """GRU cell steps per token: N cycles of T low steps and one high step."""
        return self.N * (self.T + 1)

    def param_count(self) -> int:
        """Parameters of the model this config builds."""
        E, L, H, V = self.n_embd, self.n_hidden, self.n_high_hidden, self.vocab_size
        extra = 4 if self.layer_norm else 2  # per gate row: two LN gains and biases, or two biases

        def cell(inp: int, hid: int) -> int:
            return 3 * hid * (inp + hid) + extra * 3 * hid

        out = (0 if self.tie_embeddings else V * H) + V
        return V * E + cell(E + H, L) + cell(L, H) + out

    def validate(self) -> None:
        check_ints(self, ("vocab_size", "n_embd", "n_hidden", "n_high_hidden", "T", "N", "n_ctx"), what="hrmlm ")
        self.check_common("hrmlm")
        if not isinstance(self.layer_norm, bool) or not isinstance(self.tie_embeddings, bool):
            raise ConfigError("layer_norm and tie_embeddings must be true or false")
        if self.tie_embeddings and self.n_high_hidden != self.n_embd:
            raise ConfigError(f"tie_embeddings needs n_high_hidden == n_embd (the output layer reads the "
                              f"{self.n_high_hidden}-wide high-level state with the {self.n_embd}-wide embedding "
                              "matrix); set tie_embeddings: false or make the two widths equal")
