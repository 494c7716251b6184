"""Progress reporting of a training run: tqdm bar (or log lines when not on a terminal),
TensorBoard scalars, and Weights & Biases when a project is named. Main process only."""

from __future__ import annotations

import logging
import sys
import uuid
from pathlib import Path

from hiermem.errors import ConfigError
from hiermem.training.config import TrainConfig

log = logging.getLogger(__name__)


class Monitor:
    """Receives every step's statistics and each evaluation; decides what to show and where."""

    def __init__(self, cfg: TrainConfig, output_dir: Path | None, hparams: dict, start_step: int,
                 enabled: bool = True):
        self.cfg, self.enabled = cfg, enabled
        self.bar = self.writer = self.wandb = None
        self._window: list[dict] = []
        if not enabled:
            return
        if cfg.progress and sys.stderr.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=cfg.steps, initial=start_step, unit="step", dynamic_ncols=True, desc="train")
        if cfg.tensorboard and output_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                log.warning("TensorBoard logging is off: pip install tensorboard (or turn it off explicitly)")
            else:
                self.writer = SummaryWriter(str(output_dir / "tensorboard"), purge_step=start_step or None)
        if cfg.wandb_project:
            self.wandb = _start_wandb(cfg, output_dir, hparams)

    def step(self, step: int, res: dict, tokens_per_second: float) -> None:
        if not self.enabled:
            return
        if res["ok"]:
            self._window.append(res)
        if self.bar is not None:
            self.bar.update(1)
            if res["ok"]:
                self.bar.set_postfix(loss=f"{res['loss']:.4f}", tok_s=f"{tokens_per_second:.0f}",
                                     lr=f"{res['lr']:.2e}", refresh=False)
        if step % self.cfg.log_every and step != self.cfg.steps or not self._window:
            return
        n = len(self._window)
        loss = sum(r["loss"] * r["tokens"] for r in self._window) / sum(r["tokens"] for r in self._window)
        scalars = {"train/loss": loss, "train/lr": res["lr"], "train/tokens_per_second": tokens_per_second,
                   "train/grad_norm": sum(r["grad_norm"] for r in self._window) / n}
        weight = sum(r["tokens"] for r in self._window)
        for name in res.get("aux", {}):
            scalars[f"train/{name}"] = sum(r["aux"].get(name, 0.0) * r["tokens"] for r in self._window) / weight
        scalars.update({f"state/{k}": float(v) for k, v in res.get("state", {}).items()})
        self._window = []
        if self.bar is None:
            aux = "".join(f"  {k[6:]} {v:.4g}" for k, v in scalars.items() if k[6:] in res.get("aux", {}))
            state = "".join(f"  {k} {v}" for k, v in res.get("state", {}).items())
            log.info("step %d/%d  loss %.4f%s  lr %.3g  grad-norm %.3g  %.0f tok/s%s", step, self.cfg.steps, loss, aux,
                     res["lr"], scalars["train/grad_norm"], tokens_per_second, state)
        self._emit(step, scalars)

    def evaluation(self, step: int, record: dict, best: float | None) -> None:
        if not self.enabled:
            return
        bpb = f", {record['val_bpb']:.4f} bits per byte" if "val_bpb" in record else ""
        msg = (f"step {step}: validation loss {record['val_loss']:.4f}, perplexity {record['val_ppl']:.3f}{bpb} "
               f"({record['val_tokens']} tokens; best {best:.3f})")
        if self.bar is not None:
            self.bar.write(msg)
        log.info(msg)
        self._emit(step, {f"val/{k[4:]}": v for k, v in record.items()
                          if k.startswith("val_") and k not in ("val_tokens", "val_bytes")})

    def _emit(self, step: int, scalars: dict) -> None:
        if self.writer is not None:
            for k, v in scalars.items():
                self.writer.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
        if self.wandb is not None:
            self.wandb.finish()


def _start_wandb(cfg: TrainConfig, output_dir: Path | None, hparams: dict):
    try:
        import wandb
    except ImportError as exc:
        raise ConfigError(f"wandb_project={cfg.wandb_project!r} needs Weights & Biases: pip install wandb "
                          "(or leave the W&B project unset)") from exc
    run_id = None
    if output_dir is not None:  # the same W&B run continues when the training run resumes
        id_file = output_dir / "wandb_run_id"
        if not id_file.exists():
            id_file.write_text(uuid.uuid4().hex[:16])
        run_id = id_file.read_text().strip()
    return wandb.init(project=cfg.wandb_project, name=cfg.wandb_run_name, id=run_id, resume="allow",
                      dir=str(output_dir) if output_dir else None, config={"train": cfg.to_dict(), **hparams})
