"""HMT: the Hierarchical Memory Transformer wrapper around a frozen (or LoRA/fine-tuned) causal LM.

Per segment x_n (B, L), as in arXiv 2405.06067:
  1. summary   S_n = h_last( [T, E(x_n[:, :j]), T] )                           (B, 1, d)
  2. recall    P_n = softmax(S_n Wq (M Wk)^T / sqrt(h)) M   (stage 2; stage 1: P_n = m_{n-1})
  3. encode    H = h( [BOS, P_n, E(sensory), E(x_n), P_n] ); logits = head(H[x positions])
               m_n = proj(H[:, -1]) appended to the bank M (capacity N, FIFO or attention eviction)

The backbone is reached through its ``base_model`` (for hidden states without the LM head) and
``get_output_embeddings()`` (the head, applied only where logits are needed). Memory enters as
``inputs_embeds``; no modeling code is copied.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from hiermem.errors import CheckpointError, ConfigError
from hiermem.io import atomic_write_json, load_tensors, read_json, save_tensors
from hiermem.memory.bank import MemoryBank, append, make_eviction
from hiermem.memory.recall import CrossAttentionRecall, make_projection
from hiermem.models.base import HiermemModel, ModelOutput, copy_checked
from hiermem.models.hmt.config import HMTConfig
from hiermem.models.hmt.decoder import HMTDecoder
from hiermem.models.hmt.state import HMTMemory

WEIGHTS_NAME = "memory.safetensors"
CONFIG_NAME = "config.json"


@dataclass
class HMTOutput(ModelOutput):
    """:class:`~hiermem.models.base.ModelOutput` plus, when asked for, the recall trace: per
    segment (segment index, sources (B, n), weights (B, n))."""

    recall: list | None = None


def backbone_fingerprint(backbone: nn.Module) -> dict:
    cfg = backbone.config
    return {"model_type": cfg.model_type, "hidden_size": cfg.hidden_size,
            "num_hidden_layers": cfg.num_hidden_layers, "vocab_size": cfg.vocab_size}


def add_lora(backbone: nn.Module, spec: dict) -> nn.Module:
    """Inject LoRA adapters into ``backbone`` in place (PEFT); only the adapters are trainable."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError as exc:
        raise ConfigError("LoRA needs PEFT: pip install 'hiermem[train]'") from exc
    cfg = LoraConfig(r=int(spec["r"]), lora_alpha=int(spec.get("alpha", 2 * int(spec["r"]))),
                     lora_dropout=float(spec.get("dropout", 0.0)),
                     target_modules=spec.get("target_modules") or ["q_proj", "v_proj"])
    try:
        return inject_adapter_in_model(cfg, backbone)
    except ValueError as exc:
        raise ConfigError(f"LoRA could not find target modules {cfg.target_modules} in the backbone: {exc}") from exc


def default_segment_bos(model_type: str, use_memory: bool, bos_token_id: int | None) -> bool:
    """Whether every backbone call starts with BOS when the config leaves it unset.

    Gemma needs BOS. With memory on, BOS keeps position 0 (the attention sink of the pretrained
    model) a real token, so the memory embedding P sits at position 1: on SmolLM2-135M untrained
    stage-1 memory reads Shakespeare test plays at perplexity 50.9 with P at position 0 and 35.0
    behind BOS (sensory memory alone: 34.7). Memory off keeps the bare backbone's input.
    """
    if model_type.startswith("gemma"):
        return True
    return bool(use_memory) and bos_token_id is not None


