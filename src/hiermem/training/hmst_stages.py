"""HMST's three training stages behind ``hiermem train hmst --stage 1|2|3``.

1. Base pre-training: the from-scratch recipe (:func:`hiermem.training.cli.train_model`).
2. Memory fine-tuning, from a stage-1 folder: the shared trainer on the synthetic facts task
   (:class:`~hiermem.training.hmst_facts.FactsQALoader`: retrieval, episodic and plain-text rows)
   with SSM drop-out (the episodic gate can close), an early-exit loss (the early-exit gate) and the
   expert bias trained on the rows that read memory; then the retriever, trained contrastively on
   which chunk answers each question.
3. Meta-controller and critic, from a stage-1 or stage-2 folder: every training question answered
   under every gate setting; the critic fitted on which answers were wrong; PPO on the reward
   ``accuracy - 0.3 latency - 0.2 compute + 0.5 calibration`` looked up for the gates it opens.

Each stage writes ``<output_dir>/final`` (the model plus ``hmst_system.json`` naming the stage) and
``<output_dir>/stage<N>_report.json``.
"""

from __future__ import annotations

import inspect
import logging
import time
from pathlib import Path
from typing import Literal

import torch

from hiermem.errors import CheckpointError, ConfigError
from hiermem.io import atomic_write_json

log = logging.getLogger(__name__)
STAGE2_SETTINGS = {"ssm_drop": 0.25, "early_exit_loss_weight": 0.5}


def load_stage(path: str, accepted: tuple[int, ...], model_size: str | None, model=None):
    """(system, stage) of a folder written by an earlier stage (``model``: its model, already
    loaded with other settings); a clear error for another stage or size."""
    from hiermem.models.hmst.config import PRESETS
    from hiermem.models.hmst.system import HMSTSystem

    if path is None:
        raise ConfigError("stages 2 and 3 start from an earlier stage's folder: give --model-path runs/hmst/final")
    system, stage = HMSTSystem.load(path, model=model)
    if stage not in accepted:
        raise CheckpointError(f"{path} is a stage-{stage} HMST; this stage starts from stage "
                              f"{' or '.join(map(str, accepted))}")
    if model_size is not None:
        if model_size not in PRESETS:
            raise ConfigError(f"unknown --model-size {model_size!r}; known: {', '.join(PRESETS)}")
        c = system.model.config
        diff = [f"{k} {getattr(c, k)} (preset {v})" for k, v in PRESETS[model_size].items() if getattr(c, k) != v]
        if diff:
            raise CheckpointError(f"{path} is not an hmst-{model_size} model: " + ", ".join(diff))
    return system, stage


