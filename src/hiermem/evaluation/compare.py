"""``hiermem compare``: model families side by side on the same text, at the same training budget.

From-scratch families train on the same documents (the training split of ``--source``), with one
shared tokenizer trained once, each for the same training time (``--budget-minutes``, validation
excluded; the learning rate decays, cosine unless the family's recipe says otherwise, over that
time); families over a pretrained backbone (HMT) are loaded from their released or given
weights and listed apart (their budget is the backbone's pretraining plus their own). Every model
then reads the same held-out text: the first ``--max-chars`` characters of each test document,
so bits per byte are comparable whatever the tokenizer. Reported per model: bits per byte overall
and by position in the document (bins of ``--bin-bytes`` bytes), perplexity over its own tokens,
passkey accuracy at each length, reading and generation speed, and RSS growth while reading.
Output: ``compare.md`` (the table), ``results.json`` and ``bpb_by_position.png`` under ``--output``.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import torch

from hiermem.errors import ConfigError

log = logging.getLogger(__name__)


def _rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def _train(model_type: str, out: Path, source: str, budget: float, tokenizer_folder: Path, seed: int, device):
    from hiermem.configs import read_config, resolve_config
    from hiermem.models import load_model, model_spec
    from hiermem.training.config import TrainConfig
    from hiermem.training.scratch import ScratchRecipe, train_from_scratch

    spec = model_spec(model_type)
    options, recipe_opts = {}, {}
    if spec.default_config:  # the family's bundled CPU recipe: model size, batch, learning rate
        from hiermem.training.cli import train_model

        recipe_opts = read_config(train_model, str(resolve_config(spec.default_config)))
        options = recipe_opts.pop("model_options", {})
    keys = ("batch_size", "lr", "schedule", "warmup", "weight_decay", "grad_accum", "min_lr_ratio", "clip",
            "carry_state", "betas")
    train = {"schedule": "cosine", **{k: recipe_opts[k] for k in keys if k in recipe_opts}}
    by_time = "time" if train["schedule"] in ("cosine", "linear") else "steps"  # decay over the budget
    cfg = TrainConfig(steps=10**7, max_minutes=budget, schedule_by=by_time, trainable="full", seed=seed,
                      eval_every=10**6, eval_batches=8, save_every=0, tensorboard=False, progress=False, **train)
    recipe = ScratchRecipe(model_type, out / "runs" / model_type, source=source, model=options,
                           tokenizer={"path": str(tokenizer_folder)}, training=cfg,
                           window=int(recipe_opts.get("window", 256)), device=device)
    done = Path(recipe.output_dir) / "train_summary.json"
    if done.exists() and json.loads(done.read_text()).get("status") in ("budget", "completed"):
        summary = json.loads(done.read_text())  # a finished run of an earlier compare: reuse it
    else:
        summary = train_from_scratch(recipe, resume=True)
    return load_model(summary["final"]), summary


def _position_bpb(nll: torch.Tensor, token_bytes: list[int], bin_bytes: int) -> list[dict]:
    """Bits per byte by position: token i (scored) falls in the bin of the byte where it ends."""
    sums, counts = {}, {}
    pos = 0
    for value, nb in zip(nll.tolist(), token_bytes):
        pos += nb
        b = max(0, pos - 1) // bin_bytes
        sums[b] = sums.get(b, 0.0) + value
        counts[b] = counts.get(b, 0) + nb
    return [{"from_byte": b * bin_bytes, "bytes": counts[b], "nll": sums[b]} for b in sorted(sums)]


def _read(model, texts: list[str], bin_bytes: int) -> dict:
    from hiermem.evaluation.perplexity import model_nll
    from hiermem.tokenizers import token_bytes

    tok = model.tokenizer
    nll_sum = bytes_sum = tokens = 0
    bins: dict[int, list[float]] = {}
    seconds, rss0, peak = 0.0, _rss_mb(), 0.0
    for text in texts:
        ids = torch.tensor(tok(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
        t0 = time.perf_counter()
        nll, _ = model_nll(model, ids)
        seconds += time.perf_counter() - t0
        peak = max(peak, _rss_mb() - rss0)
        per_token = token_bytes(tok, ids)  # (T-1,) aligned with nll
        for row in _position_bpb(nll, per_token, bin_bytes):
            acc = bins.setdefault(row["from_byte"], [0.0, 0])
            acc[0] += row["nll"]
            acc[1] += row["bytes"]
        nll_sum += float(nll.double().sum())
        bytes_sum += sum(per_token)
        tokens += int(nll.shape[0])
    return {"bpb": nll_sum / (math.log(2) * bytes_sum), "ppl": math.exp(nll_sum / tokens), "tokens": tokens,
            "bytes": bytes_sum, "read_tok_s": tokens / seconds, "read_rss_growth_mb": round(peak, 1),
            "by_position": [{"from_byte": k, "bpb": v[0] / (math.log(2) * v[1]), "bytes": v[1]}
                            for k, v in sorted(bins.items())]}


def _generate_speed(model, text: str, prompt_tokens: int = 256, new_tokens: int = 64) -> float:
    from hiermem.inference.generate import GenerationConfig, generate

    ids = torch.tensor([model.tokenizer(text, add_special_tokens=False)["input_ids"][:prompt_tokens]])
    t0 = time.perf_counter()
    out = generate(model, ids.to(model.device), GenerationConfig(max_new_tokens=new_tokens))
    return out.tokens.shape[1] / (time.perf_counter() - t0)


def _passkey(model, lengths: list[int], samples: int, seed: int) -> dict:
    from hiermem.evaluation.readers import model_greedy
    from hiermem.evaluation.tasks import passkey_samples, run_recall

    tok = model.tokenizer
    cases = passkey_samples(tok, lengths, samples, seed)
    res = run_recall(cases, {"model": lambda ids, n: model_greedy(model, ids, n, tok.eos_token_id)}, tok)
    by_length = res["summary"]["passkey"]["model"]["by_length"]
    return {str(n): v["accuracy"] for n, v in by_length.items()}


def _plot(results: dict, path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("no plot: pip install matplotlib")
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, r in results.items():
        xs = [row["from_byte"] / 1000 for row in r["by_position"]]
        ax.plot(xs, [row["bpb"] for row in r["by_position"]], marker="o", label=name)
    ax.set_xlabel("position in document (kB)")
    ax.set_ylabel("bits per byte")
    ax.set_title("Held-out bits per byte by position")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def compare(models: list[str] = ["transformer", "hmt"],  # noqa: B006 (read-only default)
            checkpoints: list[str] = [],  # noqa: B006
            budget_minutes: float = 10.0, source: str = "shakespeare", documents: int = 3,
            max_chars: int = 16000, bin_bytes: int = 4000, passkey_lengths: list[int] = [1024, 4096],  # noqa: B006
            passkey_samples: int = 3, vocab_size: int = 4096, seed: int = 0, output: str = "compare-results",
            device: str | None = None) -> int:
    """Train (or load) several model families on the same text under the same budget and compare
    them on the same held-out documents: bits per byte overall and by position, perplexity,
    passkey accuracy, reading and generation speed, RSS growth. Writes compare.md, results.json
    and bpb_by_position.png under --output; a second run reuses finished training runs.

    Args:
        models: model families to compare (registered model types)
        checkpoints: MODEL=FOLDER pairs: load these weights instead of training (HMT: released weights by default)
        budget_minutes: training time of each from-scratch family (validation excluded)
        source: corpus: training split for training, test split for the comparison
        documents: held-out documents read by every model
        max_chars: characters read from the start of each held-out document
        bin_bytes: width of the by-position bins in bytes
        passkey_lengths: passkey prompt lengths in each model's tokens
        passkey_samples: passkey samples per length
        vocab_size: size of the BPE tokenizer shared by the from-scratch families
        seed: seed of training and of the passkey generator
        output: results folder (training runs go to <output>/runs)
        device: cpu, cuda or auto
    """
    from hiermem.data import load_documents
    from hiermem.evaluation.report import format_table, write_json
    from hiermem.models import load_model, model_spec
    from hiermem.tokenizers import train_tokenizer

    if budget_minutes <= 0 or documents < 1 or max_chars < 100 or bin_bytes < 1:
        raise ConfigError("budget_minutes must be > 0, documents >= 1, max_chars >= 100 and bin_bytes >= 1")
    given = {}
    for item in checkpoints:
        name, sep, folder = item.partition("=")
        if not sep:
            raise ConfigError(f"--checkpoints takes MODEL=FOLDER pairs, got {item!r}")
        given[name] = folder
    specs = {m: model_spec(m) for m in dict.fromkeys(models)}
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    texts = [d.text[:max_chars] for d in load_documents(source, "test")][:documents]
    tok_folder = out / "tokenizer"
    needs_training = [m for m, s in specs.items() if not s.pretrained_backbone and m not in given]
    if needs_training and not (tok_folder / "hiermem_tokenizer.json").exists():
        train_tokenizer((d.text for d in load_documents(source, "train")), tok_folder, type="bpe",
                        vocab_size=vocab_size)
    results, notes = {}, {}
    for name, spec in specs.items():
        summary = None
        if name in given:
            model = load_model(given[name], device=device)
            notes[name] = f"loaded from {given[name]}"
        elif spec.pretrained_backbone:
            model = load_model(None, device=device)
            notes[name] = "pretrained backbone + released memory weights (not trained under the budget)"
        else:
            model, summary = _train(name, out, source, budget_minutes, tok_folder, seed, device)
            notes[name] = (f"trained from scratch: {summary['steps']} steps, {summary['tokens']:,} tokens in "
                           f"{budget_minutes:g} min ({summary['parameters']:,} parameters)")
        model.eval()
        log.info("comparing %s: reading %d documents", name, len(texts))
        with torch.inference_mode():
            r = _read(model, texts, bin_bytes)
        r["generate_tok_s"] = _generate_speed(model, texts[0])
        r["passkey"] = _passkey(model, list(passkey_lengths), passkey_samples, seed)
        r["parameters"] = sum(p.numel() for p in model.parameters())
        r["note"] = notes[name]
        if summary is not None:
            r["training"] = {k: summary[k] for k in ("steps", "tokens", "status", "tokens_per_second_this_run")}
        results[name] = r
        del model
    headers = ["model", "bits/byte", "ppl (own tokens)", *[f"passkey {n}" for n in passkey_lengths],
               "read tok/s", "gen tok/s", "read RSS +MB", "parameters", "how it was trained"]
    rows = [[n, f"{r['bpb']:.4f}", f"{r['ppl']:.2f}", *[f"{r['passkey'].get(str(n_), 0):.0%}" for n_ in passkey_lengths],
             f"{r['read_tok_s']:.0f}", f"{r['generate_tok_s']:.1f}", f"{r['read_rss_growth_mb']:.0f}",
             f"{r['parameters']:,}", r["note"]] for n, r in results.items()]
    table = format_table(headers, rows)
    print(table)
    settings = {"source": source, "documents": len(texts), "max_chars": max_chars, "bytes": {n: r["bytes"] for n, r in results.items()},
                "budget_minutes": budget_minutes, "seed": seed, "threads": torch.get_num_threads()}
    (out / "compare.md").write_text(f"# hiermem compare\n\nSettings: {settings}\n\n{table}\n")
    write_json(out / "results.json", {"settings": settings, "models": results})
    plot = _plot(results, out / "bpb_by_position.png")
    print(f"\nwrote {out / 'compare.md'}, {out / 'results.json'}" + (f", {plot}" if plot else ""))
    return 0
