"""The one training loop of hiermem, shared by every model.

A model plugs in through the protocol of :mod:`hiermem.models.base`: ``model(ids, state=...,
labels=ids)`` returns the mean NLL ``.loss``, ``.num_tokens``, named auxiliary losses ``.aux``
(weighted by ``model.aux_weights`` in the objective) and the new ``.state``;
``model.trainable_names(mode)`` and ``model.parameter_groups(...)`` give the optimizer its groups;
``model.save_pretrained(folder)`` writes the weights. Data comes from loaders that yield ``(B, T)``
token windows forever (``hiermem.data.WindowLoader``) or, with ``carry_state``, contiguous
streams whose batches mark the rows that start a new document (``hiermem.data.StreamLoader``);
both expose ``state_dict()`` / ``load_state_dict()``. With ``carry_state`` the model's state is
carried, detached, from one batch to the next (truncated BPTT) and saved with every checkpoint.

Validation reports the NLL per token, perplexity and, when a tokenizer is given, bits per byte of
the text of the scored tokens: summed NLL / (ln 2 * UTF-8 bytes).

Processes and devices come from Hugging Face Accelerate: one process by default, DDP under
``torchrun`` / ``accelerate launch``, FSDP under ``accelerate launch --use_fsdp`` (checkpoints then
hold per-rank shards, see :mod:`hiermem.training.sharded`). Gradients are token-weighted across
micro-batches and processes, so the update equals that of one big batch.
"""

from __future__ import annotations

import contextlib
import logging
import math
import shutil
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate.utils import set_seed

from hiermem.errors import CheckpointError, ConfigError, TrainingError
from hiermem.io import atomic_write_json
from hiermem.training import checkpoint as ckpt
from hiermem.training import sharded
from hiermem.training.config import TrainConfig
from hiermem.training.monitor import Monitor
from hiermem.training.schedules import set_lr

log = logging.getLogger(__name__)

CARRIED_STATE = "trainer_carried_state-{:05d}.safetensors"


@dataclass
class TrainResult:
    """How a run ended. status: "completed", "budget" (``max_minutes`` of training time spent),
    "early_stopped" or "interrupted" (by a signal)."""

    status: str
    step: int
    last_checkpoint: Path | None = None
    best_checkpoint: Path | None = None
    best_metric: float | None = None
    best_step: int | None = None
    nonfinite_steps: int = 0
    tokens: int = 0
    tokens_per_second: float = 0.0
    train_seconds: float = 0.0
    signal: int | None = None
    evaluations: list[dict] = field(default_factory=list)


def make_accelerator(device: torch.device | str | None = None):
    """An Accelerator for ``device`` ("cpu", "cuda", None/"auto" = CUDA when present): under
    torchrun a gloo (CPU) or NCCL (CUDA) process group, each process on its own device.

    Unused parameters are allowed under DDP (e.g. HMT's recall weights in stage 1).
    """
    from accelerate import Accelerator, DistributedDataParallelKwargs

    from hiermem.backbones import resolve_device

    return Accelerator(cpu=resolve_device(None if device is None else str(device)).type == "cpu",
                       kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])


def select_trainable(model: torch.nn.Module, mode: str) -> list[str]:
    """Set ``requires_grad`` for the model's trainable set ``mode``; return the trainable names."""
    names = model.trainable_names(mode)
    if not names:
        raise ConfigError(f"the trainable set {mode!r} selects no parameter of this model")
    chosen = set(names)
    for name, p in model.named_parameters():
        p.requires_grad_(name in chosen)
    return names


def enable_checkpointing(model: torch.nn.Module) -> None:
    """Non-reentrant activation checkpointing of ``model.backbone`` (a Hugging Face model)."""
    backbone = getattr(model, "backbone", None)
    kwargs = {"use_reentrant": False}
    if hasattr(backbone, "activation_checkpointing_enable"):  # transformers >= 5
        backbone.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    elif hasattr(backbone, "gradient_checkpointing_enable"):
        backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        raise ConfigError(f"{type(model).__name__} has no Hugging Face backbone to checkpoint")


