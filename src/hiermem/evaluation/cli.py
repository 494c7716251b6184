"""``hiermem eval``: perplexity and bits per byte against baselines, recall tasks and memory diagnostics."""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

from hiermem.errors import ConfigError
from hiermem.evaluation import report
from hiermem.evaluation.diagnostics import memory_diagnostics, plot_diagnostics
from hiermem.evaluation.loading import (checkpoint_spec, id_list, load_eval_models, load_token_documents,
                                        select_documents)
from hiermem.evaluation.perplexity import available_methods, check_methods, default_methods, evaluate_perplexity
from hiermem.evaluation.readers import model_greedy, sliding_greedy
from hiermem.evaluation.tasks import haystack_pool, needle_samples, passkey_samples, run_recall

log = logging.getLogger(__name__)

EVAL_TASKS = ("perplexity", "passkey", "needle", "diagnostics")


def _stage2(spec) -> list[str]:
    """The variants whose recall traces feed the memory diagnostics (HMT stage 2)."""
    return [m for m, changes in spec.eval_variants.items() if changes.get("stage") == 2]


def _check_numbers(recall_lengths=(), **numbers) -> None:
    """Counts and lengths, checked before anything is read (checkpoint, documents)."""
    for name, value in numbers.items():
        least = 2 if name == "max_tokens" else 1  # a document's first token is never scored
        if value is not None and value < least:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least {least}, got {value}")
    if not recall_lengths or any(n < 2 for n in recall_lengths):
        raise ConfigError(f"--recall-lengths must be prompt lengths of at least 2 tokens, got {list(recall_lengths)}")


def _check_args(spec, methods, tasks) -> tuple[list[str], list[str]]:
    """Validate what is cheap to check before loading anything; (methods, tasks) with defaults filled in."""
    stage2 = _stage2(spec)
    tasks = list(dict.fromkeys(tasks or (EVAL_TASKS if stage2 else [t for t in EVAL_TASKS if t != "diagnostics"])))
    unknown = [t for t in tasks if t not in EVAL_TASKS]
    if unknown or not tasks:
        raise ConfigError(f"unknown task(s) {unknown or tasks}; choose among {', '.join(EVAL_TASKS)}")
    if "diagnostics" in tasks and not stage2:
        raise ConfigError(f"memory diagnostics need an HMT checkpoint (stage-2 recall traces); a {spec.model_type} "
                          "model has none: drop 'diagnostics' from --tasks")
    methods = check_methods(methods or default_methods(spec), available_methods(spec))
    if "diagnostics" in tasks and "perplexity" not in tasks:
        methods = stage2  # the traces come from their pass
    return methods, tasks


def default_split(source: str) -> str:
    """The split evaluated unless one is asked for: a built-in corpus's held-out test split; all of
    the user's own documents (a file, folder, table or hf: dataset). A mix of built-in corpora
    (``a+b``) is a built-in corpus."""
    from hiermem.data.corpora import CORPORA

    return "test" if all(part in CORPORA for part in source.split("+")) else "all"


