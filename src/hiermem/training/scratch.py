"""The from-scratch recipe: one trainer run for any registered model without a pretrained backbone.

Steps: a tokenizer (given, or trained once on the training split and kept in
``<output_dir>/tokenizer``), the model built from its config (vocabulary size and special ids
taken from the tokenizer), the corpus tokenised once into cached shards, windows (shuffled) or
contiguous streams (``carry_state``), then :class:`~hiermem.training.trainer.Trainer`.

Output folder layout::

    <output_dir>/tokenizer/     the tokenizer (reused when the run resumes)
    <output_dir>/checkpoints/   step-*/ best/ tensorboard/
    <output_dir>/final/         the trained model with its tokenizer (loads with hiermem.models.load_model)
    <output_dir>/train_summary.json
"""

from __future__ import annotations

import dataclasses
import logging
import platform
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from hiermem.errors import ConfigError, DataError
from hiermem.io import atomic_write_json
from hiermem.training.config import TrainConfig
from hiermem.training.trainer import Trainer, make_accelerator

log = logging.getLogger(__name__)


@dataclass
class ScratchRecipe:
    """What a from-scratch run trains, on what, and how.

    model: config fields of the model (vocab_size and special ids default to the tokenizer's).
    tokenizer: {"path": an existing tokenizer folder} or {"type": bpe|unigram|char|word|byte,
        "vocab_size": N} to train one on the training split. data: options of
        ``hiermem.data.build_corpus`` (text column, split fractions, ...). window: tokens per
        training window (the BPTT window with ``training.carry_state``).
    """

    model_type: str
    output_dir: str | Path
    source: str = "shakespeare"
    data: dict = field(default_factory=dict)
    model: dict = field(default_factory=dict)
    tokenizer: dict = field(default_factory=lambda: {"type": "bpe", "vocab_size": 8000})
    training: TrainConfig = field(default_factory=lambda: TrainConfig(trainable="full"))
    window: int = 256
    straddle: bool = False
    device: str | None = None


def _tokenizer(recipe: ScratchRecipe, out: Path, acc):
    """The run's tokenizer: the given folder, the one this run trained earlier, or a new one."""
    from hiermem.tokenizers import load_tokenizer, train_tokenizer

    given = recipe.tokenizer.get("path")
    if given:
        return load_tokenizer(given)
    folder = out / "tokenizer"
    unknown = sorted(set(recipe.tokenizer) - {"path", "type", "vocab_size", "character_coverage"})
    if unknown:
        raise ConfigError(f"unknown tokenizer option(s) {unknown}; use path, type, vocab_size, character_coverage")
    if acc.is_main_process and not (folder / "hiermem_tokenizer.json").exists():
        from hiermem.data import load_documents

        docs = load_documents(recipe.source, "train", **_doc_options(recipe.data))
        options = {k: v for k, v in recipe.tokenizer.items() if k != "path"}
        log.info("training a %s tokenizer (%s) on %d documents", options.get("type", "bpe"), options, len(docs))
        train_tokenizer((d.text for d in docs), folder, **options)
    acc.wait_for_everyone()
    return load_tokenizer(folder)


def _doc_options(data: dict) -> dict:
    keys = ("text_column", "prompt_column", "completion_column", "hf_config", "hf_split", "streaming",
            "validation_fraction", "test_fraction", "split_files")
    return {k: v for k, v in data.items() if k in keys}


def build_model(model_type: str, options: dict, tokenizer):
    """A fresh model of ``model_type`` whose vocabulary and special ids match ``tokenizer``."""
    from hiermem.models import model_spec

    spec = model_spec(model_type)
    if spec.pretrained_backbone:
        raise ConfigError(f"{model_type} wraps a pretrained backbone: train it with its own recipe "
                          f"(hiermem train {model_type})")
    config_cls = spec.config_class()
    names = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(options) - names)
    if unknown:
        raise ConfigError(f"unknown {model_type} model option(s) {unknown}; known: {', '.join(sorted(names))}")
    from_tokenizer = {"vocab_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id,
                      "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id,
                      "tokenizer": str(getattr(tokenizer, "name_or_path", "") or "")}
    values = {**{k: v for k, v in from_tokenizer.items() if k in names}, **options}
    if "vocab_size" in names and values["vocab_size"] != len(tokenizer):
        raise ConfigError(f"the model's vocab_size ({values['vocab_size']}) does not match the tokenizer's "
                          f"{len(tokenizer)} tokens; leave vocab_size unset or train a tokenizer of that size")
    model = spec.model_class()(config_cls(**values))
    model.tokenizer = tokenizer
    return model


