"""Token generation over any hiermem model's incremental decoder (memory carries past segments).

``generate`` reads a prompt through memory and decodes greedily, by sampling or by beam search;
``TextStream`` turns tokens into text as they come (stop strings, partial characters), with
``StopMatcher`` finding stop strings in one pass;
``select_rows`` / ``reorder_rows`` pick batch rows of a decoder's state (beams, forks).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch

from hiermem.errors import ConfigError


@dataclass
class GenerationConfig:
    """Decoding settings. ``do_sample=False`` is greedy (``num_beams > 1``: beam search).

    ``eos_token_id``: the ids that end a row; None (default): the model's own (:func:`model_eos_ids`,
    as the command line uses); ``[]``: never stop before ``max_new_tokens``.
    """

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
    num_beams: int = 1
    length_penalty: float = 1.0  # beam scores are sum(log p) / length ** length_penalty

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
        if self.num_beams < 1:
            raise ConfigError(f"num_beams must be >= 1, got {self.num_beams}")
        if self.num_beams > 1 and self.do_sample:
            raise ConfigError("beam search is deterministic: use num_beams > 1 with do_sample=False")
        if any(not isinstance(s, str) or not s for s in self.stop_strings):
            raise ConfigError(f"stop_strings must be non-empty strings, got {self.stop_strings!r}")

    @property
    def eos_ids(self) -> set[int]:
        if self.eos_token_id is None:
            return set()
        return {self.eos_token_id} if isinstance(self.eos_token_id, int) else set(self.eos_token_id)


@dataclass
class GenerationOutput:
    tokens: torch.Tensor  # (B, n) generated ids (prompt excluded)
    decoder: object  # the decoder, holding the memory after prompt + output
    finish_reason: str  # "length", "eos", "stop" or "cancelled" (the first row's)
    finish_reasons: list[str] = field(default_factory=list)  # one per row
    text: list[str] | None = None  # per row, cut before any stop string (when ``decode`` is given)


class StopMatcher:
    """Aho–Corasick automaton over stop strings: text is scanned once, O(characters + stop lengths).

    The ``depth`` of a state is the length of the longest suffix of the text scanned so far that is
    a prefix of some stop string: the text a stream must hold back.
    """

    def __init__(self, stop_strings: Iterable[str] = ()):
        self.stops = list(dict.fromkeys(s for s in stop_strings if s))
        self.goto: list[dict[str, int]] = [{}]
        self.depth, self.fail, self.match = [0], [0], [0]  # match: longest stop ending at the state
        for s in self.stops:
            node = 0
            for ch in s:
                if ch not in self.goto[node]:
                    self.goto[node][ch] = len(self.goto)
                    self.goto.append({}), self.depth.append(self.depth[node] + 1)
                    self.fail.append(0), self.match.append(0)
                node = self.goto[node][ch]
            self.match[node] = len(s)
        queue = deque(self.goto[0].values())
        while queue:  # breadth first: fail links point to shallower states, already done
            node = queue.popleft()
            self.match[node] = self.match[node] or self.match[self.fail[node]]
            for ch, child in self.goto[node].items():
                self.fail[child] = self.step(self.fail[node], ch) if node else 0
                queue.append(child)
        self.longest = max(map(len, self.stops), default=0)

    def step(self, state: int, ch: str) -> int:
        while state and ch not in self.goto[state]:
            state = self.fail[state]
        return self.goto[state].get(ch, 0)

    def scan(self, text: str, state: int = 0, offset: int = 0) -> tuple[int, int | None]:
        """Feed ``text`` (at position ``offset`` of the whole) from ``state`` -> (the new state, where
        the earliest-starting stop string that ends inside ``text`` begins, or None)."""
        first = None
        for i, ch in enumerate(text):
            state = self.step(state, ch)
            if self.match[state]:
                start = offset + i + 1 - self.match[state]
                first = start if first is None else min(first, start)
        return state, first


class TextStream:
    """Incremental detokenizer: ``push(id)`` returns the new text that is safe to show.

    Text that could still become a stop string is held back, as are incomplete characters
    (byte-level tokens that split a UTF-8 sequence). ``text`` is everything up to the first stop
    string; ``stopped`` tells whether one was found. Each character is scanned once
    (:class:`StopMatcher`), so the cost is linear in the text whatever the stop strings.
    """

    MAX_PARTIAL = 8  # tokens an incomplete character may span before it is shown as U+FFFD

    def __init__(self, decode: Callable[[list[int]], str], stop_strings: Iterable[str] | StopMatcher = ()):
        self.decode = decode
        self.matcher = stop_strings if isinstance(stop_strings, StopMatcher) else StopMatcher(stop_strings)
        self.stop_strings = self.matcher.stops
        self.ids: list[int] = []
        self._prefix, self._read = 0, 0  # decode window: ids[_prefix:_read] already turned into text
        self._raw = ""  # all decoded text
        self._shown = 0  # characters of _raw handed out
        self._state, self._scanned = 0, 0  # matcher state after _raw[:_scanned]
        self._stop_at = 0  # where the first stop string begins, once found
        self.stopped = False

    @property
    def text(self) -> str:
        return self._raw if not self.stopped else self._raw[:self._stop_at]

    def push(self, token_id: int) -> str:
        if self.stopped:
            return ""
        self.ids.append(int(token_id))
        before = self.decode(self.ids[self._prefix:self._read])
        after = self.decode(self.ids[self._prefix:])
        partial = after.endswith("\ufffd") and len(self.ids) - self._read < self.MAX_PARTIAL
        if len(after) > len(before) and not partial:
            self._raw += after[len(before):]
            self._prefix, self._read = self._read, len(self.ids)
        return self._release(final=False)

    def finish(self) -> str:
        """The text still held back (call once generation is over)."""
        if not self.stopped and self._read < len(self.ids):
            tail = self.decode(self.ids[self._prefix:])
            self._raw += tail[len(self.decode(self.ids[self._prefix:self._read])):]
            self._read = len(self.ids)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        raw = self._raw
        safe = len(raw)
        if self.matcher.stops and not self.stopped:
            self._state, first = self.matcher.scan(raw[self._scanned:], self._state, self._scanned)
            self._scanned = len(raw)
            if first is not None:
                self.stopped, self._stop_at = True, first
            elif not final:  # hold back a tail that may be the start of a stop string
                safe -= self.matcher.depth[self._state]
        limit = self._stop_at if self.stopped else safe
        out = raw[self._shown:limit] if limit > self._shown else ""
        self._shown = max(self._shown, limit)
        return out


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


def model_eos_ids(model) -> list[int]:
    """End-of-sequence ids of a model: its tokenizer's EOS, its backbone's generation config and
    config (models over a pretrained backbone) and its own config's ``eos_token_id``."""
    ids: set[int] = set()
    backbone = getattr(model, "backbone", None)
    for holder in (getattr(model, "tokenizer", None), getattr(backbone, "generation_config", None),
                   getattr(backbone, "config", None), getattr(model, "config", None)):
        eos = getattr(holder, "eos_token_id", None)
        if eos is not None:
            ids.update([int(eos)] if isinstance(eos, int) else map(int, eos))
    return sorted(ids)


