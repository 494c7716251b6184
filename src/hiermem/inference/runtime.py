"""What generate, chat and serve share: loading a model with its tokenizer, EOS ids, chat formatting."""

from __future__ import annotations

import logging

import torch

from hiermem.errors import ConfigError

log = logging.getLogger(__name__)

PLAIN_ROLES = {"system": "System", "user": "User", "assistant": "Assistant"}


def load_for_inference(spec: str | None = None, device: str | None = None, dtype: str | None = None):
    """(model in eval mode, tokenizer) for a model spec: a checkpoint folder (trained, released or
    quantized), a released-weights name, or None for the default model. Quantized models run on CPU.
    """
    from hiermem.backbones import resolve_device, resolve_dtype
    from hiermem.inference.quantize import is_quantized
    from hiermem.models import load_model, model_folder

    dev = resolve_device(device)
    folder = model_folder(spec)
    if folder is not None and is_quantized(folder) and dev.type != "cpu":
        raise ConfigError(f"{folder} holds an int8 (CPU) model; run it with --device cpu")
    model = load_model(str(folder) if folder else None, device=dev, dtype=resolve_dtype(dtype, dev))
    return model.to(dev).eval(), model.tokenizer


def eos_token_ids(model, tokenizer) -> list[int]:
    """End-of-sequence ids from the tokenizer and the backbone's generation config."""
    ids = set()
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    gen = getattr(getattr(model, "backbone", None), "generation_config", None)
    extra = getattr(gen, "eos_token_id", None)
    if extra is not None:
        ids.update([int(extra)] if isinstance(extra, int) else map(int, extra))
    return sorted(ids)


def text_decoder(tokenizer):
    """ids -> text without special tokens (what users see)."""
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=True)


def encode(tokenizer, text: str, device: torch.device | None = None) -> torch.Tensor:
    """Text -> ids (1, T); special-token strings written in the text (chat templates) are honoured."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return torch.tensor([ids], dtype=torch.long, device=device)


class ChatFormat:
    """Renders chat messages with the tokenizer's chat template, or a plain "Role: text" layout.

    ``stop_strings``: what ends an assistant turn in the plain layout (the template's end token is
    an EOS id instead).
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.templated = bool(getattr(tokenizer, "chat_template", None))
        self.stop_strings = [] if self.templated else [f"\n{PLAIN_ROLES['user']}:"]

    def render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        for m in messages:
            if m.get("role") not in PLAIN_ROLES or not isinstance(m.get("content"), str):
                raise ConfigError(f"a chat message needs a role in {sorted(PLAIN_ROLES)} and text content, got {m!r}")
        if self.templated:
            try:
                return self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                          add_generation_prompt=add_generation_prompt)
            except Exception as exc:  # jinja raises its own errors (e.g. role alternation rules)
                raise ConfigError(f"the tokenizer's chat template rejected the messages: {exc}") from exc
        text = "".join(f"{PLAIN_ROLES[m['role']]}: {m['content']}\n" for m in messages)
        return text + (f"{PLAIN_ROLES['assistant']}:" if add_generation_prompt else "")

    def continuation(self, transcript: str, history: list[dict], new: list[dict]) -> str:
        """Text to feed after ``transcript`` (everything read so far) so the reader has seen
        ``history + new`` followed by the assistant prompt."""
        target = self.render(history + new, add_generation_prompt=True)
        if transcript and target.startswith(transcript):
            return target[len(transcript):]
        if history:
            before = self.render(history, add_generation_prompt=False)
            if target.startswith(before):
                return target[len(before):]
        return self.render(new, add_generation_prompt=True) if history else target