def facts_splits(document_chars: int, documents: int) -> dict:
    """split -> (its facts task, its documents): ``documents`` for training, a quarter (>= 8) for validation."""
    from hiermem.data.facts import FactsTask

    tasks = {s: FactsTask.for_split(s, document_chars) for s in ("train", "validation")}
    return {s: (t, t.documents(documents if s == "train" else max(8, documents // 4))) for s, t in tasks.items()}


def run_stage2(model_path: str, output_dir: str, steps: int = 300, batch_size: int = 8, lr: float = 5e-4,
               window: int = 256, max_minutes: float | None = None, facts_documents: int = 48,
               document_chars: int = 4000, seed: int = 0, model_size: str | None = None, **train_options) -> dict:
    """Stage 2 (see the module docstring); returns the report."""
    from hiermem.io import read_json
    from hiermem.models import load_model, model_folder
    from hiermem.models.hmst.retriever import Retriever, RetrieverConfig, fit_retriever, retrieval_accuracy
    from hiermem.training.config import TrainConfig
    from hiermem.training.hmst_facts import FactsQALoader, retrieval_examples, row_accuracy
    from hiermem.training.trainer import Trainer

    saved = read_json(model_folder(model_path) / "config.json")
    # the stage-1 weights with an expert bias (zero), SSM drop-out and an early-exit loss
    model = load_model(model_path, **STAGE2_SETTINGS, expert_bias=True,
                       early_exit_layer=saved.get("early_exit_layer") or max(1, saved["num_layers"] // 2))
    system, _ = load_stage(model_path, (1,), model_size, model=model)
    out = Path(output_dir)
    tok, c = model.tokenizer, model.config
    splits = facts_splits(document_chars, facts_documents)
    loaders = {s: FactsQALoader(tok, t, window, batch_size, system.config.chunk_tokens, c.attention_window,
                                seed=seed) for s, (t, _) in splits.items()}
    cfg = TrainConfig(steps=steps, batch_size=batch_size, lr=lr, trainable="full", max_minutes=max_minutes,
                      schedule="cosine", warmup=min(20, steps // 10), seed=seed, **train_options)
    trainer = Trainer(model, cfg, loaders["train"], loaders["validation"], output_dir=out / "checkpoints",
                      hparams={"recipe": "hmst-stage2", "window": window, "document_chars": document_chars},
                      tokenizer=tok)
    trainer.forward_kwargs["expert_bias"] = True  # the bias learns the routing of memory reading
    result = trainer.fit(resume=True)
    report = {"stage": 2, "from": str(model_path), "status": result.status, "steps": result.step,
              "val_history": result.evaluations, "train_seconds": round(result.train_seconds, 1)}
    if result.status == "interrupted":
        atomic_write_json(out / "stage2_report.json", report)
        return report
    trainer.export(result, out / "lm")
    model = load_model(out / "lm")
    report["validation_answers"] = row_accuracy(model, loaders["validation"], rows=96)
    system = type(system)(model, model.tokenizer, config=system.config)
    retriever = Retriever(RetrieverConfig(hidden_size=c.hidden_size))
    system.retriever = retriever
    t0 = time.perf_counter()
    examples = {s: retrieval_examples(system, d) for s, (_, d) in splits.items()}
    before = retrieval_accuracy(retriever, examples["validation"])
    losses = fit_retriever(retriever, examples["train"], generator=torch.Generator().manual_seed(seed))
    report["retriever"] = {"examples": len(examples["train"]), "val_recall_at_1_untrained": before,
                           "val_recall_at_1": retrieval_accuracy(retriever, examples["validation"]),
                           "train_recall_at_1": retrieval_accuracy(retriever, examples["train"]),
                           "final_loss": losses[-1], "seconds": round(time.perf_counter() - t0, 1)}
    system.save(out / "final", stage=2)
    atomic_write_json(out / "stage2_report.json", report)
    return report


def run_stage3(model_path: str, output_dir: str, facts_documents: int = 48, document_chars: int = 4000,
               ppo_iterations: int = 200, seed: int = 0, model_size: str | None = None) -> dict:
    """Stage 3 (see the module docstring); returns the report with the validation policies."""
    from hiermem.models.hmst.controller import ControllerConfig, MetaController
    from hiermem.models.hmst.critic import Critic, CriticConfig, fit_critic
    from hiermem.models.hmst.system import CRITIC_EXTRA
    from hiermem.training.hmst_facts import answer_all
    from hiermem.training.hmst_policy import RewardTable, evaluate_policies, train_controller

    system, stage = load_stage(model_path, (1, 2), model_size)
    out = Path(output_dir)
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    records = {s: answer_all(system, d) for s, (_, d) in facts_splits(document_chars, facts_documents).items()}
    answered = time.perf_counter() - t0
    critic = Critic(CriticConfig(feature_dim=system.feature_dim + CRITIC_EXTRA))
    system.critic = critic
    feats, wrong = RewardTable.critic_data(records["train"])
    losses = fit_critic(critic, feats, wrong, epochs=60, weight_decay=0.05,
                        generator=torch.Generator().manual_seed(seed),
                        validation=RewardTable.critic_data(records["validation"]))
    budget = system.answer_budget()
    tables = {s: RewardTable.build(r, critic, budget) for s, r in records.items()}
    controller = MetaController(ControllerConfig(feature_dim=system.feature_dim, max_steps=1))
    history = train_controller(controller, tables["train"], ppo_iterations, seed)
    system.controller = controller
    report = {"stage": 3, "from": str(model_path), "from_stage": stage,
              "questions": {s: len(r) for s, r in records.items()},
              "answering_seconds": round(answered, 1), "critic_final_loss": losses[-1],
              "critic_best_epoch": critic.best_epoch, "critic_val_loss": critic.best_val_loss,
              "ppo": history[-1] if history else {}, "budget": {"flops": budget[0], "latency_units": budget[1]},
              "validation": evaluate_policies(tables["validation"], controller, tables["train"]),
              "seconds": round(time.perf_counter() - t0, 1)}
    system.save(out / "final", stage=3)
    atomic_write_json(out / "stage3_report.json", report)
    return report


def train_hmst(model: str, stage: Literal[1, 2, 3] = 1, model_path: str | None = None,
               model_size: str | None = None, facts_documents: int = 48, document_chars: int = 4000,
               ppo_iterations: int = 200, **options) -> int:
    """Train HMST: --stage 1 pre-trains the decoder from scratch (the options below); --stage 2
    fine-tunes its memory on the synthetic facts task and trains the retriever; --stage 3 trains
    the critic and the PPO meta-controller. Stages 2 and 3 start from --model-path (the previous
    stage's final folder) and write <output-dir>/final and <output-dir>/stage<N>_report.json;
    they use --output-dir, --steps, --batch-size, --lr, --window, --max-minutes, --seed and the
    logging and checkpoint options.

    Args:
        model: hmst
        stage: 1 (base pre-training), 2 (memory fine-tuning), 3 (meta-controller PPO and critic)
        model_path: stages 2-3: the earlier stage's final folder
        model_size: stages 2-3: refuse a checkpoint that is not this preset (micro, tiny, small, base)
        facts_documents: stages 2-3: synthetic training documents (a quarter as many for validation)
        document_chars: stages 2-3: characters of filler per synthetic document
        ppo_iterations: stage 3: PPO updates of the meta-controller
    """
    from hiermem.training.cli import train_model

    if stage == 1:
        return train_model(model, **options)
    out = options.get("output_dir") or f"runs/hmst-stage{stage}"
    common = dict(facts_documents=facts_documents, document_chars=document_chars, seed=options.get("seed", 0),
                  model_size=model_size)
    if stage == 2:
        keep = ("steps", "batch_size", "lr", "window", "max_minutes")
        train_keys = ("eval_every", "eval_batches", "save_every", "keep_last", "log_every", "tensorboard", "progress")
        report = run_stage2(model_path, out, **common, **{k: options[k] for k in keep if k in options},
                            **{k: options[k] for k in train_keys if k in options})
        r = report.get("retriever", {})
        print(f"hmst stage 2: {report['status']} at step {report['steps']}; retriever recall@1 on validation "
              f"{r.get('val_recall_at_1_untrained', 0):.2f} -> {r.get('val_recall_at_1', 0):.2f}; "
              f"final weights: {out}/final")
        return 0 if report["status"] != "interrupted" else 130
    report = run_stage3(model_path, out, ppo_iterations=ppo_iterations, **common)
    ctl, fixed = report["validation"]["controller"], report["validation"]["all_open"]
    print(f"hmst stage 3: controller accuracy {ctl['accuracy']:.2f} (all gates open {fixed['accuracy']:.2f}), "
          f"reward {ctl['reward']:.3f} ({fixed['reward']:.3f}); final weights: {out}/final")
    return 0


def _merge_signature() -> None:
    """train_hmst takes train_model's options as well: its signature, types and help show them."""
    from hiermem.cli import _doc_parts
    from hiermem.training.cli import train_model

    own = [p for p in inspect.signature(train_hmst).parameters.values() if p.kind != p.VAR_KEYWORD]
    extra = [p for name, p in inspect.signature(train_model).parameters.items() if name != "model"]
    train_hmst.__signature__ = inspect.Signature(own + extra)
    train_hmst.__annotations__ = {**train_model.__annotations__, **train_hmst.__annotations__}
    train_hmst.__annotations__.pop("options", None)
    _, args = _doc_parts(train_model)
    train_hmst.__doc__ += "".join(f"        {k}: {v}\n" for k, v in args.items() if k != "model")
    for name in ("config_dict_sections", "config_renames"):
        setattr(train_hmst, name, getattr(train_model, name))


_merge_signature()
