"""The ``hiermem train`` subcommand."""

from __future__ import annotations

import json
import logging
from typing import Literal

from hiermem.errors import ConfigError
from hiermem.training.config import TrainConfig
from hiermem.training.recipes import HMTRecipe, train_hmt
from hiermem.training.trainer import make_accelerator

log = logging.getLogger(__name__)


def _split_files(items: list[str]) -> dict[str, str] | None:
    out = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"--split-files takes SPLIT=FILE pairs (e.g. validation=val_ids.txt), got {item!r}")
        out[name] = path
    return out or None


def run_on_processes(run, device: str | None):
    """``run(accelerator)`` on this process (one of several under torchrun / accelerate launch);
    only the first process logs and reports. Returns (the run's summary, whether this process reports)."""
    acc = make_accelerator(device)
    if not acc.is_main_process:
        logging.getLogger("hiermem").setLevel(logging.WARNING)
    return run(acc), acc.is_main_process


def exit_code(summary: dict, output_dir=None) -> int:
    """0, or 128 + the signal that interrupted the run; with ``output_dir`` it also says how to resume."""
    if summary["status"] != "interrupted":
        return 0
    if output_dir is not None:
        print(f"interrupted: checkpoint saved under {output_dir}; run the same command again to resume")
    return 128 + int(summary["signal"])


