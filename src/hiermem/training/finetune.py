"""``hiermem finetune`` and ``hiermem merge-lora``: LoRA fine-tuning of a trained from-scratch model
with the one trainer, and folding the adapters back into plain weights.

finetune loads the model folder, adds PEFT LoRA adapters (:mod:`hiermem.models.lora`; ``--lora-r 0``
trains every weight instead), and runs the from-scratch recipe's corpus, loaders and
:class:`~hiermem.training.trainer.Trainer` on it (:func:`~hiermem.training.scratch.train_from_scratch`
with the model given). Output::

    <output>/checkpoints/      step-*/ best/ (adapters only), resumable
    <output>/final/            adapter_config.json + adapter_model.safetensors (plain weights with --lora-r 0)
    <output>/train_summary.json
"""

from __future__ import annotations

import logging
from typing import Literal

from hiermem.errors import ConfigError

log = logging.getLogger(__name__)


def finetune(
    model: str | None = None,
    data: str | None = None,
    output: str | None = None,
    lora_r: int = 8,
    lora_alpha: float = 16,
    finetune_unlock_percent: float = 0.0,
    lora_targets: list[str] = [],  # noqa: B006 (read-only default, shown in --help)
    text_column: str = "text",
    validation_fraction: float = 0.0,
    test_fraction: float = 0.0,
    window: int | None = None,
    carry_state: bool = False,
    straddle: bool = False,
    steps: int = 200,
    max_minutes: float | None = None,
    batch_size: int = 8,
    grad_accum: int = 1,
    lr: float = 1e-3,
    schedule: Literal["constant", "cosine", "linear", "step"] = "cosine",
    warmup: int = 20,
    min_lr_ratio: float = 0.1,
    weight_decay: float = 0.0,
    clip: float = 1.0,
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto",
    eval_every: int = 100,
    eval_batches: int = 8,
    save_every: int = 100,
    keep_last: int = 2,
    log_every: int = 20,
    seed: int = 0,
    resume: bool = True,
    device: str | None = None,
    tensorboard: bool = True,
    progress: bool = True,
) -> int:
    """Fine-tune a trained from-scratch model with LoRA adapters on new text, with the shared
    trainer. Only the adapters (and the unlocked base tensors) train and are saved: <output>/final
    holds adapter_config.json and adapter_model.safetensors; hiermem merge-lora --model
    <output>/final folds them into plain weights. LoRA adapts the Linear layers of transformer,
    hierarchos and hmst; --lora-r 0 trains every weight of any from-scratch model (hrmlm has no
    Linear layer). Run the same command again to resume.

    Args:
        model: the trained model folder (required)
        data: training text: .txt file or folder, .jsonl/.parquet/.csv table, built-in corpus or hf:<dataset> (required)
        output: run folder (required): checkpoints/, final/ (the adapters), train_summary.json
        lora_r: LoRA rank r (0: no adapters, every weight trains and final/ holds plain weights)
        lora_alpha: LoRA alpha (the update is alpha / r * B A)
        finetune_unlock_percent: also train the last base tensors (in model order) holding at least this
            percent of the base parameters (0-100)
        lora_targets: Linear modules to adapt (default: every untied Linear the model applies)
        text_column: table / dataset column holding the text
        validation_fraction: share of documents held out for validation (stable hash of the id)
        test_fraction: share of documents held out for testing
        window: tokens per training window (default: the model's n_ctx, else 256)
        carry_state: read documents in order and carry the model's state across windows
        straddle: let training windows cross document boundaries (without --carry-state)
        steps: optimizer steps
        max_minutes: stop after this much training time, even before --steps
        batch_size: windows per batch and process
        grad_accum: batches accumulated per optimizer step
        lr: peak learning rate (AdamW)
        schedule: learning-rate decay after warm-up
        warmup: linear warm-up steps
        min_lr_ratio: cosine/linear schedules: final learning rate as a fraction of lr
        weight_decay: AdamW weight decay (matrices only)
        clip: gradient-norm clipping (0 = off)
        precision: autocast precision (auto = bf16 on CUDA, fp32 on CPU)
        eval_every: steps between validations (0 = only at the end)
        eval_batches: validation batches per evaluation
        save_every: steps between checkpoints (0 = only at the end)
        keep_last: periodic checkpoints kept (the best weights are kept apart)
        log_every: steps between log lines and TensorBoard points
        seed: random seed (adapter initialisation, data order)
        resume: continue from the newest checkpoint in the run folder when there is one
        device: cpu, cuda or auto
        tensorboard: write TensorBoard logs to <output>/checkpoints/tensorboard
        progress: show a progress bar on a terminal (log lines otherwise)
    """
    import torch

    from hiermem.models import folder_model_type, load_model, model_folder, model_spec
    from hiermem.models.lora import add_lora
    from hiermem.training.config import TrainConfig
    from hiermem.training.scratch import ScratchRecipe, train_from_scratch
    from hiermem.training.cli import exit_code, run_on_processes

    if not model or not data or not output:
        raise ConfigError("finetune needs --model FOLDER, --data SOURCE and --output DIR")
    if not isinstance(lora_r, int) or lora_r < 0:
        raise ConfigError(f"--lora-r must be >= 0 (0: train every weight), got {lora_r!r}")
    if lora_r == 0 and (finetune_unlock_percent or lora_targets):
        raise ConfigError("--lora-r 0 trains every weight: drop --finetune-unlock-percent and --lora-targets")
    folder = model_folder(model)
    if folder is None or model_spec(folder_model_type(folder)).pretrained_backbone:
        raise ConfigError(f"finetune adapts from-scratch models; {model} wraps a pretrained backbone: use "
                          "hiermem train hmt --trainable lora --init FOLDER")
    base = load_model(folder)
    window = window or int(getattr(base.config, "n_ctx", 0) or 256)
    if window < 2:
        raise ConfigError(f"window must be >= 2 tokens, got {window}")
    torch.manual_seed(seed)  # the same adapters for the same seed (resuming needs them)
    if lora_r:
        base = add_lora(base, r=lora_r, alpha=lora_alpha, targets=list(lora_targets) or None,
                        unlock_percent=finetune_unlock_percent, base_folder=folder)
    cfg = TrainConfig(steps=steps, max_minutes=max_minutes, batch_size=batch_size, grad_accum=grad_accum, lr=lr,
                      schedule=schedule, warmup=warmup, min_lr_ratio=min_lr_ratio, weight_decay=weight_decay,
                      clip=clip, precision=precision, trainable="lora" if lora_r else "full",
                      carry_state=carry_state, eval_every=eval_every, eval_batches=eval_batches,
                      save_every=save_every, keep_last=keep_last, log_every=log_every, seed=seed,
                      tensorboard=tensorboard, progress=progress)
    recipe = ScratchRecipe(model_type=base.config.model_type, output_dir=output, source=data,
                           data={"text_column": text_column, "validation_fraction": validation_fraction,
                                 "test_fraction": test_fraction},
                           tokenizer={"path": str(folder / "tokenizer")}, training=cfg, window=window, straddle=straddle, device=device)
    summary, reports = run_on_processes(
        lambda acc: train_from_scratch(recipe, resume=resume, accelerator=acc, model=base), device)
    if not reports:
        return exit_code(summary)
    trained = sum(p.numel() for p in base.parameters() if p.requires_grad)
    last = summary["val_history"][-1] if summary["val_history"] else {}
    val = f"last validation loss {last['val_loss']:.4f}" if "val_loss" in last else "no validation ran"
    print(f"{base.config.model_type}: {summary['status']} at step {summary['steps']} ({trained:,} of "
          f"{summary['parameters']:,} parameters trained); {val}")
    if summary["status"] == "interrupted":
        return exit_code(summary, output)
    if lora_r:
        print(f"adapters: {summary['final']} (merge: hiermem merge-lora --model {summary['final']} --output DIR)")
    else:
        print(f"final weights: {summary['final']}")
    return 0


def merge_lora_command(model: str | None = None, output: str | None = None, base: str | None = None) -> int:
    """Fold LoRA adapters (the <output>/final folder of hiermem finetune) into their base model and
    save plain weights that every command loads. The base must be the model the adapters were
    trained on (checked by a digest of its weights).

    Args:
        model: the adapter folder (adapter_config.json + adapter_model.safetensors) (required)
        output: folder for the merged model (required)
        base: the base model folder (default: the one recorded with the adapters)
    """
    from hiermem.models.lora import merge_lora

    if not model or not output:
        raise ConfigError("merge-lora needs --model ADAPTER_FOLDER and --output DIR")
    merged = merge_lora(model, base=base, out=output)
    print(f"merged {model} into {output} ({merged.config.model_type}, "
          f"{sum(p.numel() for p in merged.parameters()):,} parameters)")
    return 0