def train_from_scratch(recipe: ScratchRecipe, resume: bool = True, accelerator=None, model=None) -> dict:
    """Run the recipe (resumable) and write ``<output_dir>/final``; return a summary whose
    ``status`` is "completed", "budget", "early_stopped" or "interrupted" (with ``signal``).

    model: train this model (with its ``.tokenizer``, e.g. one carrying LoRA adapters) instead of a
    fresh one of ``recipe.model_type`` (fine-tuning); ``recipe.model`` and ``recipe.tokenizer`` are then unused."""
    from hiermem.data import StreamLoader, WindowLoader, build_corpus

    out = Path(recipe.output_dir)
    acc = accelerator or make_accelerator(recipe.device)
    cfg = recipe.training
    kind = "scratch" if model is None else "finetune"
    if model is None:
        tokenizer = _tokenizer(recipe, out, acc)
        torch.manual_seed(cfg.seed)  # the same initial weights for the same seed
        model = build_model(recipe.model_type, recipe.model, tokenizer)
    tokenizer = model.tokenizer
    model = model.to(acc.device)
    corpora = {}
    with acc.main_process_first():
        for split in ("train", "validation"):
            try:
                corpora[split] = build_corpus(recipe.source, tokenizer, split=split, **recipe.data)
            except DataError as exc:
                if split == "train":
                    raise
                log.warning("training without validation: %s; raise --validation-fraction or add documents",
                            str(exc).split("; ")[0])  # the data layer's hint speaks of split='all'
    common = dict(seed=cfg.seed, rank=acc.process_index, world_size=acc.num_processes)

    def make(corpus, batch_size):
        if cfg.carry_state:
            return StreamLoader(corpus, recipe.window, batch_size, **common)
        return WindowLoader(corpus, recipe.window, batch_size=batch_size, straddle=recipe.straddle, **common)

    train = make(corpora["train"], cfg.batch_size)
    val = None
    if corpora.get("validation") is not None:
        batch = cfg.batch_size
        if cfg.carry_state:  # one document per stream row: a small split streams fewer rows side by side
            usable = int((corpora["validation"].lengths >= recipe.window).sum()) // acc.num_processes
            batch = max(1, min(batch, usable))
        try:
            val = make(corpora["validation"], batch)
        except DataError as exc:
            log.warning("no validation (%s)", exc)
    hparams = {"recipe": kind, "model_type": recipe.model_type, "source": recipe.source, "data": recipe.data,
               "window": recipe.window, "tokenizer": recipe.tokenizer, "straddle": recipe.straddle}
    trainer = Trainer(model, cfg, train, val, output_dir=out / "checkpoints", hparams=hparams, accelerator=acc,
                      tokenizer=tokenizer)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("%s: %s parameters, windows of %d tokens, %s", recipe.model_type, f"{n_params:,}", recipe.window,
             "carried state" if cfg.carry_state else "independent windows")
    result = trainer.fit(resume=resume)
    summary = {"recipe": kind, "model_type": recipe.model_type, "source": recipe.source, "parameters": n_params,
               "model": model.config.to_dict(), "train_config": cfg.to_dict(), "window": recipe.window,
               "status": result.status, "steps": result.step, "best_val_loss": result.best_metric,
               "best_step": result.best_step, "val_history": result.evaluations, "tokens": result.tokens,
               "tokens_per_second_this_run": round(result.tokens_per_second, 2),
               "train_seconds": round(result.train_seconds, 2), "processes": acc.num_processes,
               "device": str(acc.device), "python": sys.version.split()[0], "torch": torch.__version__,
               "platform": platform.platform()}
    if result.status == "interrupted":
        summary["signal"] = result.signal
    else:
        summary["weights_from_step"] = trainer.export(result, out / "final")
        summary["final"] = str(out / "final")
    if acc.is_main_process:
        atomic_write_json(out / "train_summary.json", summary)
    return summary