def train(
    model: Literal["hmt"],
    config: str | None = None,
    output_dir: str = "runs/hmt",
    backbone: str = "smollm2-135m",
    source: str = "shakespeare",
    text_column: str = "text",
    prompt_column: str | None = None,
    completion_column: str | None = None,
    hf_config: str | None = None,
    hf_split: str | None = None,
    streaming: bool = False,
    validation_fraction: float = 0.1,
    test_fraction: float = 0.1,
    split_files: list[str] = [],  # noqa: B006 (read-only default, shown in --help)
    straddle: bool = False,
    carry_state: bool = False,
    curriculum: list[int] = [],  # noqa: B006
    task: Literal["lm", "passkey", "needle", "recall"] = "lm",
    steps: int | None = None,
    stage1_steps: int = 150,
    stage2_steps: int = 150,
    stage2_segments: int = 6,
    batch_size: int = 1,
    grad_accum: int = 1,
    lr: float = 1e-3,
    schedule: Literal["constant", "cosine", "linear", "step"] = "step",
    warmup: int = 10,
    decay_every: int = 50,
    decay_gamma: float = 0.8,
    min_lr_ratio: float = 0.1,
    weight_decay: float = 0.0,
    clip: float = 1.0,
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto",
    trainable: Literal["default", "memory", "lora", "full"] = "default",
    lora_r: int = 8,
    lora_alpha: int = 16,
    lora_targets: list[str] = ["q_proj", "v_proj"],  # noqa: B006
    gradient_checkpointing: bool = False,
    loss_skip_segments: int = 0,
    segment_length: int = 256,
    sensory_length: int = 32,
    cache_size: int = 300,
    eviction: Literal["fifo", "attention"] = "fifo",
    bptt_depth: int | None = None,
    memory_projection: Literal["none", "rmsnorm", "linear"] = "none",
    segment_bos: bool | None = None,
    summary_source: Literal["previous", "segment"] = "previous",
    eval_every: int = 50,
    eval_batches: int = 16,
    save_every: int = 25,
    keep_last: int = 2,
    max_nonfinite: int = 10,
    log_every: int = 10,
    patience: int = 0,
    seed: int = 0,
    resume: bool = True,
    init: str | None = None,
    device: str | None = None,
    tensorboard: bool = True,
    progress: bool = True,
    wandb_project: str | None = None,
    wandb_run_name: str | None = None,
) -> int:
    """Train a model: HMT's two-stage recipe (stage 1 without recall on 2-segment windows, then full
    HMT on a longer unroll, initialised from stage 1), each stage resumable.

    Defaults fit the bundled SmolLM2-135M on a small CPU (about half an hour for both stages on an
    idle 2-core CPU, ~150 / ~110 supervised tokens/s in stage 1 / 2): memory parameters only, segments of 256 tokens with 32 sensory tokens, 150 steps of one window per
    stage (stage 2 unrolls 6 segments), AdamW at lr 1e-3 with 10 warm-up steps then step decay (x0.8
    every 50 steps), clipping at 1.0, validation perplexity on 16 windows every 50 steps, checkpoints
    every 25 steps. Output: <output-dir>/stage1, <output-dir>/stage2 (checkpoints, best/, tensorboard/),
    <output-dir>/final (the trained model) and <output-dir>/train_summary.json. Run it again to resume;
    SIGINT/SIGTERM save a checkpoint and exit with status 130/143. Several processes:
    torchrun --nproc_per_node N -m hiermem train hmt ... (or accelerate launch -m hiermem train ...).

    --config FILE reads these options from a YAML file (flat, or in sections such as data,
    training, model); options given on the command line override it.

    Args:
        model: what to train ("hmt": the two-stage HMT recipe; other model types train from scratch)
        config: YAML file of options, or the name of a bundled recipe
        output_dir: run folder (checkpoints, logs, final weights)
        backbone: bundled backbone name, local Hugging Face folder, or .gguf file
        source: built-in corpus, .txt file or folder, .jsonl/.parquet/.csv table, or hf:<dataset>
        text_column: table / dataset column holding the text
        prompt_column: build each document from this column + completion_column instead
        completion_column: see prompt_column
        hf_config: configuration name of an hf: dataset
        hf_split: split of an hf: dataset, slices included (e.g. train[:2000])
        streaming: stream an hf: dataset instead of loading it whole
        validation_fraction: share of documents held out for validation (stable hash of the id)
        test_fraction: share of documents held out for testing
        split_files: SPLIT=FILE pairs listing document ids per split (instead of hashing)
        straddle: let training windows cross document boundaries
        carry_state: read each document in order and carry the memory (bank, sensory tokens), detached,
            from window to window, as at inference: recall sees up to N slots and evictions happen
        curriculum: stage-2 unrolls in segments (e.g. 3 6 12): one phase each, stage-2 steps split evenly
        task: what to learn: language modelling on --source, or recall: a pass key / needle sentence hidden
            in --source's text beyond the attention window, loss on the answer (recall = both); sample
            length = the phase's window, so --curriculum grows the haystacks
        steps: optimizer steps of each stage (sets --stage1-steps and --stage2-steps)
        stage1_steps: optimizer steps of stage 1 (0 skips it)
        stage2_steps: optimizer steps of stage 2 (0 skips it)
        stage2_segments: segments per stage-2 window (>= 3)
        batch_size: windows per batch and process
        grad_accum: batches accumulated per optimizer step
        lr: peak learning rate (AdamW)
        schedule: learning-rate decay after warm-up
        warmup: linear warm-up steps
        decay_every: step schedule: steps between decays
        decay_gamma: step schedule: factor applied at each decay
        min_lr_ratio: cosine/linear schedules: final learning rate as a fraction of lr
        weight_decay: AdamW weight decay
        clip: gradient-norm clipping (0 = off)
        precision: autocast precision (auto = bf16 on CUDA, fp32 on CPU; bf16 works on CPU too)
        trainable: parameters to train: HMT memory only (default), memory + LoRA adapters, or everything
        lora_r: LoRA rank (with --trainable lora)
        lora_alpha: LoRA alpha (with --trainable lora)
        lora_targets: backbone modules that get LoRA adapters (with --trainable lora)
        gradient_checkpointing: recompute backbone activations in backward (less memory, slower)
        loss_skip_segments: leading segments of each window left out of the loss (memory warm-up)
        segment_length: HMT segment length L (new tokens per segment)
        sensory_length: HMT sensory memory k (tokens repeated from the previous segment)
        cache_size: HMT long-term memory slots N
        eviction: HMT memory eviction policy
        bptt_depth: truncate backpropagation through memory after this many segments
        memory_projection: map from hidden state to memory embedding
        segment_bos: start every backbone call with BOS (unset: on when the backbone has a BOS token,
            so the memory embedding does not take the attention-sink position 0)
        summary_source: what the recall query summarises: the previous segment's last tokens (causal:
            any split of a document and generation give the logits of one call) or the segment's own
            first tokens (the paper; its first positions are scored on tokens the query has seen)
        eval_every: steps between validations (0 = only at the end)
        eval_batches: validation batches per evaluation
        save_every: steps between checkpoints (0 = only at the end)
        keep_last: periodic checkpoints kept per stage (the best weights are kept apart)
        max_nonfinite: stop after this many consecutive steps with a non-finite loss (each is skipped)
        log_every: steps between log lines and TensorBoard points
        patience: stop a stage after this many validations without improvement (0 = never)
        seed: random seed (model, data order)
        resume: continue from the newest checkpoint of each stage when there is one
        init: start from these HMT weights (a folder written by save_pretrained or a release name)
        device: cpu, cuda or auto (under torchrun/accelerate each process takes its own device)
        tensorboard: write TensorBoard logs to <stage folder>/tensorboard
        progress: show a progress bar on a terminal (log lines otherwise)
        wandb_project: log to this Weights & Biases project (needs pip install wandb)
        wandb_run_name: W&B run name
    """
    if steps is not None:
        stage1_steps = stage2_steps = steps
    if stage1_steps < 0 or stage2_steps < 0:
        raise ConfigError("stage step counts must be >= 0 (0 skips a stage)")
    common = dict(batch_size=batch_size, grad_accum=grad_accum, lr=lr, schedule=schedule, warmup=warmup,
                  decay_every=decay_every, decay_gamma=decay_gamma, min_lr_ratio=min_lr_ratio,
                  weight_decay=weight_decay, clip=clip, max_nonfinite=max_nonfinite, log_every=log_every,
                  precision=precision, trainable=trainable, gradient_checkpointing=gradient_checkpointing,
                  loss_skip_segments=loss_skip_segments, eval_every=eval_every, eval_batches=eval_batches,
                  save_every=save_every, keep_last=keep_last, patience=patience, seed=seed,
                  tensorboard=tensorboard, progress=progress, wandb_project=wandb_project,
                  wandb_run_name=wandb_run_name)
    stage_cfg = [TrainConfig(steps=n, **common) if n else None for n in (stage1_steps, stage2_steps)]
    model = dict(segment_length=segment_length, sensory_length=sensory_length, cache_size=cache_size,
                 eviction=eviction, bptt_depth=bptt_depth, memory_projection=memory_projection,
                 segment_bos=segment_bos, summary_source=summary_source)
    if trainable == "lora":
        model["lora"] = {"r": lora_r, "alpha": lora_alpha, "target_modules": list(lora_targets)}
    data = dict(text_column=text_column, prompt_column=prompt_column, completion_column=completion_column,
                hf_config=hf_config, hf_split=hf_split, streaming=streaming,
                validation_fraction=validation_fraction, test_fraction=test_fraction,
                split_files=_split_files(split_files))
    plan = HMTRecipe(output_dir=output_dir, backbone=backbone, source=source, data=data, model=model,
                     stage1=stage_cfg[0], stage2=stage_cfg[1], stage2_segments=stage2_segments,
                     straddle=straddle, init=init, device=device, carry_state=carry_state,
                     curriculum=[int(n) for n in curriculum], task=task)
    summary, reports = run_on_processes(lambda acc: train_hmt(plan, resume=resume, accelerator=acc), device)
    if not reports:
        return exit_code(summary)
    for name, stage in summary["stages"].items():
        best = stage["best_val_ppl"]
        val = (f"best validation perplexity {round(best, 3)} (step {stage['best_step']})" if best is not None
               else "no validation ran")
        print(f"{name}: {stage['status']} at step {stage['steps']}, {val}, "
              f"{stage['tokens_per_second_this_run']} supervised tok/s")
    if summary["status"] == "interrupted":
        return exit_code(summary, output_dir)
    print(f"final weights: {summary['final']}")
    log.debug("summary: %s", json.dumps(summary, default=str))
    return 0