def evaluate(checkpoint: str | None = None, backbone: str | None = None, source: str = "shakespeare",
             split: str | None = None, text_column: str = "text", documents: int = 4, max_tokens: int | None = 4096,
             methods: tuple[str, ...] = (), tasks: tuple[str, ...] = (), segment_length: int = 256,
             window: int | None = None, stride: int | None = None, full_context: int | None = None,
             cache_size: int | None = None, recall_lengths: tuple[int, ...] = (1024, 4096),
             recall_samples: int = 3, seed: int = 0, batch_size: int = 8, baseline_bos: bool | None = None,
             output: str | None = "eval-results", device: str | None = None, dtype: str | None = None) -> int:
    """Long-document perplexity and bits per byte of a checkpoint (any model family) against backbone
    baselines, recall tasks and memory diagnostics.

    Every method reads the same documents and scores the same tokens (each token but a document's
    first exactly once); perplexity is exp(mean token NLL) and bits per byte the summed NLL over
    ln 2 times the UTF-8 bytes of the scored text, overall and by segment index. Results go to the
    terminal and, under --output, to results.json, perplexity.csv, perplexity_by_position.png,
    recall.csv and memory_diagnostics.png.

    Args:
        checkpoint: checkpoint folder (trained, released or quantized) or released-weights name; unset:
            the released weights, else untrained HMT memory over the bundled backbone
        backbone: backbone spec of models that wrap one (HMT); unset: the one the checkpoint was trained on
        source: documents: a built-in corpus, a text file or folder, a table, or hf:<dataset>
        split: which split of the source: train, validation, test or all (documents go to a split by a
            stable hash of their id); unset: test for a built-in corpus, all for your own documents
        text_column: text column of table and hf: sources
        documents: how many documents (the first ones longer than one segment for models with segments)
        max_tokens: cut each document to its first N tokens (perplexity)
        methods: perplexity methods: model (the checkpoint as saved), its model type's variants (HMT:
            sensory, rmt, hmt-fifo, hmt-attention) and, for models with a backbone, the baselines
            chunks, sliding, full; unset: HMT: the baselines and variants; other models: model
        tasks: what to run: perplexity, passkey, needle, diagnostics (HMT only); unset: all that apply
        segment_length: tokens per segment of the by-segment figures for models without segments
            of their own (HMT uses its segment length)
        window: sliding-window length in tokens; unset: the segment length
        stride: sliding-window stride; unset: window // 2
        full_context: context cap of the full-context baseline; unset: the backbone's positions
        cache_size: override the HMT memory cache size N (eviction only acts on documents longer
            than N segments); unset: the checkpoint's
        recall_lengths: prompt lengths in tokens of the passkey and needle tasks
        recall_samples: samples per length and task
        seed: seed of the recall-task generators
        batch_size: windows per backbone call for the sliding baselines
        baseline_bos: put BOS before every window of the backbone baselines (chunks, sliding, full
            and the recall tasks' sliding window); unset: only for backbones that need it (Gemma)
        output: folder for JSON, CSV and PNG results ('' = terminal only)
        device: cpu, cuda or cuda:N (default: CUDA when present, else CPU)
        dtype: float32, bfloat16 or float16 (default: bfloat16 on CUDA when supported, else float32)
    """
    from hiermem.data.splits import check_split

    _check_numbers(documents=documents, max_tokens=max_tokens, segment_length=segment_length, window=window,
                   stride=stride, full_context=full_context, cache_size=cache_size, batch_size=batch_size,
                   recall_samples=recall_samples, recall_lengths=recall_lengths)
    split = split or default_split(source)
    check_split(split)
    spec = checkpoint_spec(checkpoint)
    methods, tasks = _check_args(spec, methods, tasks)
    if cache_size is not None and "cache_size" not in _config_fields(spec):
        raise ConfigError(f"--cache-size applies to HMT memory; a {spec.model_type} model has no cache")
    overrides = {"cache_size": cache_size} if cache_size is not None else {}
    started = time.perf_counter()
    models = load_eval_models(checkpoint, backbone, methods, device=device, dtype=dtype, **overrides)
    tok = models.tokenizer
    all_docs = load_token_documents(tok, source, split, text_column=text_column)
    samples = []  # generated first: bad lengths fail before any long computation
    if "passkey" in tasks:
        samples += passkey_samples(tok, recall_lengths, recall_samples, seed)
    if "needle" in tasks:
        samples += needle_samples(tok, haystack_pool(tok, [d.ids for d in all_docs]), recall_lengths,
                                  recall_samples, seed)
    results: dict = {"checkpoint": checkpoint or "default", "model_type": models.model_type,
                     "backbone": models.backbone.spec if models.backbone is not None else None,
                     "source": source, "split": split}
    if "perplexity" in tasks or "diagnostics" in tasks:
        own = getattr(models.model.config, "segment_length", None)
        L = own or segment_length
        docs = select_documents(all_docs, min_tokens=L + 1 if own else 2, max_tokens=max_tokens,
                                max_documents=documents)
        results.update(_perplexity(models, docs, methods, tasks, L, window=window, stride=stride,
                                   full_context=full_context, batch_size=batch_size, baseline_bos=baseline_bos))
    if samples:
        results["recall"] = _recall(models, samples, window, seed, baseline_bos)
    results["seconds"] = round(time.perf_counter() - started, 1)
    if output:
        _write(Path(output), results)
    return 0


