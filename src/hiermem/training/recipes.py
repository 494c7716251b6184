"""Training recipes: HMT's two stages (arXiv 2405.06067) on top of the one :class:`Trainer`.

Stage 1 trains HMT with recall switched off (RMT + sensory memory: P_n = m_{n-1}) on windows of
2 segments; stage 2 trains full HMT, initialised from stage 1's weights, on a longer unroll. Stage 2
needs at least 3 segments: with 2, recall sees a single cached memory, its softmax is constant and
Wq, Wk and the summary prompt get no gradient.

With ``carry_state`` (the regime HMT is evaluated in) each document is read in order, window after
window, and the memory state (bank, sensory tokens, last memory) is carried, detached, from one
window to the next: recall sees up to N slots and evictions happen in training as at inference.
The window is then the truncated-BPTT unroll; ``curriculum`` runs stage 2 in phases of growing
unrolls (e.g. 3, 6, 12 segments), each initialised from the one before.

Output folder layout::

    <output_dir>/stage1/   step-*/ best/ tensorboard/ final/   (stage-1 run; final = its weights)
    <output_dir>/stage2/   step-*/ best/ tensorboard/          (stage2-uN/ per curriculum phase)
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
from hiermem.training.recall_task import TRAIN_TASKS, RecallTaskLoader
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
    carry_state: read documents in order and carry the memory across windows (one document per
        process at a time: the bank's slot count is shared by the rows of a batch).
    curriculum: stage-2 unrolls in segments, one phase each, stage-2 steps split evenly among them.
    task: "lm" (language modelling on the corpus) or a recall task ("passkey", "needle", "recall" =
        both): samples as long as the phase's window, the needle beyond the last segment's attention
        window, loss on the answer only (:mod:`hiermem.training.recall_task`).
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
    carry_state: bool = False
    curriculum: list[int] = field(default_factory=list)
    task: str = "lm"

    def validate(self) -> None:
        if self.stage1 is None and self.stage2 is None:
            raise ConfigError("both stages are skipped: nothing to train")
        if self.stage2_segments < 3:
            raise ConfigError(f"stage2_segments must be >= 3, got {self.stage2_segments}: with fewer segments "
                              "stage-2 recall sees one cached memory and passes no gradient to its weights")
        if any(int(n) < 3 for n in self.curriculum):
            raise ConfigError(f"curriculum unrolls must each be >= 3 segments, got {list(self.curriculum)}")
        if self.curriculum and self.stage2 is not None and self.stage2.steps < len(self.curriculum):
            raise ConfigError(f"stage 2's {self.stage2.steps} steps cannot be split into {len(self.curriculum)} "
                              "curriculum phases")
        if self.task not in ("lm", *TRAIN_TASKS):
            raise ConfigError(f"unknown task {self.task!r}; choose lm, {', '.join(TRAIN_TASKS)}")
        if self.task != "lm" and (self.carry_state or self.straddle):
            raise ConfigError("a recall task reads each sample whole from empty memory: drop --carry-state and "
                              "--straddle")
        if self.carry_state and self.straddle:
            raise ConfigError("--straddle applies to independent windows; carried-state streams read each "
                              "document whole already")
        batch = [c.batch_size for c in (self.stage1, self.stage2) if c is not None]
        if self.carry_state and max(batch) > 1:
            raise ConfigError("with --carry-state HMT reads one document per process (the memory bank's slot "
                              "count is shared by a batch's rows): use --batch-size 1 and --grad-accum N")
        frozen = (self.stage1 is not None and self.stage1.trainable in ("default", "memory")
                  and self.model.get("memory_projection", "none") == "none")
        if self.carry_state and frozen:
            raise ConfigError("stage 1 with --carry-state and a frozen backbone has nothing to train: its only "
                              "memory parameter, the initial memory, is read at a document's first segment and "
                              "the carried memory replaces it after that. Use --trainable lora (or full), a "
                              "--memory-projection, or --stage1-steps 0")
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


def _pool(corpus, tokenizer) -> list[int]:
    """Every document of a token corpus joined by blank lines: recall tasks' haystack text."""
    from hiermem.evaluation.tasks import haystack_pool

    return haystack_pool(tokenizer, [torch.from_numpy(corpus.document(i).astype("int64")) for i in range(len(corpus))])