class HMT(HiermemModel):
    """Wrap ``backbone`` (a HF *ForCausalLM) with hierarchical memory.

    Trainable sets: "memory" (default: T, initial memory, Wq, Wk, projection), "lora" (memory + LoRA
    adapters) or "full". The tokenizer is the backbone's (named by ``config.backbone``).
    """

    config_class: ClassVar[type] = HMTConfig
    state_class: ClassVar[type] = HMTMemory
    decoder_class: ClassVar[type] = HMTDecoder
    default_trainable: ClassVar[str] = "memory"

    def __init__(self, backbone: nn.Module, config: HMTConfig, bos_token_id: int | None = None):
        super().__init__()
        fp = backbone_fingerprint(backbone)
        if config.backbone_fingerprint and config.backbone_fingerprint != fp:
            raise CheckpointError(f"this HMT was built for a backbone {config.backbone_fingerprint}, "
                                  f"but the backbone given is {fp}; load the backbone it names "
                                  f"({config.backbone!r}) or retrain the memory")
        config = config.replace(backbone_fingerprint=fp)
        bos = bos_token_id if bos_token_id is not None else getattr(backbone.config, "bos_token_id", None)
        if config.segment_bos is None:
            config = config.replace(segment_bos=default_segment_bos(fp["model_type"], config.use_memory, bos))
        max_pos = getattr(backbone.config, "max_position_embeddings", None)
        if max_pos and config.backbone_positions() > max_pos:
            raise ConfigError(f"segment_length + sensory_length + 2 = {config.backbone_positions()} "
                              f"exceeds the backbone's {max_pos} positions; use shorter segments")
        if config.segment_bos and bos is None:
            raise ConfigError("segment_bos is set but the backbone has no bos_token_id")
        self.config = config
        if config.lora:
            backbone = add_lora(backbone, config.lora)
        self.backbone = backbone
        self.bos_token_id = bos
        d = fp["hidden_size"]
        emb = backbone.get_input_embeddings().weight.detach().float()
        scale = float(getattr(backbone.get_input_embeddings(), "embed_scale", 1.0) or 1.0)
        std, mean = float(emb.std()) * scale, emb.mean(0) * scale
        weight = backbone.get_input_embeddings().weight
        dtype, device = weight.dtype, weight.device
        gen = torch.Generator().manual_seed(0)  # same init for the same backbone, whatever the RNG state
        self.summary_prompt = nn.Parameter((mean + std * torch.randn(d, generator=gen)).view(1, 1, d))
        self.initial_memory = nn.Parameter((mean + std * torch.randn(d, generator=gen)).view(1, 1, d))
        self.recall = CrossAttentionRecall(d, config.recall_dim or d)
        self.memory_projection = make_projection(config.memory_projection, d,
                                                 float(emb.pow(2).mean().sqrt()) * scale)
        self.eviction = make_eviction(config.eviction, config.eviction_decay)
        self.to(device=device, dtype=dtype)

    # --- backbone access -------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.summary_prompt.device

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids (B, l) -> input embeddings (B, l, d), scaling included (Gemma)."""
        return self.backbone.get_input_embeddings()(ids)

    def hidden(self, embeds: torch.Tensor, past=None, use_cache: bool = False):
        """Last-layer hidden states (B, l, d) of the backbone body, and its KV cache."""
        out = self.backbone.base_model(inputs_embeds=embeds, cache=past, use_cache=use_cache)
        return out.last_hidden_state, (out.cache if use_cache else None)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """LM head on hidden states (B, l, d) -> logits (B, l, V), with Gemma-style soft-capping."""
        logits = self.backbone.get_output_embeddings()(h)
        cap = getattr(self.backbone.config, "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def _bos(self, batch: int) -> list[torch.Tensor]:
        if not self.config.segment_bos:
            return []
        ids = torch.full((batch, 1), self.bos_token_id, dtype=torch.long, device=self.device)
        return [self.embed(ids)]

    # --- memory -----------------------------------------------------------------------------
    def init_state(self, batch_size: int = 1) -> HMTMemory:
        d = self.config.backbone_fingerprint["hidden_size"]
        dtype = self.summary_prompt.dtype
        return HMTMemory(bank=MemoryBank.empty(batch_size, d, self.device, dtype), last=None,
                         sensory=torch.zeros(batch_size, 0, dtype=torch.long, device=self.device))

    def memory_parameters(self) -> dict[str, nn.Parameter]:
        """HMT's own parameters (T, initial memory, Wq, Wk, projection): the default trainables."""
        return {n: p for n, p in self.named_parameters() if not n.startswith("backbone.")}

    def trainable_names(self, mode: str = "default") -> list[str]:
        """"memory", "lora" (memory + adapters) or "full" ("default" = memory)."""
        mode = self.default_trainable if mode == "default" else mode
        if mode not in ("memory", "lora", "full"):
            raise ConfigError(f"HMT trains 'memory', 'lora' or 'full', not {mode!r}")
        memory = set(self.memory_parameters())
        names = [n for n, _ in self.named_parameters()
                 if mode == "full" or n in memory or (mode == "lora" and "lora_" in n)]
        if mode == "lora" and not any("lora_" in n for n in names):
            raise ConfigError("trainable='lora' but the model has no LoRA adapters: build it with a lora "
                              "config (e.g. --lora-r 8)")
        return names

    def fingerprint(self) -> dict:
        return {"model_type": "hmt", **self.config.backbone_fingerprint}

    def summarize(self, source: torch.Tensor) -> torch.Tensor:
        """Representation encoding: summary-source ids (B, l) -> S (B, 1, d) from at most j of them
        (the first j of a segment, or the last j before it: see :meth:`summary_source`)."""
        source = self._summary_window(source)
        b = source.shape[0]
        t = self.summary_prompt.expand(b, 1, -1)
        h, _ = self.hidden(torch.cat([*self._bos(b), t, self.embed(source), t], dim=1))
        return h[:, -1:]

    def _summary_window(self, source: torch.Tensor) -> torch.Tensor:
        j = self.config.summary_tokens
        return source[:, :j] if self.config.summary_source == "segment" else source[:, -j:]

    def summary_source(self, segment: torch.Tensor, previous: torch.Tensor | None) -> torch.Tensor:
        """What the summary of ``segment`` (B, l) reads: the segment ("segment", the paper) or the
        tokens before it (``previous`` (B, l'), "previous")."""
        if self.config.summary_source == "segment":
            return segment
        if previous is None:
            raise RuntimeError("a causal summary needs the previous segment's tokens (state.tail)")
        return previous

    def summarize_many(self, sources: list[torch.Tensor]) -> list[torch.Tensor]:
        """Summaries of several segments, batched when their summary inputs have equal length."""
        heads = [self._summary_window(s) for s in sources]  # each (B, <= j)
        out: list[torch.Tensor | None] = [None] * len(heads)
        by_len: dict[int, list[int]] = {}
        for i, hd in enumerate(heads):
            by_len.setdefault(hd.shape[1], []).append(i)
        for idx in by_len.values():
            stacked = torch.cat([heads[i] for i in idx], dim=0)  # (len(idx) * B, l)
            s = self.summarize(stacked).split(heads[idx[0]].shape[0], dim=0)
            for i, si in zip(idx, s):
                out[i] = si
        return out

    def memory_prompt(self, summary: torch.Tensor | None, memory: HMTMemory):
        """P_n (B, 1, d) and the recall weights (B, n) (None when recall was not used)."""
        b = memory.batch_size
        if self.config.stage == 1:
            return (memory.last if memory.last is not None else self.initial_memory.expand(b, 1, -1)), None
        if memory.bank.size == 0:
            return self.initial_memory.expand(b, 1, -1), None
        if memory.bank.size == 1:  # softmax over one slot is 1 whatever the query: skip the summary
            bank = memory.bank.embeddings
            return bank, torch.ones(b, 1, dtype=bank.dtype, device=bank.device)
        return self.recall(summary, memory.bank.embeddings)

    def needs_summary(self, memory: HMTMemory) -> bool:
        return self.config.use_memory and self.config.stage == 2 and memory.bank.size > 1

    def encode(self, ids: torch.Tensor, prompt: torch.Tensor | None, memory: HMTMemory, past=None,
               use_cache: bool = False, close: bool = True):
        """Memory encoding pass over ``[bos?, P, E(sensory), E(ids), P]``.

        With ``past`` (a KV cache of an earlier call on the same segment) only ``ids`` are fed.
        ``close=False`` leaves out the trailing P (incremental decoding).
        Returns hidden states at the ids positions (B, l, d), the new memory embedding (B, 1, d) or
        None, and the KV cache.
        """
        b = ids.shape[0]
        parts = []
        if past is None:
            parts += self._bos(b)
            if prompt is not None:
                parts.append(prompt)
            if memory.sensory.shape[1]:
                parts.append(self.embed(memory.sensory))
        n_prefix = sum(p.shape[1] for p in parts)
        parts.append(self.embed(ids))
        closing = close and prompt is not None
        if closing:
            parts.append(prompt)
        h, past = self.hidden(torch.cat(parts, dim=1), past=past, use_cache=use_cache)
        h_ids = h[:, n_prefix:n_prefix + ids.shape[1]]
        new_mem = self.memory_projection(h[:, -1:]) if closing else None
        return h_ids, new_mem, past

    def segment_prompt(self, segment: torch.Tensor, memory: HMTMemory):
        """P (B, 1, d) (None without memory) and recall weights for ``segment`` (B, l <= L) read
        after ``memory``: the prompt ``forward`` uses (summaries there are batched)."""
        if not self.config.use_memory:
            return None, None
        summary = (self.summarize(self.summary_source(segment, memory.tail))
                   if self.needs_summary(memory) else None)
        return self.memory_prompt(summary, memory)

    def prompt_is_fixed(self, memory: HMTMemory, pending: int) -> bool:
        """Whether a segment's prompt stays the same when tokens are added to its first ``pending``:
        true unless the summary reads the segment itself and has not seen j of its tokens yet."""
        return (not self.needs_summary(memory) or self.config.summary_source == "previous"
                or pending >= self.config.summary_tokens)

    def update_memory(self, memory: HMTMemory, ids: torch.Tensor, new_mem: torch.Tensor | None,
                      weights: torch.Tensor | None) -> HMTMemory:
        """Fold a finished segment into the state: bank, last embedding, sensory tokens, counters."""
        bank, last, evictions = memory.bank, memory.last, memory.evictions
        if new_mem is not None:
            if weights is not None:
                bank = self.eviction.observe(bank, weights)
            bank, evicted = append(bank, new_mem, memory.segments, self.config.cache_size, self.eviction)
            last, evictions = new_mem, evictions + (evicted is not None)
        k = self.config.sensory_length
        sensory = torch.cat([memory.sensory, ids], dim=1)[:, -k:] if k else memory.sensory
        tail = None
        if self.config.use_memory and self.config.summary_source == "previous":
            tail = ids[:, -self.config.summary_tokens:].clone()  # own storage: not a view of the input
        state = HMTMemory(bank, last, sensory, memory.segments + 1, memory.tokens + ids.shape[1], evictions, tail=tail)
        depth = self.config.bptt_depth
        if depth is not None and state.segments % depth == 0:
            state = state.detach()  # truncated BPTT: no gradient crosses this boundary
        return state

    # --- forward ----------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, state: HMTMemory | None = None,
                labels: torch.Tensor | None = None, return_logits: bool = True,
                return_token_nll: bool = False, return_recall: bool = False,
                loss_skip_segments: int = 0, on_segment=None) -> HMTOutput:
        """Read ``input_ids`` (B, T) segment by segment, carrying the memory ``state``.

        Segments are counted from the start of the document, not of the call: the state's
        unfinished segment (``pending``) is continued, and a trailing partial segment is returned
        in the new state's ``pending`` (its tokens get logits now; memory folds it once it holds L
        tokens). So any split of a document into calls folds the same segments; with
        ``summary_source="previous"`` it also gives the same logits (see HMTConfig).
        ``labels`` (B, T) follow the HF convention (shifted inside; -100 ignored): every token
        but the first of this call is scored exactly once. ``loss_skip_segments`` leaves the
        first segments of the call out of the loss (memory warm-up). Without ``return_logits`` no
        logits are kept, so memory use does not grow with T. ``on_segment(n_tokens)`` is called
        after each segment (progress bars).
        """
        memory = self.checked_state(input_ids, state, labels)
        cfg, n_in = self.config, input_ids.shape[1]
        p = memory.pending_length
        ids_all = torch.cat([memory.pending, input_ids], dim=1) if p else input_ids  # (B, p + T)
        memory = dataclasses.replace(memory, pending=None, tokens=memory.tokens - p)
        L, T = cfg.segment_length, ids_all.shape[1]
        bounds = [(s, min(s + L, T)) for s in range(0, T, L)]
        nll_sum = torch.zeros((), device=self.device, dtype=torch.float32)
        count, logits_out, nll_out, trace, last_logits = 0, [], [], [], None
        for block in range(0, len(bounds), cfg.summary_batch):
            block_bounds = bounds[block:block + cfg.summary_batch]
            segs = [ids_all[:, s:e] for s, e in block_bounds]
            summaries = [None] * len(segs)
            if cfg.use_memory and cfg.stage == 2:
                # segment i of the block sees min(N, size + i) slots; recall needs >= 2 of them
                first_needed = max(0, 2 - memory.bank.size) if cfg.cache_size > 1 else len(segs)
                if len(segs) > first_needed:
                    before = [memory.tail, *segs[:-1]]  # what precedes each segment of the block
                    sources = [self.summary_source(segs[i], before[i]) for i in range(first_needed, len(segs))]
                    summaries[first_needed:] = self.summarize_many(sources)
            for i, ((s, e), ids) in enumerate(zip(block_bounds, segs)):
                prompt, weights = self.memory_prompt(summaries[i], memory) if cfg.use_memory else (None, None)
                complete = e - s == L
                h_ids, new_mem, _ = self.encode(ids, prompt, memory, close=complete)
                if complete:
                    if return_recall and weights is not None:
                        trace.append((memory.segments, memory.bank.sources.clone(), weights.detach().float().cpu()))
                    memory = self.update_memory(memory, ids, new_mem, weights)
                else:  # the unfinished segment travels in the state
                    memory = dataclasses.replace(memory, pending=ids.clone(), tokens=memory.tokens + e - s)
                first_new = max(p - s, 0)  # the pending tokens re-read here were scored by an earlier call
                h_ids, a, b = h_ids[:, first_new:], s + first_new - p, e - p  # a:b = this call's positions
                if on_segment is not None:
                    on_segment(b - a)
                want_loss = labels is not None and block + i >= loss_skip_segments
                if not (return_logits or want_loss or return_token_nll):
                    if b == n_in:
                        last_logits = self.head(h_ids[:, -1:]).squeeze(1)
                    continue
                logits = self.head(h_ids)  # (B, l, V)
                last_logits = logits[:, -1]
                if return_logits:
                    logits_out.append(logits)
                if labels is not None or return_token_nll:
                    target = (labels if labels is not None else input_ids)[:, a + 1:b + 1]
                    seg_logits = logits[:, :target.shape[1]].float()
                    nll = F.cross_entropy(seg_logits.flatten(0, 1), target.clamp_min(0).flatten(),
                                          reduction="none").view_as(target)  # (B, l)
                    valid = target != -100
                    nll = nll * valid
                    if return_token_nll:
                        nll_out.append(nll.detach())
                    if want_loss:
                        nll_sum = nll_sum + nll.sum()
                        count += int(valid.sum())
        loss = (nll_sum / max(count, 1)) if labels is not None else None
        return HMTOutput(
            loss=loss, state=memory, num_tokens=count, nll_sum=nll_sum if labels is not None else None,
            logits=torch.cat(logits_out, dim=1) if return_logits else None,
            token_nll=torch.cat(nll_out, dim=1) if return_token_nll else None,
            recall=trace if return_recall else None, last_logits=last_logits)

    # --- persistence ------------------------------------------------------------------------
    def save_pretrained(self, folder: str | Path, include_backbone_trainables: bool = True) -> None:
        """Write ``config.json`` and ``memory.safetensors`` (HMT parameters, plus any trainable
        backbone parameters such as LoRA adapters). The backbone itself is named, not stored."""
        folder = Path(folder)
        tensors = {n: p for n, p in self.memory_parameters().items()}
        if include_backbone_trainables:
            tensors.update({n: p for n, p in self.named_parameters() if n.startswith("backbone.") and p.requires_grad})
        save_tensors(folder / WEIGHTS_NAME, tensors, {"fingerprint": self.config.backbone_fingerprint})
        atomic_write_json(folder / CONFIG_NAME, self.config.to_dict())

    def load_weights(self, folder: str | Path, strict: bool = True) -> None:
        tensors, _ = load_tensors(Path(folder) / WEIGHTS_NAME, self.device)
        copy_checked(dict(self.named_parameters()), tensors, folder, "HMT", required=self.memory_parameters(),
                     hint="was it saved with other options, e.g. memory_projection or LoRA?")

    @classmethod
    def from_pretrained(cls, folder: str | Path, backbone=None, device=None, dtype=None, **overrides) -> "HMT":
        """Rebuild from a folder written by :meth:`save_pretrained`.

        ``backbone``: a :class:`hiermem.Backbone` or HF model; default loads the one the config names.
        ``overrides``: config fields to change at load time (e.g. ``eviction="attention"``).
        """
        folder = Path(folder)
        if not (folder / CONFIG_NAME).exists():
            raise CheckpointError(f"{folder} holds no {CONFIG_NAME}: not an HMT checkpoint folder")
        config = HMTConfig.from_dict({**read_json(folder / CONFIG_NAME), **overrides})
        bos = None
        if backbone is None:
            from hiermem.backbones import load_backbone

            backbone = load_backbone(config.backbone, device=device, dtype=dtype)
        tokenizer = None
        if hasattr(backbone, "tokenizer"):
            tokenizer = backbone.tokenizer
            bos = getattr(tokenizer, "bos_token_id", None)
            backbone = backbone.model
        model = cls(backbone, config, bos_token_id=bos)
        model.load_weights(folder)
        model.tokenizer = tokenizer
        return model