def make_decoder(model, batch_size: int = 1, state=None):
    """A fresh decoder of ``model`` (or one continuing ``state``)."""
    return model.decoder(state=state, batch_size=batch_size)


def select_rows(decoder, idx: torch.Tensor):
    """A new decoder holding rows ``idx`` (B',) of ``decoder``'s state (``decoder`` is untouched).

    Repeating a row forks it (``idx = [0, 0, 0]`` turns one reader into three identical ones)."""
    return decoder.select_rows(idx)


def reorder_rows(decoder, idx: torch.Tensor) -> None:
    """Like :func:`select_rows` but in place, without copying the KV cache (beam search steps)."""
    decoder.reorder_rows(idx)


def state_nbytes(decoder) -> int:
    """Bytes held by a decoder's state: memory, partial segment and KV cache."""
    return decoder.nbytes


# --- decoding --------------------------------------------------------------------------------
def _first_logits(model, decoder, prompt_ids: torch.Tensor) -> torch.Tensor:
    if prompt_ids.shape[1]:
        return decoder.feed(prompt_ids.to(model.device))
    if decoder.last_logits is not None:
        return decoder.last_logits
    raise ValueError("empty prompt and nothing read yet: give at least one prompt token")


def generate(model, prompt_ids: torch.Tensor, cfg: GenerationConfig | None = None, decoder=None,
             on_token: Callable[[torch.Tensor], None] | None = None,
             decode: Callable[[list[int]], str] | None = None,
             should_stop: Callable[[], bool] | None = None) -> GenerationOutput:
    """Read ``prompt_ids`` (B, T) through memory, then generate up to ``max_new_tokens``.

    ``decoder``: an existing decoder to continue (its memory is kept); ``on_token`` is called with
    each new token (B,) as it is produced (streaming; with beam search, once the best beam is
    known). ``decode`` turns ids into text for stop strings and ``output.text``; ``min_new_tokens``
    holds back EOS only, a stop string ends a row whenever it appears. ``should_stop``
    is polled after every token: True ends generation cleanly (finish reason "cancelled") with the
    decoder consistent, holding everything produced so far. A row stops at EOS or a stop string;
    generation ends when every row has stopped.
    """
    cfg = cfg or GenerationConfig()
    if cfg.eos_token_id is None:  # unset: stop where the model's EOS says, as the command line does
        cfg = dataclasses.replace(cfg, eos_token_id=model_eos_ids(model))
    if prompt_ids.dim() == 1:
        prompt_ids = prompt_ids[None]
    decoder = decoder or make_decoder(model, batch_size=prompt_ids.shape[0])
    # test-time learning (decoders with requires_grad) needs autograd; every other model runs without
    grad = contextlib.nullcontext() if getattr(decoder, "requires_grad", False) else torch.no_grad()
    with grad:
        if cfg.num_beams > 1:
            return _beam_search(model, prompt_ids, cfg, decoder, on_token, decode, should_stop)
        return _sample(model, prompt_ids, cfg, decoder, on_token, decode, should_stop)


