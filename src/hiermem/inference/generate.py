"""Token generation over any hiermem model's incremental decoder (memory carries past segments)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from hiermem.errors import ConfigError


@dataclass
class GenerationConfig:
    """Decoding settings. ``do_sample=False`` is greedy."""

    max_new_tokens: int = 64
    min_new_tokens: int = 0
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    eos_token_id: int | list[int] | None = None
    stop_strings: list[str] = field(default_factory=list)

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ConfigError("min_new_tokens must be between 0 and max_new_tokens")
        if self.temperature <= 0:
            raise ConfigError(f"temperature must be > 0 (use do_sample=False for greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ConfigError(f"top_k must be >= 0, got {self.top_k}")
        if self.repetition_penalty <= 0:
            raise ConfigError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")

    @property
    def eos_ids(self) -> set[int]:
        if self.eos_token_id is None:
            return set()
        return {self.eos_token_id} if isinstance(self.eos_token_id, int) else set(self.eos_token_id)


@dataclass
class GenerationOutput:
    tokens: torch.Tensor  # (B, n) generated ids (prompt excluded)
    decoder: object  # the decoder, holding the memory after prompt + output
    finish_reason: str  # "length", "eos" or "stop"


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL-style penalty on logits (B, V) of every token id in ``seen`` (B, n)."""
    if penalty == 1.0 or seen.shape[1] == 0:
        return logits
    picked = logits.gather(1, seen)
    picked = torch.where(picked > 0, picked / penalty, picked * penalty)
    return logits.scatter(1, seen, picked)


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Mask logits (B, V) outside the top-k and the top-p nucleus with -inf."""
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= top_p  # keep the token that crosses top_p
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return logits


def next_token(logits: torch.Tensor, cfg: GenerationConfig, history: torch.Tensor,
               generator: torch.Generator | None, allow_eos: bool) -> torch.Tensor:
    """Pick the next token (B,) from logits (B, V)."""
    logits = apply_repetition_penalty(logits.float(), history, cfg.repetition_penalty)
    if not allow_eos and cfg.eos_ids:
        logits[:, list(cfg.eos_ids)] = float("-inf")
    if not cfg.do_sample:
        return logits.argmax(-1)
    probs = filter_logits(logits / cfg.temperature, cfg.top_k, cfg.top_p).softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def make_decoder(model, batch_size: int = 1, memory=None):
    from hiermem.models import model_classes

    _, _, decoder_cls = model_classes(model.config.model_type)
    return decoder_cls(model, memory=memory, batch_size=batch_size)


@torch.no_grad()
def generate(model, prompt_ids: torch.Tensor, cfg: GenerationConfig | None = None, decoder=None,
             on_token: Callable[[torch.Tensor], None] | None = None,
             decode: Callable[[list[int]], str] | None = None) -> GenerationOutput:
    """Read ``prompt_ids`` (B, T) through memory, then generate up to ``max_new_tokens``.

    ``decoder``: an existing decoder to continue (its memory is kept); ``on_token`` is called with
    each new token (B,) as it is produced (streaming). ``decode`` turns ids into text for stop strings.
    """
    cfg = cfg or GenerationConfig()
    if prompt_ids.dim() == 1:
        prompt_ids = prompt_ids[None]
    decoder = decoder or make_decoder(model, batch_size=prompt_ids.shape[0])
    generator = None
    if cfg.seed is not None:
        generator = torch.Generator(device=prompt_ids.device).manual_seed(cfg.seed)
    if prompt_ids.shape[1]:
        logits = decoder.feed(prompt_ids.to(model.device))
    elif decoder.last_logits is not None:
        logits = decoder.last_logits
    else:
        raise ValueError("empty prompt and nothing read yet: give at least one prompt token")
    history, out, reason = prompt_ids.to(model.device), [], "length"
    for step in range(cfg.max_new_tokens):
        tok = next_token(logits, cfg, history, generator, allow_eos=step >= cfg.min_new_tokens)
        out.append(tok)
        history = torch.cat([history, tok[:, None]], dim=1)
        if on_token is not None:
            on_token(tok)
        logits = decoder.feed(tok[:, None])  # memory always holds prompt + everything generated
        if cfg.eos_ids and all(int(t) in cfg.eos_ids for t in tok):
            reason = "eos"
            break
        if cfg.stop_strings and decode is not None and step + 1 >= cfg.min_new_tokens:
            text = decode(torch.stack(out, 1)[0].tolist())
            if any(s in text for s in cfg.stop_strings):
                reason = "stop"
                break
    return GenerationOutput(tokens=torch.stack(out, dim=1), decoder=decoder, finish_reason=reason)
