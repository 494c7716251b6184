"""HMSTConfig: the hyper-parameters of the HMST decoder (windowed attention, MoE FFN, episodic SSM)
and its size presets."""

from __future__ import annotations

from dataclasses import dataclass

from hiermem.errors import ConfigError
from hiermem.io import check_ints
from hiermem.models.scratch_config import ScratchConfig

# Size presets (model fields; the bundled hmst-<name>.yaml recipes hold the same values). The
# stated sizes hold with the recipes' vocabularies: 4096 tokens for micro, 32000 for the others.
PRESETS: dict[str, dict] = {
    "micro": dict(hidden_size=256, num_layers=4, num_heads=4, attention_window=64, num_experts=8, top_k=2,
                  intermediate_size=288, ssm_every=2, ssm_state_size=16, ssm_expand=2, ssm_head_dim=64),
    "tiny": dict(hidden_size=512, num_layers=8, num_heads=8, attention_window=512, num_experts=8, top_k=2,
                 intermediate_size=704, ssm_every=2, ssm_state_size=16, ssm_expand=2, ssm_head_dim=64),
    "small": dict(hidden_size=1536, num_layers=16, num_heads=12, num_kv_heads=4, attention_window=2048,
                  num_experts=8, top_k=2, intermediate_size=1408, ssm_every=4, ssm_state_size=64, ssm_expand=2,
                  ssm_head_dim=64),
    "base": dict(hidden_size=3072, num_layers=32, num_heads=24, num_kv_heads=8, attention_window=8192,
                 num_experts=8, top_k=2, intermediate_size=4480, ssm_every=4, ssm_state_size=128, ssm_expand=2,
                 ssm_head_dim=64),
}
PRESET_VOCAB = {"micro": 4096, "tiny": 32000, "small": 32000, "base": 32000}