def _sample(model, prompt_ids, cfg: GenerationConfig, decoder, on_token, decode, should_stop) -> GenerationOutput:
    """Greedy decoding or sampling, one token per row and step."""
    generator = None
    if cfg.seed is not None:
        generator = torch.Generator(device=prompt_ids.device).manual_seed(cfg.seed)
    logits = _first_logits(model, decoder, prompt_ids)
    b = logits.shape[0]
    matcher = StopMatcher(cfg.stop_strings)
    streams = [TextStream(decode, matcher) for _ in range(b)] if decode is not None else None
    reasons: list[str | None] = [None] * b
    filler = min(cfg.eos_ids) if cfg.eos_ids else None
    history, out = prompt_ids.to(model.device), []
    for step in range(cfg.max_new_tokens):
        tok = next_token(logits, cfg, history, generator, allow_eos=step >= cfg.min_new_tokens)
        done = torch.tensor([r is not None for r in reasons], device=tok.device)
        if filler is not None and bool(done.any()):
            tok = torch.where(done, torch.full_like(tok, filler), tok)  # finished rows idle on EOS
        out.append(tok)
        history = torch.cat([history, tok[:, None]], dim=1)
        if on_token is not None:
            on_token(tok)
        logits = decoder.feed(tok[:, None])  # memory always holds prompt + everything generated
        for row, t in enumerate(tok.tolist()):
            if reasons[row] is not None:
                continue
            if t in cfg.eos_ids:
                reasons[row] = "eos"
            elif streams is not None:
                streams[row].push(t)
                if streams[row].stopped:
                    reasons[row] = "stop"
        if all(r is not None for r in reasons):
            break
        if should_stop is not None and should_stop():
            reasons = [r or "cancelled" for r in reasons]
            break
    reasons = [r or "length" for r in reasons]
    if streams is not None:
        for s in streams:
            s.finish()
    return GenerationOutput(tokens=torch.stack(out, dim=1), decoder=decoder, finish_reason=reasons[0],
                            finish_reasons=reasons, text=[s.text for s in streams] if streams else None)


