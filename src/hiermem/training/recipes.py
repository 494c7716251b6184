"""Training recipes: HMT's two stages (arXiv 2405.06067) on top of the one :class:`Trainer`.

Stage 1 trains HMT with recall switched off (RMT + sensory memory: P_n = m_{n-1}) on windows of
2 segments; stage 2 trains full HMT, initialised from stage 1's weights, on a longer unroll. Stage 2
needs at least 3 segments: with 2, recall sees a single cached memory, its softmax is constant and
Wq, Wk and the summary prompt get no gradient.

Output folder layout::

    <output_dir>/stage1/   step-*/ best/ tensorboard/ final/   (stage-1 run; final = its weights)
    <output_dir>/stage2/   step-*/ best/ tensorboard/
    <output_dir>/final/    the trained model (save_pretrained; loads with hiermem.models.load_model)
    <output_dir>/train_summary.json
"""

from __future__ import annotations

import logging
import platform
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from hiermem.errors import ConfigError, DataError
from hiermem.io import atomic_write_json
from hiermem.training.config import TrainConfig
from hiermem.training.trainer import Trainer, TrainResult, make_accelerator

log = logging.getLogger(__name__)

STAGE1_SEGMENTS = 2


@dataclass
class HMTRecipe:
    """What the two-stage recipe trains on and how long each stage runs.

    model: HMTConfig fields shared by both stages (segment/sensory length, cache size, eviction,
        bptt depth, memory projection, lora). stage1/stage2: the trainer settings of each stage
        (None skips a stage). stage2_segments: unroll of stage 2 (>= 3).
    data: keyword options of ``hiermem.data.build_corpus`` (text column, splits, ...).
    straddle: let windows cross document boundaries. init: start from these HMT weights.
    """

    output_dir: str | Path
    backbone: str = "smollm2-135m"
    source: str = "shakespeare"
    data: dict = field(default_factory=dict)
    model: dict = field(default_factory=dict)
    stage1: TrainConfig | None = field(default_factory=TrainConfig)
    stage2: TrainConfig | None = field(default_factory=TrainConfig)
    stage2_segments: int = 6
    straddle: bool = False
    init: str | None = None
    device: str | None = None

    def validate(self) -> None:
        if self.stage1 is None and self.stage2 is None:
            raise ConfigError("both stages are skipped: nothing to train")
        if self.stage2_segments < 3:
            raise ConfigError(f"stage2_segments must be >= 3, got {self.stage2_segments}: with fewer segments "
                              "stage-2 recall sees one cached memory and passes no gradient to its weights")
        if self.model.get("stage") is not None:
            raise ConfigError("the HMT recipe sets the stage itself; leave 'stage' out of the model options")


def _load_backbone(recipe: HMTRecipe, device):
    from hiermem.backbones import load_backbone

    return load_backbone(recipe.backbone, device=device, dtype=torch.float32)  # fp32 master weights


def _build_model(recipe: HMTRecipe, stage: int, init: Path | None, bb):
    from hiermem.models.hmt import HMT, HMTConfig

    if init is not None:
        return HMT.from_pretrained(init, backbone=bb, stage=stage, **recipe.model)
    cfg = HMTConfig(**{"backbone": recipe.backbone, **recipe.model, "stage": stage})
    return HMT(bb.model, cfg, bos_token_id=bb.tokenizer.bos_token_id)


def _loaders(recipe: HMTRecipe, corpora: dict, window: int, cfg: TrainConfig, acc):
    from hiermem.data import WindowLoader

    common = dict(window_tokens=window, batch_size=cfg.batch_size, seed=cfg.seed, straddle=recipe.straddle,
                  rank=acc.process_index, world_size=acc.num_processes)
    train = WindowLoader(corpora["train"], **common)
    val = None
    if corpora.get("validation") is not None:
        try:
            val = WindowLoader(corpora["validation"], **common)
        except DataError as exc:
            log.warning("no validation for this stage (%s)", exc)
    return train, val