def _loaders(recipe: HMTRecipe, corpora: dict, window: int, cfg: TrainConfig, acc, tokenizer=None, far: int = 0):
    """(train, validation or None) loaders of one phase: independent windows, carried-state
    streams, or recall-task samples (validation samples from another split and seed)."""
    from hiermem.data import WindowLoader
    from hiermem.data.stream import StreamLoader

    def make(corpus, split):
        common = dict(batch_size=cfg.batch_size, rank=acc.process_index, world_size=acc.num_processes)
        if recipe.task != "lm":
            return RecallTaskLoader(tokenizer, _pool(corpus, tokenizer), recipe.task, window,
                                    seed=cfg.seed + (split == "validation"), far=far, **common)
        if recipe.carry_state:
            return StreamLoader(corpus, window, seed=cfg.seed, **common)
        return WindowLoader(corpus, window, seed=cfg.seed, straddle=recipe.straddle, **common)

    train = make(corpora["train"], "train")
    val = None
    if corpora.get("validation") is not None:
        try:
            val = make(corpora["validation"], "validation")
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


def _phases(recipe: HMTRecipe) -> list[tuple[int, str, TrainConfig, int]]:
    """(stage, folder name, trainer settings, segments per window) of every phase, in order."""
    phases = []
    if recipe.stage1 is not None:
        phases.append((1, "stage1", recipe.stage1.replace(carry_state=recipe.carry_state), STAGE1_SEGMENTS))
    if recipe.stage2 is not None:
        cfg = recipe.stage2.replace(carry_state=recipe.carry_state)
        if not recipe.curriculum:
            phases.append((2, "stage2", cfg, recipe.stage2_segments))
        n = len(recipe.curriculum)
        for i, unroll in enumerate(recipe.curriculum):
            steps = cfg.steps // n + (1 if i < cfg.steps % n else 0)
            phases.append((2, f"stage2-u{int(unroll)}", cfg.replace(steps=steps, warmup=min(cfg.warmup, steps)),
                           int(unroll)))
    return phases


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
    tokenizer = backbone.tokenizer
    corpora = _corpora(recipe, tokenizer, acc)
    summary = {"recipe": "hmt", "backbone": recipe.backbone, "source": recipe.source, "data": recipe.data,
               "model": recipe.model, "processes": acc.num_processes, "device": str(device),
               "python": sys.version.split()[0], "torch": torch.__version__, "platform": platform.platform(),
               "task": recipe.task, "carry_state": recipe.carry_state, "curriculum": list(recipe.curriculum),
               "stages": {}, "status": "completed"}
    init = None
    if recipe.init:
        from hiermem.models import released_weights

        init = released_weights(recipe.init) or Path(recipe.init)
    stages = _phases(recipe)
    for stage, name, cfg, segments in stages:
        # a stage may inject adapters into its backbone: the next stage loads a fresh one
        model = _build_model(recipe, stage, init, backbone or _load_backbone(recipe, device))
        backbone = None
        seg = model.config.segment_length
        window = segments * seg
        train, val = _loaders(recipe, corpora, window, cfg, acc, tokenizer,
                              far=seg + model.config.sensory_length)
        hparams = {"recipe": "hmt", "stage": stage, "segments": segments, "window_tokens": window,
                   "backbone": recipe.backbone, "source": recipe.source, "data": recipe.data,
                   "straddle": recipe.straddle, "carry_state": recipe.carry_state, "task": recipe.task,
                   "init": str(init) if init else None}
        trainer = Trainer(model, cfg, train, val, output_dir=out / name, hparams=hparams, accelerator=acc)
        log.info("HMT stage %d: %d steps on windows of %d segments x %d tokens", stage, cfg.steps, segments, seg)
        result = trainer.fit(resume=resume)
        summary["stages"][name] = stage_summary = _stage_summary(result, cfg, segments, window)
        if trainer.state_trace:
            stage_summary["carried_state_last"] = trainer.state_trace[-1]
        if result.status == "interrupted":
            summary.update(status="interrupted", signal=result.signal)
            break
        init = out / "final" if name == stages[-1][1] else out / name / "final"
        stage_summary["weights_from_step"] = trainer.export(result, init)
        del trainer, model
    if summary["status"] == "completed":
        summary["final"] = str(out / "final")
    if acc.is_main_process:
        atomic_write_json(out / "train_summary.json", summary)
    return summary