@dataclass
class HMSTConfig(ScratchConfig):
    """A pre-norm decoder: per layer windowed causal attention, an optional episodic SSM, and a
    mixture-of-experts SwiGLU FFN.

    vocab_size: size of the tokenizer it is trained with (required).
    hidden_size, num_layers, num_heads: width, depth, attention heads (hidden_size % num_heads == 0,
        even head size). num_kv_heads: key/value heads (grouped-query attention); None = num_heads.
    attention_window: W, tokens each position attends to (itself and the W - 1 before it); the state
        keeps the last W - 1 keys and values of every layer.
    num_experts, top_k: SwiGLU experts per layer and experts per token (gates renormalised over the
        top k). intermediate_size: width of each expert; None = 8/3 * hidden_size rounded up to 64.
    balance_loss_weight, router_z_loss_weight: weights of the auxiliary losses "balance"
        (Switch-style, num_experts * sum_e f_e P_e; 1.0 when balanced) and "router_z" (mean squared
        log-sum-exp of the router logits), both averaged over layers.
    ssm_every: an episodic SSM block sits in every layer i with (i + 1) % ssm_every == 0 (0 = none).
    ssm_state_size (N), ssm_expand (inner width = expand * hidden_size), ssm_head_dim (P; inner
        width % P == 0), ssm_conv (causal depthwise convolution width, 1 = none): the selective
        state-space layer (input-dependent step, B and C; one decay per head).
    ssm_chunk: chunk length of the parallel scan (speed only; results do not depend on it).
    ssm_drop: training only: the probability that a forward call runs with its SSM blocks skipped
        (the episodic-access gate closed), so the model also works with the gate closed.
    early_exit_layer: k in [1, num_layers): the early-exit head reads the hidden state after k layers
        (the final norm and head); early_exit_loss_weight > 0 (needs it) adds its LM loss as the
        auxiliary loss "early_exit" when labels are given.
    expert_bias: every MoE layer holds a learned router bias (E,), zero at initialisation, that the
        expert-bias gate (``HMST.forward(expert_bias=True)``) adds to its router logits. Checkpoints
        saved without it load into a model built with it as zero biases; without it the gate is a no-op.
    rope_theta: RoPE base. dropout: attention-probability dropout (training only).
    tie_embeddings: the output head shares the input embedding matrix. init_std: matrix init.
    bos/eos/pad_token_id, tokenizer: the tokenizer's special ids and name (informational).
    """

    vocab_size: int
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int | None = None
    attention_window: int = 64
    num_experts: int = 8
    top_k: int = 2
    intermediate_size: int | None = None
    balance_loss_weight: float = 0.01
    router_z_loss_weight: float = 0.001
    ssm_every: int = 2
    ssm_state_size: int = 16
    ssm_expand: int = 2
    ssm_head_dim: int = 64
    ssm_conv: int = 4
    ssm_chunk: int = 32
    ssm_drop: float = 0.0
    early_exit_layer: int | None = None
    early_exit_loss_weight: float = 0.0
    expert_bias: bool = False
    rope_theta: float = 10000.0
    dropout: float = 0.0
    tie_embeddings: bool = True
    init_std: float = 0.02
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    tokenizer: str | None = None
    model_type: str = "hmst"

    def __post_init__(self):
        self.validate()

    @classmethod
    def preset(cls, name: str, vocab_size: int | None = None, **changes) -> "HMSTConfig":
        """The config of size preset ``name`` (micro, tiny, small, base) with the recipe's vocabulary."""
        if name not in PRESETS:
            raise ConfigError(f"unknown HMST preset {name!r}; known: {', '.join(PRESETS)}")
        return cls(vocab_size=vocab_size or PRESET_VOCAB[name], **{**PRESETS[name], **changes})

    # --- derived values ---------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads if self.num_kv_heads is not None else self.num_heads

    @property
    def ffn_size(self) -> int:
        if self.intermediate_size is not None:
            return self.intermediate_size
        return -(-8 * self.hidden_size // (3 * 64)) * 64

    @property
    def ssm_layers(self) -> list[int]:
        """Indices of the layers holding an episodic SSM block."""
        return [] if self.ssm_every == 0 else [i for i in range(self.num_layers) if (i + 1) % self.ssm_every == 0]

    @property
    def ssm_inner(self) -> int:
        return self.ssm_expand * self.hidden_size

    @property
    def ssm_heads(self) -> int:
        return self.ssm_inner // self.ssm_head_dim

    @property
    def ssm_conv_channels(self) -> int:
        """Channels of the convolution: the SSM input x and its B and C."""
        return self.ssm_inner + 2 * self.ssm_state_size

    def param_count(self, active: bool = False) -> int:
        """Parameters of the model this config builds; ``active``: those one token uses (top_k experts)."""
        d, f, V = self.hidden_size, self.ffn_size, self.vocab_size
        attn = d * self.num_heads * self.head_dim * 2 + 2 * d * self.kv_heads * self.head_dim
        experts = (self.top_k if active else self.num_experts) * 3 * d * f
        layer = attn + (d + int(self.expert_bias)) * self.num_experts + experts + 2 * d  # + router, biases, norms
        Di, N, Hs, C = self.ssm_inner, self.ssm_state_size, self.ssm_heads, self.ssm_conv_channels
        ssm = d * (2 * Di + 2 * N + Hs) + C * (self.ssm_conv + 1) + 3 * Hs + Di * d + d
        emb = V * d * (1 if self.tie_embeddings else 2)
        return self.num_layers * layer + len(self.ssm_layers) * ssm + d + emb

    def macs_per_token(self, layers: int | None = None, ssm_blocks: int | None = None) -> int:
        """Multiply-adds per token of the matmuls of a forward call that runs ``layers`` layers fully
        (None: all) and ``ssm_blocks`` SSM blocks (None: those of the layers run): per layer run the
        attention projections, attention over a full window of W keys, the router and top_k experts;
        per skipped layer the key and value projections that keep its window; per SSM block its
        projections, convolution and scan; and the head."""
        L = self.num_layers if layers is None else layers
        S = sum(i < L for i in self.ssm_layers) if ssm_blocks is None else ssm_blocks
        d, hd, H = self.hidden_size, self.head_dim, self.num_heads
        kv = 2 * d * self.kv_heads * hd
        attn = 2 * d * H * hd + kv + 2 * H * hd * self.attention_window  # q, o; k, v; scores and mix
        moe = d * self.num_experts + self.top_k * 3 * d * self.ffn_size
        Di, N = self.ssm_inner, self.ssm_state_size
        ssm = d * (2 * Di + 2 * N + self.ssm_heads) + self.ssm_conv_channels * self.ssm_conv + 2 * Di * N + Di * d
        return L * (attn + moe) + (self.num_layers - L) * kv + S * ssm + d * self.vocab_size

    # --- validation -------------------------------------------------------------------------
    def validate(self) -> None:
        check_ints(self, ("vocab_size", "hidden_size", "num_layers", "num_heads", "attention_window", "num_experts",
                          "top_k", "ssm_state_size", "ssm_expand", "ssm_head_dim", "ssm_conv", "ssm_chunk"),
                   what="hmst ")
        check_ints(self, ("ssm_every",), low=0, what="hmst ")
        check_ints(self, ("num_kv_heads", "intermediate_size", "early_exit_layer"), allow_none=True, what="hmst ")
        self.check_common("hmst")
        if self.hidden_size % self.num_heads or self.head_dim % 2:
            raise ConfigError(f"hidden_size {self.hidden_size} / num_heads {self.num_heads} must be an even integer "
                              "(the head size; rotary embeddings rotate pairs of dimensions)")
        if self.num_heads % self.kv_heads:
            raise ConfigError(f"num_heads {self.num_heads} is not divisible by num_kv_heads {self.kv_heads}")
        if self.top_k > self.num_experts:
            raise ConfigError(f"top_k {self.top_k} must be <= num_experts {self.num_experts}")
        if self.ssm_inner % self.ssm_head_dim:
            raise ConfigError(f"ssm_head_dim {self.ssm_head_dim} must divide the SSM inner width ssm_expand * "
                              f"hidden_size = {self.ssm_inner}")
        for name in ("balance_loss_weight", "router_z_loss_weight", "early_exit_loss_weight"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0):
                raise ConfigError(f"{name} must be a number >= 0, got {v!r}")
        if not (isinstance(self.ssm_drop, (int, float)) and not isinstance(self.ssm_drop, bool)
                and 0.0 <= self.ssm_drop <= 1.0):
            raise ConfigError(f"ssm_drop must be a probability in [0, 1], got {self.ssm_drop!r}")
        if self.early_exit_layer is not None and self.early_exit_layer >= self.num_layers:
            raise ConfigError(f"early_exit_layer {self.early_exit_layer} must be below num_layers "
                              f"{self.num_layers} (the head reads the hidden state after that many layers)")
        if self.early_exit_loss_weight > 0 and self.early_exit_layer is None:
            raise ConfigError("early_exit_loss_weight > 0 needs early_exit_layer (the layer the early-exit "
                              "head reads)")
        for name in ("rope_theta", "init_std"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0):
                raise ConfigError(f"{name} must be > 0, got {v!r}")
        for name in ("tie_embeddings", "expert_bias"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")