def _corpora(recipe: HMTRecipe, tokenizer, acc) -> dict:
    from hiermem.data import build_corpus

    out = {}
    with acc.main_process_first():  # the first process writes the token cache, the others reuse it
        out["train"] = build_corpus(recipe.source, tokenizer, split="train", **recipe.data)
        try:
            out["validation"] = build_corpus(recipe.source, tokenizer, split="validation", **recipe.data)
        except DataError as exc:  # the data layer's hint speaks of split='all', which training has no use for
            log.warning("training without validation, best checkpoint or early stopping: %s; raise "
                        "--validation-fraction, add documents, or list validation ids with --split-files "
                        "validation=FILE", str(exc).split("; ")[0])
            out["validation"] = None
    return out


def _stage_summary(result: TrainResult, cfg: TrainConfig, segments: int, window: int) -> dict:
    return {"status": result.status, "steps": result.step, "segments": segments, "window_tokens": window,
            "train_config": cfg.to_dict(),
            "best_val_ppl": result.best_metric, "best_step": result.best_step,
            "val_history": result.evaluations, "nonfinite_steps": result.nonfinite_steps,
            "supervised_tokens": result.tokens, "tokens_per_second_this_run": round(result.tokens_per_second, 2)}


def train_hmt(recipe: HMTRecipe, resume: bool = True, accelerator=None) -> dict:
    """Run both stages (each resumable) and write ``<output_dir>/final``; return a summary.

    The summary's ``status`` is "completed", or "interrupted" (with ``signal``) when a signal
    stopped a stage after saving its checkpoint. ``accelerator``: from :func:`make_accelerator`
    (default: one for ``recipe.device``).
    """
    recipe.validate()
    out = Path(recipe.output_dir)
    acc = accelerator or make_accelerator(recipe.device)
    device = acc.device
    backbone = _load_backbone(recipe, device)
    corpora = _corpora(recipe, backbone.tokenizer, acc)
    summary = {"recipe": "hmt", "backbone": recipe.backbone, "source": recipe.source, "data": recipe.data,
               "model": recipe.model, "processes": acc.num_processes, "device": str(device),
               "python": sys.version.split()[0], "torch": torch.__version__, "platform": platform.platform(),
               "stages": {}, "status": "completed"}
    init = None
    if recipe.init:
        from hiermem.models import released_weights

        init = released_weights(recipe.init) or Path(recipe.init)
    stages = [(s, c, n) for s, c, n in ((1, recipe.stage1, STAGE1_SEGMENTS), (2, recipe.stage2, recipe.stage2_segments))
              if c is not None]
    for stage, cfg, segments in stages:
        # a stage may inject adapters into its backbone: the next stage loads a fresh one
        model = _build_model(recipe, stage, init, backbone or _load_backbone(recipe, device))
        backbone = None
        seg = model.config.segment_length
        window = segments * seg
        train, val = _loaders(recipe, corpora, window, cfg, acc)
        hparams = {"recipe": "hmt", "stage": stage, "segments": segments, "window_tokens": window,
                   "backbone": recipe.backbone, "source": recipe.source, "data": recipe.data,
                   "straddle": recipe.straddle, "init": str(init) if init else None}
        trainer = Trainer(model, cfg, train, val, output_dir=out / f"stage{stage}", hparams=hparams, accelerator=acc)
        log.info("HMT stage %d: %d steps on windows of %d segments x %d tokens", stage, cfg.steps, segments, seg)
        result = trainer.fit(resume=resume)
        summary["stages"][f"stage{stage}"] = stage_summary = _stage_summary(result, cfg, segments, window)
        if result.status == "interrupted":
            summary.update(status="interrupted", signal=result.signal)
            break
        init = out / "final" if stage == stages[-1][0] else out / f"stage{stage}" / "final"
        stage_summary["weights_from_step"] = trainer.export(result, init)
        del trainer, model
    if summary["status"] == "completed":
        summary["final"] = str(out / "final")
    if acc.is_main_process:
        atomic_write_json(out / "train_summary.json", summary)
    return summary