def _autocast(device: torch.device, precision: str):
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError("fp16 mixed precision needs CUDA; on CPU use precision bf16 or fp32")
    if precision == "fp32":
        return precision, contextlib.nullcontext
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return precision, lambda: torch.autocast(device_type=device.type, dtype=dtype)


class Trainer:
    """Train ``model`` on ``train_data`` with the settings of ``config``; see :meth:`fit`.

    output_dir: run folder for checkpoints (``step-*``), ``best/`` and ``tensorboard/``; None keeps
        nothing on disk. hparams: extra JSON-able settings saved with every checkpoint (data options,
        recipe stage). accelerator: from :func:`make_accelerator`; default one for the model's device.
    """

    def __init__(self, model: torch.nn.Module, config: TrainConfig, train_data, val_data=None,
                 output_dir: str | Path | None = None, hparams: dict | None = None, accelerator=None,
                 tokenizer=None):
        for name in ("state_dict", "load_state_dict"):
            if not callable(getattr(train_data, name, None)):
                raise ConfigError(f"train_data must provide {name}() (e.g. hiermem.data.WindowLoader) so that "
                                  "runs can resume at the next batch")
        if val_data is not None and config.eval_batches is None and not hasattr(val_data, "__len__"):
            raise ConfigError("eval_batches must be set when the validation loader has no length")
        self.cfg = config
        self.model = model
        self.train_data, self.val_data = train_data, val_data
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self.hparams = dict(hparams or {})
        first = next(model.parameters())
        self.acc = accelerator or make_accelerator(first.device)
        self.sharding = sharded.check_supported(self.acc)  # "fsdp" or None
        self.device = self.acc.device
        self.precision, self.autocast = _autocast(self.device, config.precision)
        self.trainable = select_trainable(model, config.trainable)
        if config.gradient_checkpointing:
            enable_checkpointing(model)
        params = dict(model.named_parameters())
        self.params = [params[n] for n in self.trainable]
        fused = all(p.device.type in ("cpu", "cuda") and p.dtype.is_floating_point for p in self.params)
        groups = model.parameter_groups(self.trainable, config.weight_decay)
        unknown = sorted(set(config.lr_scales) - {g["name"] for g in groups})
        if unknown:
            raise ConfigError(f"lr_scales names unknown parameter groups {unknown}; this model has "
                              f"{[g['name'] for g in groups]}")
        for g in groups:
            g["lr_scale"] = float(config.lr_scales.get(g["name"], 1.0))
        optimizer = torch.optim.AdamW(groups, lr=config.lr, betas=config.betas, eps=config.eps,
                                      weight_decay=config.weight_decay, fused=fused)
        self.tokenizer = tokenizer
        self.aux_weights = dict(getattr(model, "aux_weights", {}) or {})
        self.carried = None  # the model state carried across batches (carry_state)
        self.state_trace: list[dict] = []  # carried-state statistics after each step of this run
        self._val_bytes: int | None = None  # UTF-8 bytes of this process's validation batches
        self._twin = sharded.meta_twin(model) if self.sharding else None  # writes the gathered weights
        self.wrapped, self.optimizer = self.acc.prepare(model, optimizer)
        if self.sharding:  # FSDP replaced the parameters by their shards
            self.params = [p for p in self.wrapped.parameters() if p.requires_grad]
        self.scaler = torch.amp.GradScaler("cuda") if self.precision == "fp16" else None
        self.forward_kwargs = {"return_logits": False}  # the protocol: no (B, T, V) logits kept
        if config.loss_skip_segments:  # HMT's memory warm-up
            self.forward_kwargs["loss_skip_segments"] = config.loss_skip_segments
        self.step = 0
        self.tokens = 0
        self.best_metric: float | None = None
        self.best_step: int | None = None
        self.evals_since_best = 0
        self.nonfinite_total = 0
        self.nonfinite_run = 0
        self.train_seconds = 0.0  # training time over all resumes (the same on every process with max_minutes)
        self.evaluations: list[dict] = []
        self._signal: int | None = None
        self._clock = [0.0, 0]  # training seconds and supervised tokens of the current fit()
        self._val_start = val_data.state_dict() if hasattr(val_data, "state_dict") else None
        n_train = sum(p.numel() for p in self.params)
        log.info("training %s parameters (%s, %.2f%% of %s) on %s x%d, precision %s", f"{n_train:,}",
                 config.trainable, 100 * n_train / sum(p.numel() for p in model.parameters()),
                 type(model).__name__, self.device, self.acc.num_processes, self.precision)

    # --- state ----------------------------------------------------------------------------
    @property
    def is_main(self) -> bool:
        return self.acc.is_main_process

    def _state(self) -> dict:
        return {"step": self.step, "tokens": self.tokens, "best_metric": self.best_metric,
                "best_step": self.best_step, "evals_since_best": self.evals_since_best,
                "nonfinite_total": self.nonfinite_total, "nonfinite_run": self.nonfinite_run,
                "evaluations": self.evaluations, "train_seconds": self.train_seconds, **sharded.describe(self.acc),
                "train_config": self.cfg.to_dict(), "model_config": self.model.config.to_dict(),
                "model_type": type(self.model).__name__, "trainable": self.trainable, "hparams": self.hparams}

    def save(self) -> Path:
        """Write a checkpoint of the current step (all processes must call this)."""
        root = self.output_dir
        name = ckpt.step_dir(root, self.step).name
        tmp = root / f".tmp-{name}"
        if self.is_main:
            ckpt.new_tmp(root, name)
        self.acc.wait_for_everyone()
        ckpt.write_rank_state(tmp, self.acc.process_index,
                              {"rng": ckpt.rng_state(), "data": self.train_data.state_dict()})
        if self.carried is not None:
            self.carried.save(tmp / CARRIED_STATE.format(self.acc.process_index), fingerprint=self.model.fingerprint())
        self.acc.wait_for_everyone()
        if self.sharding:
            sharded.save_shards(self.acc, self.wrapped, self.optimizer, tmp)
        self._write_weights(tmp)
        target = root / name
        if self.is_main:
            shared = {} if self.sharding else {"optimizer": self.optimizer.state_dict()}
            if self.scaler is not None:
                shared["scaler"] = self.scaler.state_dict()
            ckpt.write_shared_state(tmp, self._state(), shared)
            ckpt.publish(tmp, target)
            ckpt.prune(root, self.cfg.keep_last)
            log.info("checkpoint saved: %s", target)
        self.acc.wait_for_everyone()
        return target

    def _write_weights(self, folder: Path) -> None:
        """``save_pretrained`` output into ``folder`` by the main process (all processes must call this:
        under FSDP the weights are gathered first)."""
        if self.sharding:
            sharded.save_pretrained_full(self.acc, self.wrapped, self._twin, folder)
        elif self.is_main:
            self.model.save_pretrained(folder)

    def _save_best(self, metric: float) -> None:
        tmp = self.output_dir / ".tmp-best"
        if self.is_main:
            ckpt.new_tmp(self.output_dir, "best")
        self.acc.wait_for_everyone()
        self._write_weights(tmp)
        if self.is_main:
            atomic_write_json(tmp / "best.json", {"step": self.step, "val_ppl": metric,
                                                  "hparams": self.hparams, "train_config": self.cfg.to_dict()})
            ckpt.publish(tmp, self.output_dir / "best")
        self.acc.wait_for_everyone()

    def export(self, result: TrainResult, folder: Path) -> int:
        """Write the run's chosen weights (best by validation, else the last) to ``folder`` with
        ``save_pretrained``, atomically; return the step they come from."""
        best = result.best_checkpoint if result.best_checkpoint is not None and result.best_step != self.step else None
        tmp = folder.parent / f".tmp-{folder.name}"
        if self.is_main:
            ckpt.new_tmp(folder.parent, folder.name)
        self.acc.wait_for_everyone()
        if best is not None and self.sharding:  # best/ already holds gathered weights
            if self.is_main:
                shutil.copytree(best, tmp, dirs_exist_ok=True, ignore=shutil.ignore_patterns("best.json"))
        else:
            if best is not None:
                ckpt.load_trainable(self.model, best, self.trainable)
            self._write_weights(tmp)
        if self.is_main:
            ckpt.publish(tmp, folder)
        self.acc.wait_for_everyone()
        return self.step if best is None else result.best_step

    def resume(self, folder: str | Path) -> None:
        """Restore model trainables, optimizer, RNG, data position and counters from ``folder``."""
        folder = Path(folder)
        state, shared = ckpt.read_shared_state(folder, device=None)
        sharded.check_resume(state, sharded.describe(self.acc), folder)
        saved_model, now_model = state.get("model_config", {}), self.model.config.to_dict()
        changed = sorted(k for k in set(saved_model) | set(now_model) if saved_model.get(k) != now_model.get(k))
        if changed:
            raise CheckpointError(f"{folder} belongs to a model with other settings ({', '.join(changed)}); "
                                  "use the same model options or another output folder")
        if state.get("trainable") != self.trainable:
            raise CheckpointError(f"{folder} trained another parameter set ({len(state.get('trainable', []))} "
                                  f"tensors, this run {len(self.trainable)}); use the same --trainable")
        saved_cfg = state.get("train_config", {})
        diffs = {k: (saved_cfg.get(k), v) for k, v in self.cfg.to_dict().items() if saved_cfg.get(k) != v}
        if diffs:
            log.info("resuming with changed settings: %s",
                     ", ".join(f"{k} {a} -> {b}" for k, (a, b) in sorted(diffs.items())))
        if self.sharding:
            sharded.load_shards(self.acc, self.wrapped, self.optimizer, folder)
        else:
            ckpt.load_trainable(self.model, folder, self.trainable)
            self.optimizer.load_state_dict(shared["optimizer"])
        if self.scaler is not None and "scaler" in shared:
            self.scaler.load_state_dict(shared["scaler"])
        carried = folder / CARRIED_STATE.format(self.acc.process_index)
        if self.cfg.carry_state and carried.exists():
            self.carried = self.model.state_class.load(carried, device=self.device, fingerprint=self.model.fingerprint())
        mine = ckpt.read_rank_state(folder, self.acc.process_index)
        self.train_data.load_state_dict(mine["data"])
        ckpt.set_rng_state(mine["rng"])
        for key in ("step", "tokens", "best_metric", "best_step", "evals_since_best", "nonfinite_total",
                    "nonfinite_run", "evaluations"):
            setattr(self, key, state[key])
        self.train_seconds = float(state.get("train_seconds", 0.0))
        log.info("resumed from %s (step %d)", folder, self.step)

    # --- batches and carried state -------------------------------------------------------
    def _forward(self, module, batch, state):
        """Run ``module`` on one batch (a (B, T) tensor or a StreamBatch); returns (output, objective).

        ``state``: the carried state (None: fresh); rows that start a new document restart fresh.
        The objective is the summed NLL plus the weighted auxiliary losses scaled to the token
        count, so gradients stay token-weighted across micro-batches and processes.
        """
        ids, reset = (batch.ids, batch.reset) if hasattr(batch, "reset") else (getattr(batch, "ids", batch), None)
        labels = getattr(batch, "labels", None)  # task batches score some tokens only (e.g. an answer)
        kwargs = dict(self.forward_kwargs)
        if self.cfg.carry_state:
            if state is None or bool(reset.any()):  # a fresh state only where a document starts
                fresh = self.model.init_state(ids.shape[0])
                state = fresh if state is None else state.reset_rows(reset, fresh)
            kwargs["state"] = state
        with self.autocast():
            out = module(ids, labels=ids if labels is None else labels, **kwargs)
        objective = out.loss.float() * out.num_tokens
        for name, value in (out.aux or {}).items():
            objective = objective + self.aux_weights.get(name, 1.0) * value.float() * out.num_tokens
        return out, objective

    def _count_bytes(self, batch) -> int:
        """UTF-8 bytes of the text of the scored tokens (every token of a window but its first); 0
        for task batches, which score a few tokens only (no bits per byte then)."""
        from hiermem.tokenizers import segment_bytes

        if hasattr(batch, "labels"):
            return 0
        ids = batch.ids if hasattr(batch, "reset") else batch
        return sum(sum(segment_bytes(self.tokenizer, row, len(row))) for row in ids.tolist())

    # --- evaluation -----------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict:
        """Validation NLL per token (token-weighted over all processes), perplexity, auxiliary losses
        and, with a tokenizer, bits per byte."""
        rng = ckpt.rng_state()
        if self._val_start is not None:
            self.val_data.load_state_dict(self._val_start)
        n_batches = self.cfg.eval_batches
        if hasattr(self.val_data, "__len__"):
            n_batches = max(1, min(n_batches or len(self.val_data), len(self.val_data)))
        self.model.eval()
        names = sorted(self.aux_weights)
        sums = torch.zeros(3 + len(names), dtype=torch.float64, device=self.device)  # [nll, tokens, bytes, aux...]
        it, state, counted = iter(self.val_data), None, 0
        module = self.wrapped if self.sharding else self.model  # FSDP gathers the shards in its forward
        for _ in range(n_batches):
            batch = next(it).to(self.device)
            out, _ = self._forward(module, batch, state)
            state = out.state.detach() if self.cfg.carry_state else None
            n = out.num_tokens
            sums[0] += out.loss.double() * n
            sums[1] += n
            if self.tokenizer is not None and self._val_bytes is None:
                counted += self._count_bytes(batch)
            for i, name in enumerate(names):
                if name in (out.aux or {}):
                    sums[3 + i] += out.aux[name].double() * n
        if self.tokenizer is not None and self._val_bytes is None:
            self._val_bytes = counted  # every evaluation reads the same batches: count their bytes once
        sums[2] = self._val_bytes or 0
        sums = self.acc.reduce(sums, reduction="sum")
        self.model.train()
        ckpt.set_rng_state(rng)
        tokens = float(sums[1].clamp_min(1))
        loss = float(sums[0]) / tokens
        record = {"step": self.step, "val_loss": loss, "val_ppl": math.exp(min(loss, 700.0)),
                  "val_tokens": int(sums[1])}
        if self.tokenizer is not None and float(sums[2]) > 0:
            record["val_bpb"] = float(sums[0]) / (math.log(2) * float(sums[2]))
            record["val_bytes"] = int(sums[2])
        for i, name in enumerate(names):
            record[f"val_{name}"] = float(sums[3 + i]) / tokens
        return record

    # --- training -------------------------------------------------------------------------
    def _train_step(self, batches) -> dict:
        """One optimizer step over ``grad_accum`` micro-batches; returns its statistics."""
        cfg, world = self.cfg, self.acc.num_processes
        lr = set_lr(self.optimizer, self.step, cfg, self.train_seconds)
        names = sorted(self.aux_weights)
        stats = torch.zeros(4 + len(names), dtype=torch.float64, device=self.device)  # [nll, tokens, bad, signal, aux]
        for i in range(cfg.grad_accum):
            batch = next(batches).to(self.device, non_blocking=True)
            last = i == cfg.grad_accum - 1
            sync = contextlib.nullcontext() if last or world == 1 else self.acc.no_sync(self.wrapped)
            with sync:
                out, objective = self._forward(self.wrapped, batch, self.carried)
                if out.num_tokens == 0:
                    raise ConfigError(f"no token is scored: loss_skip_segments={cfg.loss_skip_segments} leaves "
                                      "out every segment of the window; lower it or use longer windows")
                if not objective.requires_grad:
                    raise ConfigError("the loss does not depend on any trainable parameter in this batch (e.g. "
                                      "HMT stage 1 over a carried memory with a frozen backbone); train more "
                                      "parameters (--trainable lora) or change the recipe")
                (self.scaler.scale(objective) if self.scaler is not None else objective).backward()
            if cfg.carry_state:
                self.carried = out.state.detach()  # truncated BPTT at the window boundary
            finite = bool(torch.isfinite(objective.detach()))
            stats[0] += out.loss.detach().double() * out.num_tokens if finite else 0.0
            stats[1] += out.num_tokens
            stats[2] += 0.0 if finite else 1.0
            for j, name in enumerate(names):
                if finite and name in (out.aux or {}):
                    stats[4 + j] += out.aux[name].detach().double() * out.num_tokens
        stats[3] = 1.0 if self._signal is not None else 0.0
        stats = self.acc.reduce(stats, reduction="sum")  # the same decisions on every process
        tokens = int(stats[1])
        result = {"lr": lr, "tokens": tokens, "stop": bool(stats[3]), "ok": not bool(stats[2])}
        if result["ok"]:
            if self.scaler is not None:
                self.scaler.unscale_(self.optimizer)
            scale = world / tokens  # DDP averaged the per-process sums: back to a mean per token
            for p in self.params:
                if p.grad is not None:
                    p.grad.mul_(scale)
            max_norm = cfg.clip if cfg.clip > 0 else float("inf")
            norm = (sharded.clip_grad_norm(self.wrapped, self.params, max_norm) if self.sharding
                    else self.acc.clip_grad_norm_(self.params, max_norm))
            result["grad_norm"] = float(norm)
            if self.scaler is not None:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            elif math.isfinite(result["grad_norm"]):
                self.optimizer.step()
            else:
                result["ok"] = False
        self.optimizer.zero_grad(set_to_none=True)
        if cfg.carry_state and self.carried is not None:  # e.g. memory slots used, evictions
            result["state"] = {k: v for k, v in self.carried.stats().items()
                               if isinstance(v, (int, float)) and k not in ("batch_size", "state_bytes")}
        if result["ok"]:
            result["loss"] = float(stats[0]) / tokens
            result["aux"] = {name: float(stats[4 + j]) / tokens for j, name in enumerate(names)}
        return result

    def _on_signal(self, signum, frame):
        if self._signal is not None:
            raise KeyboardInterrupt
        self._signal = signum
        log.warning("received %s: saving a checkpoint after this step (send again to abort at once)",
                    signal.Signals(signum).name)

    @contextlib.contextmanager
    def _signals(self):
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def fit(self, resume: bool | str | Path = False) -> TrainResult:
        """Train up to ``config.steps`` steps; checkpoint, validate and log along the way.

        resume: True continues from the newest checkpoint in ``output_dir`` when there is one, a
        path continues from that checkpoint, False starts fresh (and refuses a folder that already
        holds checkpoints).
        """
        self._start(resume)
        if self.step == 0 and self.cfg.warmup > self.cfg.steps:
            log.warning("the warm-up (%d steps) is longer than the run (%d steps): the learning rate never reaches "
                        "its peak %g; lower --warmup", self.cfg.warmup, self.cfg.steps, self.cfg.lr)
        last_saved = self.step if self.step else None
        status = "budget" if self._time_spent() else "completed"
        self.model.train()
        self._clock = [0.0, 0]
        monitor = Monitor(self.cfg, self.output_dir, self.hparams, self.step, enabled=self.is_main)
        batches = iter(self.train_data)
        try:
            with self._signals():
                while self.step < self.cfg.steps and status == "completed":
                    status = self._advance(batches, monitor)
                    if self.output_dir is not None and self.nonfinite_run == 0 and (
                            status != "completed" or self.cfg.save_every and self.step % self.cfg.save_every == 0):
                        self.save()
                        last_saved = self.step
                if self.output_dir is not None and last_saved != self.step:
                    self.save()
        finally:
            monitor.close()
        if status == "interrupted":
            log.warning("interrupted at step %d: checkpoint saved; run again with resume to continue", self.step)
        out_dir = self.output_dir
        seconds, tokens = self._clock
        return TrainResult(status=status, step=self.step,
                           last_checkpoint=ckpt.latest_checkpoint(out_dir) if out_dir else None,
                           best_checkpoint=out_dir / "best" if out_dir and (out_dir / "best").exists() else None,
                           best_metric=self.best_metric, best_step=self.best_step,
                           nonfinite_steps=self.nonfinite_total, tokens=self.tokens,
                           tokens_per_second=tokens / seconds if seconds else 0.0, train_seconds=self.train_seconds,
                           signal=self._signal if status == "interrupted" else None,
                           evaluations=list(self.evaluations))

    def _start(self, resume) -> None:
        """Prepare the run folder and restore a checkpoint as ``resume`` asks (see :meth:`fit`)."""
        explicit = resume not in (True, False)
        if self.output_dir is not None:
            if self.is_main:
                self.output_dir.mkdir(parents=True, exist_ok=True)
                ckpt.remove_stale(self.output_dir)
            self.acc.wait_for_everyone()
            found = ckpt.latest_checkpoint(self.output_dir)
            if found is not None and resume is False:
                raise CheckpointError(f"{self.output_dir} already holds checkpoints (newest {found.name}); resume "
                                      "them or choose another output folder")
            if found is not None and resume is True:
                self.resume(found)
        if explicit:
            self.resume(resume)
        if self.step == 0:
            set_seed(self.cfg.seed, device_specific=True)

    def _advance(self, batches, monitor: Monitor) -> str:
        """One step with its bookkeeping and validation; returns the run status after it."""
        t0 = time.perf_counter()
        res = self._train_step(batches)
        dt = time.perf_counter() - t0
        self.step += 1
        if res["ok"]:
            self.nonfinite_run = 0
            self.tokens += res["tokens"]
            self._clock[0] += dt
            self._clock[1] += res["tokens"]
        else:
            self.nonfinite_total += 1
            self.nonfinite_run += 1
            log.warning("step %d: non-finite loss or gradient, step skipped (%d in a row)", self.step,
                        self.nonfinite_run)
            if self.nonfinite_run >= self.cfg.max_nonfinite:
                good = ckpt.latest_checkpoint(self.output_dir) if self.output_dir else None
                raise TrainingError(
                    f"the loss or gradient was non-finite for {self.nonfinite_run} steps in a row (up to step "
                    f"{self.step}); training stopped. Last good checkpoint: {good or 'none'}. Lower the "
                    "learning rate, keep clipping on or use fp32, then resume from it")
        if "state" in res:
            self.state_trace.append({"step": self.step, **res["state"]})
        seconds, tokens = self._clock
        monitor.step(self.step, res, tokens / seconds if seconds else 0.0)
        if res["stop"]:
            self._signal = self._signal or signal.SIGTERM
            return "interrupted"
        cfg = self.cfg
        spent = False
        if cfg.max_minutes is None:
            self.train_seconds += dt
        else:  # every process agrees on the time spent (it sets the learning rate with schedule_by time)
            flags = self.acc.reduce(torch.tensor([float(self._clock[0] >= 60.0 * cfg.max_minutes), dt],
                                                 dtype=torch.float64, device=self.device), reduction="sum")
            self.train_seconds += float(flags[1]) / self.acc.num_processes
            spent = self._time_spent() if cfg.schedule_by == "time" else bool(flags[0] > 0)
        due = (cfg.eval_every and self.step % cfg.eval_every == 0) or self.step == cfg.steps or spent
        if self.val_data is not None and due and self._validate(monitor):
            return "early_stopped"
        if spent:
            log.info("training-time budget of %.1f min spent at step %d", cfg.max_minutes, self.step)
            return "budget"
        return "completed"

    def _time_spent(self) -> bool:
        """With ``schedule_by`` "time": the whole run's training-time budget is spent."""
        return self.cfg.schedule_by == "time" and self.train_seconds >= 60.0 * self.cfg.max_minutes

    def _validate(self, monitor: Monitor) -> bool:
        """Evaluate, keep the best weights; True when patience has run out."""
        record = self.evaluate()
        self.evaluations.append(record)
        metric = record["val_ppl"]
        improved = self.best_metric is None or metric < self.best_metric
        if improved:
            self.best_metric, self.best_step, self.evals_since_best = metric, self.step, 0
            if self.output_dir is not None:
                self._save_best(metric)
        else:
            self.evals_since_best += 1
        monitor.evaluation(self.step, record, self.best_metric)
        if self.cfg.patience and self.evals_since_best >= self.cfg.patience:
            log.info("early stopping at step %d: no improvement for %d evaluations (best ppl %.3f at step %d)",
                     self.step, self.evals_since_best, self.best_metric, self.best_step)
            return True
        return False