def parse_assignments(items: list[str]) -> dict:
    """``["hidden_size=128", "dropout=0.1"]`` -> {"hidden_size": 128, "dropout": 0.1} (YAML scalars)."""
    import yaml

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set takes KEY=VALUE pairs (e.g. hidden_size=128), got {item!r}")
        out[key.strip()] = yaml.safe_load(value) if value.strip() else None
    return out


def train_model(
    model: str,
    config: str | None = None,
    model_options: dict | None = None,
    set: list[str] = [],  # noqa: A002, B006 (read-only default, shown in --help)
    output_dir: str | None = None,
    source: str = "shakespeare",
    text_column: str = "text",
    validation_fraction: float = 0.1,
    test_fraction: float = 0.1,
    tokenizer: str | None = None,
    tokenizer_type: Literal["bpe", "unigram", "char", "word", "byte"] = "bpe",
    vocab_size: int = 8000,
    window: int = 256,
    carry_state: bool = False,
    straddle: bool = False,
    steps: int = 1000,
    max_minutes: float | None = None,
    batch_size: int = 8,
    grad_accum: int = 1,
    lr: float = 1e-3,
    schedule: Literal["constant", "cosine", "linear", "step"] = "cosine",
    schedule_by: Literal["steps", "time"] = "steps",
    warmup: int = 50,
    min_lr_ratio: float = 0.1,
    weight_decay: float = 0.1,
    betas: list[float] = [0.9, 0.95],  # noqa: B006
    clip: float = 1.0,
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto",
    eval_every: int = 200,
    eval_batches: int = 16,
    save_every: int = 200,
    keep_last: int = 2,
    patience: int = 0,
    log_every: int = 20,
    seed: int = 0,
    resume: bool = True,
    device: str | None = None,
    tensorboard: bool = True,
    progress: bool = True,
    wandb_project: str | None = None,
    wandb_run_name: str | None = None,
) -> int:
    """Train a model from scratch (every registered family without a pretrained backbone, e.g.
    transformer): a tokenizer trained on the training split (or --tokenizer FOLDER), the model
    built to match it, then the shared trainer. Run the same command again to resume.

    --config FILE reads a YAML file with sections (model, tokenizer, data, training, optimization,
    checkpoint, logging); keys of the sections are the options below (model: the model's config
    fields; tokenizer: path, type, vocab_size). An unknown key is an error naming it; options given
    on the command line override the file. Output: <output-dir>/tokenizer, checkpoints/, final/,
    train_summary.json. Bundled recipes: --config transformer-cpu (see hiermem/configs/).

    Args:
        model: model family to train (a registered model type, e.g. transformer)
        config: YAML recipe file, or the name of a bundled one (e.g. transformer-cpu)
        model_options: model config fields (the YAML file's model section)
        set: model config fields as KEY=VALUE pairs, e.g. --set hidden_size=128 num_layers=2
        output_dir: run folder (default: runs/MODEL)
        source: built-in corpus, .txt file or folder, .jsonl/.parquet/.csv table, or hf:<dataset>
        text_column: table / dataset column holding the text
        validation_fraction: share of documents held out for validation (stable hash of the id)
        test_fraction: share of documents held out for testing
        tokenizer: an existing tokenizer folder (written by `hiermem tokenizer train`) instead of training one
        tokenizer_type: SentencePiece model type of the tokenizer trained for this run
        vocab_size: vocabulary size of the tokenizer trained for this run
        window: tokens per training window (the truncated-BPTT window with --carry-state)
        carry_state: read documents in order and carry the model's state across windows
        straddle: let training windows cross document boundaries (without --carry-state)
        steps: optimizer steps
        max_minutes: stop after this much training time (validation excluded), even before --steps (with
            --schedule-by time: in total over all resumes)
        batch_size: windows per batch and process
        grad_accum: batches accumulated per optimizer step
        lr: peak learning rate (AdamW)
        schedule: learning-rate decay after warm-up
        schedule_by: cosine/linear decay over --steps, or over the --max-minutes training time (time)
        warmup: linear warm-up steps
        min_lr_ratio: cosine/linear schedules: final learning rate as a fraction of lr
        weight_decay: AdamW weight decay (matrices only; norms and biases never decay)
        betas: AdamW betas
        clip: gradient-norm clipping (0 = off)
        precision: autocast precision (auto = bf16 on CUDA, fp32 on CPU)
        eval_every: steps between validations (0 = only at the end)
        eval_batches: validation batches per evaluation
        save_every: steps between checkpoints (0 = only at the end)
        keep_last: periodic checkpoints kept (the best weights are kept apart)
        patience: stop after this many validations without improvement (0 = never)
        log_every: steps between log lines and TensorBoard points
        seed: random seed (initial weights, data order)
        resume: continue from the newest checkpoint in the run folder when there is one
        device: cpu, cuda or auto
        tensorboard: write TensorBoard logs to <output-dir>/checkpoints/tensorboard
        progress: show a progress bar on a terminal (log lines otherwise)
        wandb_project: log to this Weights & Biases project (needs pip install wandb)
        wandb_run_name: W&B run name
    """
    from hiermem.training.scratch import ScratchRecipe, train_from_scratch

    options = {**(model_options or {}), **parse_assignments(list(set))}
    tok = {"path": tokenizer} if tokenizer else {"type": tokenizer_type, "vocab_size": vocab_size}
    cfg = TrainConfig(steps=steps, max_minutes=max_minutes, batch_size=batch_size, grad_accum=grad_accum, lr=lr,
                      schedule=schedule, schedule_by=schedule_by, warmup=warmup, min_lr_ratio=min_lr_ratio,
                      weight_decay=weight_decay, betas=betas, clip=clip, precision=precision, trainable="full",
                      carry_state=carry_state,
                      eval_every=eval_every, eval_batches=eval_batches, save_every=save_every, keep_last=keep_last,
                      patience=patience, log_every=log_every, seed=seed, tensorboard=tensorboard, progress=progress,
                      wandb_project=wandb_project, wandb_run_name=wandb_run_name)
    if window < 2:
        raise ConfigError(f"window must be >= 2 tokens, got {window}")
    _match_bptt_window(model, options, window)
    recipe = ScratchRecipe(model_type=model, output_dir=output_dir or f"runs/{model}", source=source,
                           data={"text_column": text_column, "validation_fraction": validation_fraction,
                                 "test_fraction": test_fraction},
                           model=options, tokenizer=tok, training=cfg, window=window, straddle=straddle,
                           device=device)
    summary, reports = run_on_processes(lambda acc: train_from_scratch(recipe, resume=resume, accelerator=acc),
                                        device)
    if not reports:
        return exit_code(summary)
    last = summary["val_history"][-1] if summary["val_history"] else {}
    bpb = f", {last['val_bpb']:.4f} bits per byte" if "val_bpb" in last else ""
    val = f"last validation loss {last['val_loss']:.4f}{bpb}" if "val_loss" in last else "no validation ran"
    print(f"{model}: {summary['status']} at step {summary['steps']} ({summary['parameters']:,} parameters, "
          f"{summary['tokens_per_second_this_run']} tok/s); {val}")
    if summary["status"] == "interrupted":
        return exit_code(summary, recipe.output_dir)
    print(f"final weights: {summary['final']}")
    return 0