def _beam_search(model, prompt_ids, cfg: GenerationConfig, decoder, on_token, decode, should_stop):
    """Beam search for one prompt; ``decoder`` ends holding prompt + the best hypothesis."""
    if prompt_ids.shape[0] != 1:
        raise ConfigError(f"beam search reads one prompt at a time, got a batch of {prompt_ids.shape[0]}")
    nb, dev = cfg.num_beams, model.device
    logits = _first_logits(model, decoder, prompt_ids)  # (1, V)
    beams = select_rows(decoder, torch.zeros(nb, dtype=torch.long, device=dev))  # decoder stays as it is
    logits = logits.expand(nb, -1)
    scores = torch.full((nb,), float("-inf"), device=dev)
    scores[0] = 0.0  # identical beams at the start: keep one live
    seqs = torch.zeros(nb, 0, dtype=torch.long, device=dev)
    prompt = prompt_ids.to(dev).expand(nb, -1)
    finished: list[tuple[float, list[int], str]] = []
    matcher = StopMatcher(cfg.stop_strings)  # built once, shared by every candidate
    longest = matcher.longest
    cancelled = False

    def norm(score: float, length: int) -> float:
        return score / (max(length, 1) ** cfg.length_penalty)

    for step in range(cfg.max_new_tokens):
        logp = apply_repetition_penalty(logits.float(), torch.cat([prompt, seqs], 1),
                                        cfg.repetition_penalty).log_softmax(-1)  # (nb, V)
        if step < cfg.min_new_tokens and cfg.eos_ids:
            logp[:, list(cfg.eos_ids)] = float("-inf")
        cand = (scores[:, None] + logp).view(-1)
        top = cand.topk(min(2 * nb, cand.numel()))
        rows, toks, new_scores = [], [], []
        vocab = logp.shape[1]
        for s, flat in zip(top.values.tolist(), top.indices.tolist(), strict=True):
            if s == float("-inf"):
                break
            row, tok = divmod(flat, vocab)
            seq = seqs[row].tolist() + [tok]
            if tok in cfg.eos_ids:
                finished.append((norm(s, len(seq)), seq, "eos"))
                continue
            if decode is not None and longest and matcher.scan(decode(seq[-(longest + 2):]))[1] is not None:
                finished.append((norm(s, len(seq)), seq, "stop"))
                continue
            rows.append(row), toks.append(tok), new_scores.append(s)
            if len(rows) == nb:
                break
        finished.sort(key=lambda h: -h[0])
        finished = finished[:nb]
        if not rows:
            break
        if len(finished) == nb and norm(max(new_scores), step + 1) <= finished[-1][0]:
            break  # no live beam can beat the worst kept hypothesis
        while len(rows) < nb:  # pad with dead copies of the first live beam
            rows.append(rows[0]), toks.append(toks[0]), new_scores.append(float("-inf"))
        idx = torch.tensor(rows, device=dev)
        reorder_rows(beams, idx)
        tok_t = torch.tensor(toks, device=dev)
        seqs = torch.cat([seqs.index_select(0, idx), tok_t[:, None]], 1)
        scores = torch.tensor(new_scores, device=dev)
        logits = beams.feed(tok_t[:, None])
        if should_stop is not None and should_stop():
            cancelled = True
            break
    live = [(norm(float(s), seqs.shape[1]), seqs[i].tolist(), "cancelled" if cancelled else "length")
            for i, s in enumerate(scores.tolist()) if s != float("-inf")]
    best = max(finished + live, key=lambda h: h[0])
    tokens = torch.tensor([best[1]], dtype=torch.long, device=dev)  # (1, n)
    decoder.feed(tokens)  # the caller's decoder reads the chosen continuation
    if on_token is not None:
        for t in best[1]:
            on_token(torch.tensor([t], device=dev))
    text = None
    if decode is not None:
        stream = TextStream(decode, matcher)
        for t in best[1]:
            if t not in cfg.eos_ids:
                stream.push(t)
        stream.finish()
        text = [stream.text]
    return GenerationOutput(tokens=tokens, decoder=decoder, finish_reason=best[2], finish_reasons=[best[2]],
                            text=text)
