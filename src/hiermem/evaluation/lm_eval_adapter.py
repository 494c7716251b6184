"""lm-evaluation-harness adapter: the ``hiermem`` model reads every request through HMT memory.

lm-eval 0.4 finds models in its registry only; it loads no plugins. Importing this module
registers ``hiermem``, so either run lm-eval's own command line through this module::

    python -m hiermem.evaluation.lm_eval_adapter run --model hiermem \\
        --model_args checkpoint=path/to/hmt,backbone=smollm2-135m --tasks wikitext

or, in Python, ``import hiermem.evaluation.lm_eval_adapter`` before
``lm_eval.simple_evaluate(model="hiermem", model_args=...)``.

``model_args``: ``checkpoint`` and ``backbone`` (as for ``hiermem eval``), ``device``, ``dtype``,
``max_gen_toks`` and any HMT config override (``cache_size``, ``eviction``, ...). Contexts of any
length are read segment by segment: there is no context window to truncate to.
"""

from __future__ import annotations

import dataclasses
import logging
import sys

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs
from tqdm import tqdm

from hiermem.errors import ConfigError
from hiermem.evaluation.loading import load_eval_models, tokenize
from hiermem.evaluation.perplexity import hmt_nll
from hiermem.evaluation.readers import hmt_generate
from hiermem.inference.generate import GenerationConfig
from hiermem.models.hmt import HMTConfig

if __name__ == "__main__":  # `python -m`: make later imports of this module reuse it (one registration)
    sys.modules.setdefault("hiermem.evaluation.lm_eval_adapter", sys.modules[__name__])

log = logging.getLogger(__name__)


@register_model("hiermem")
class HiermemLM(TemplateLM):
    """An HMT checkpoint as an lm-eval ``LM``: loglikelihood, loglikelihood_rolling, generate_until."""

    def __init__(self, checkpoint: str | None = None, backbone: str | None = None, device: str | None = None,
                 dtype: str | None = None, batch_size: int | str = 1, max_batch_size: int | None = None,
                 max_gen_toks: int = 256, **overrides):
        super().__init__()
        fields = {f.name for f in dataclasses.fields(HMTConfig)}
        unknown = sorted(set(overrides) - fields)
        if unknown:
            raise ConfigError(f"unknown hiermem model_args {unknown}; use checkpoint, backbone, device, dtype, "
                              f"max_gen_toks or HMT config fields ({', '.join(sorted(fields))})")
        if device and str(device).startswith("cuda") and not torch.cuda.is_available():
            log.warning("CUDA is not available: running on CPU (lm-eval asks for cuda:0 unless told --device)")
            device = None
        if str(batch_size) not in ("1", "auto"):
            log.info("hiermem reads requests one at a time (batch_size %s ignored)", batch_size)
        models = load_eval_models(checkpoint, backbone, device=device, dtype=dtype, **overrides)
        self.hmt = models.model
        self.tokenizer = models.backbone.tokenizer
        self._device = self.hmt.device
        self._max_gen_toks = int(max_gen_toks)
        self._memo: tuple[tuple[int, ...], object] | None = None  # (context prefix, memory after it)

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.eot_token_id

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def tokenizer_name(self) -> str:
        return getattr(self.tokenizer, "name_or_path", "hiermem").replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return tokenize(self.tokenizer, string)

    def tok_decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    # --- scoring ----------------------------------------------------------------------------
    def _memory_before(self, ids: list[int]):
        """Memory after the whole segments ``ids``; the last one is remembered (shared contexts)."""
        key = tuple(ids)
        if self._memo is None or self._memo[0] != key:
            t = torch.tensor([ids], device=self._device)
            self._memo = (key, self.hmt(t, return_logits=False).state if ids else None)
        return self._memo[1]

    @torch.no_grad()
    def continuation_logprob(self, context: list[int], continuation: list[int]) -> tuple[float, bool]:
        """log p(continuation | context) and whether greedy decoding would produce it."""
        first = len(context) - 1  # the position that predicts continuation[0]
        k = first // self.hmt.config.segment_length * self.hmt.config.segment_length
        memory = self._memory_before(context[:k])
        tail = torch.tensor([(context + continuation)[k:]], device=self._device)
        logits = self.hmt(tail, state=memory).logits[0, first - k:-1].float()  # (len(continuation), V)
        target = torch.tensor(continuation, device=self._device)
        logp = logits.log_softmax(-1).gather(1, target[:, None]).sum()
        return float(logp), bool((logits.argmax(-1) == target).all())

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        out = []
        for (pair, context, continuation) in tqdm(requests, disable=disable_tqdm, desc="hiermem loglikelihood"):
            res = self.continuation_logprob(context, continuation)
            self.cache_hook.add_partial("loglikelihood", pair, res)
            out.append(res)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole documents, conditioned on the prefix token, every token once."""
        out = []
        for (text,) in tqdm([r.args for r in requests], disable=disable_tqdm, desc="hiermem rolling"):
            ids = torch.tensor([self.prefix_token_id, *self.tok_encode(text)])
            logp = -float(hmt_nll(self.hmt, ids)[0].double().sum())
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), logp)
            out.append(logp)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Generate (greedy unless the task asks to sample) until a stop string, EOS or max_gen_toks."""
        out = []
        for context, gen_kwargs in tqdm([r.args for r in requests], disable=disable_tqdm, desc="hiermem generate"):
            kw = normalize_gen_kwargs(dict(gen_kwargs), self.max_gen_toks)
            until = handle_stop_sequences(kw.pop("until", None), eos=None)  # EOS itself ends generation
            sample = bool(kw.get("do_sample"))
            cfg = GenerationConfig(max_new_tokens=int(kw["max_gen_toks"]), do_sample=sample,
                                   temperature=float(kw.get("temperature") or 1.0) if sample else 1.0,
                                   eos_token_id=self.eot_token_id, stop_strings=[s for s in until if s])
            ids = self.tok_encode(context) or [self.prefix_token_id]
            text = hmt_generate(self.hmt, torch.tensor(ids), cfg, decode=self.tok_decode).text[0]
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
            out.append(text)
        return out


def main(argv: list[str] | None = None) -> None:
    """lm-eval's command line with the ``hiermem`` model registered."""
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