def _match_bptt_window(model_type: str, options: dict, window: int) -> None:
    """A model whose config names its truncated-BPTT window (``n_ctx``) trains on windows of that size."""
    import dataclasses

    from hiermem.models import model_spec

    if "n_ctx" not in {f.name for f in dataclasses.fields(model_spec(model_type).config_class())}:
        return
    options.setdefault("n_ctx", window)
    if options["n_ctx"] != window:
        raise ConfigError(f"model n_ctx ({options['n_ctx']}) is the truncated-BPTT window and must equal the "
                          f"training window ({window}); set one of them, or both to the same value")


# the YAML sections whose body goes to one dict option instead of being flattened into options
train_model.config_dict_sections = {"model": "model_options"}
train_model.config_renames = {"tokenizer.path": "tokenizer", "tokenizer.type": "tokenizer_type",
                              "tokenizer.vocab_size": "vocab_size", "tokenizer.model_type": "tokenizer_type",
                              # the key names of the HRMLM seed project's config files
                              "training.learning_rate": "lr", "training.warmup_steps": "warmup",
                              "training.max_steps": "steps", "training.grad_clip": "clip",
                              "training.lr_scheduler": "schedule", "training.eval_steps": "eval_every",
                              "training.save_steps": "save_every", "checkpoint.save_every": "save_every",
                              "training.gradient_accumulation_steps": "grad_accum",
                              "optimization.gradient_accumulation_steps": "grad_accum",
                              "dataset.batch_size": "batch_size", "dataset.sequence_length": "window",
                              "checkpoint.save_dir": "output_dir"}


def train_function(model_type: str):
    """The training entry of a model type: HMT's two-stage recipe, or the from-scratch recipe."""
    import importlib

    from hiermem.models import model_spec

    spec = model_spec(model_type)  # unknown types: a clear error listing the known ones
    if spec.recipe is None:
        return train_model
    module, name = spec.recipe.split(":")
    return getattr(importlib.import_module(module), name)