def _config_fields(spec) -> set[str]:
    cls = spec.config_class()
    return {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()


def _bos(models, baseline_bos: bool | None) -> int | None:
    """BOS to put before every backbone window: when asked, else for backbones that need it (Gemma)."""
    if models.backbone is None:
        return None
    wanted = models.backbone.needs_bos if baseline_bos is None else baseline_bos
    bos = models.backbone.tokenizer.bos_token_id
    if wanted and bos is None:
        raise ConfigError(f"baseline_bos is set but the backbone {models.backbone.spec!r} has no BOS token")
    return bos if wanted else None


def _perplexity(models, docs, methods, tasks, segment_length: int, baseline_bos: bool | None = None,
                **options) -> dict:
    """The perplexity comparison (and the diagnostics from its HMT traces), printed; their results."""
    cfg = models.model.config
    longest = max(int(d.ids.shape[0]) for d in docs)
    cache = getattr(cfg, "cache_size", None)
    if "hmt-attention" in methods and cache is not None and longest <= segment_length * (cache + 1):
        log.warning("no document outlasts the cache (%d segments of %d tokens): FIFO and attention eviction give "
                    "identical results; lower --cache-size to compare them", cache, segment_length)
    ppl = evaluate_perplexity(models.variants, models.backbone.model if models.backbone is not None else None,
                              docs, methods, segment_length, bos_token_id=_bos(models, baseline_bos),
                              recall="diagnostics" in tasks, tokenizer=models.tokenizer, **options)
    out = {}
    if "perplexity" in tasks:
        out["perplexity"] = ppl.to_dict()
        s = ppl.settings
        print(f"\nPerplexity on {len(docs)} document(s) ({id_list([d.id for d in docs])}), {s['tokens_scored']} tokens "
              f"({s.get('bytes_scored', '?')} bytes) scored per method, segment length {segment_length}:")
        print(report.perplexity_table(out["perplexity"]))
    if "diagnostics" in tasks:
        out["diagnostics"] = memory_diagnostics(ppl.traces, cache)
        print("\nMemory diagnostics (recall distance in segments; eviction ages):")
        print(report.diagnostics_table(out["diagnostics"]))
    return out


def _recall(models, samples, window: int | None, seed: int, baseline_bos: bool | None = None) -> dict:
    """The model (named by its type, e.g. hmt) against the sliding-window backbone when there is one,
    on the recall samples, printed; the results."""
    tok = models.tokenizer
    eos = tok.eos_token_id
    answerers = {models.model_type: lambda ids, n: model_greedy(models.model, ids, n, eos)}
    title = f"Recall accuracy ({models.model_type}, seed {seed}):"
    if models.backbone is not None:
        win = window or getattr(models.model.config, "segment_length", None) or 256
        bos = _bos(models, baseline_bos)
        answerers["sliding"] = lambda ids, n: sliding_greedy(models.backbone.model, ids, win, n, eos, bos)
        title = (f"Recall accuracy ({models.model_type.upper()} vs the backbone with a {win}-token sliding window, "
                 f"seed {seed}):")
    res = run_recall(samples, answerers, tok)
    print("\n" + title)
    print(report.recall_table(res["summary"]))
    return res


def _write(folder: Path, results: dict) -> None:
    written = [report.write_json(folder / "results.json", results)]
    plots = []
    if "perplexity" in results:
        written.append(report.write_csv(folder / "perplexity.csv", report.perplexity_rows(results["perplexity"])))
        plots.append(lambda: report.plot_perplexity(results["perplexity"], folder / "perplexity_by_position.png"))
    if "recall" in results:
        written.append(report.write_csv(folder / "recall.csv", results["recall"]["records"]))
    if results.get("diagnostics"):
        plots.append(lambda: plot_diagnostics(results["diagnostics"], folder / "memory_diagnostics.png"))
    try:
        written += [plot() for plot in plots]
    except ImportError:  # the figures need the eval extras; the numbers are written already
        log.warning("matplotlib is not installed: no PNG figures (pip install 'hiermem[eval]')")
    print("\nwrote " + ", ".join(str(p) for p in written))
