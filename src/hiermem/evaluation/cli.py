"""``hiermem eval``: perplexity against baselines, recall tasks and memory diagnostics in one run."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from hiermem.errors import ConfigError
from hiermem.evaluation import report
from hiermem.evaluation.diagnostics import memory_diagnostics, plot_diagnostics
from hiermem.evaluation.loading import load_eval_models, load_token_documents, select_documents
from hiermem.evaluation.perplexity import HMT_METHODS, METHODS, check_methods, evaluate_perplexity
from hiermem.evaluation.readers import hmt_greedy, sliding_greedy
from hiermem.evaluation.tasks import haystack_pool, needle_samples, passkey_samples, run_recall

log = logging.getLogger(__name__)

EVAL_TASKS = ("perplexity", "passkey", "needle", "diagnostics")


def evaluate(checkpoint: str | None = None, backbone: str | None = None, source: str = "shakespeare",
             split: str = "test", text_column: str = "text", documents: int = 4, max_tokens: int | None = 4096,
             methods: tuple[str, ...] = METHODS, tasks: tuple[str, ...] = EVAL_TASKS,
             window: int | None = None, stride: int | None = None, full_context: int | None = None,
             cache_size: int | None = None, recall_lengths: tuple[int, ...] = (1024, 4096),
             recall_samples: int = 3, seed: int = 0, batch_size: int = 8, baseline_bos: bool | None = None,
             output: str | None = "eval-results", device: str | None = None, dtype: str | None = None) -> int:
    """Long-document perplexity of HMT against backbone baselines, recall tasks and memory diagnostics.

    Every method reads the same documents and scores the same tokens (each token but a document's
    first exactly once); perplexity is exp(mean token NLL), overall and by segment index. Results
    go to the terminal and, under --output, to results.json, perplexity.csv, recall.csv and
    memory_diagnostics.png.

    Args:
        checkpoint: HMT checkpoint folder or released-weights name; unset: the released weights,
            else untrained memory over the bundled backbone
        backbone: backbone spec; unset: the one the checkpoint was trained on
        source: documents: a built-in corpus, a text file or folder, a table, or hf:<dataset>
        split: which split of the source: train, validation, test or all
        text_column: text column of table and hf: sources
        documents: how many documents (the first ones longer than one segment)
        max_tokens: cut each document to its first N tokens (perplexity)
        methods: perplexity methods: chunks, sliding, full, sensory, rmt, hmt-fifo, hmt-attention
        tasks: what to run: perplexity, passkey, needle, diagnostics
        window: sliding-window length in tokens; unset: the HMT segment length
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
        device: cpu, cuda, cuda:N; unset: CUDA when present
        dtype: float32, bfloat16, float16; unset: float32 on CPU, bfloat16 on CUDA
    """
    tasks = list(dict.fromkeys(tasks))
    unknown = [t for t in tasks if t not in EVAL_TASKS]
    if unknown or not tasks:
        raise ConfigError(f"unknown task(s) {unknown or tasks}; choose among {', '.join(EVAL_TASKS)}")
    methods = check_methods(methods)
    if "diagnostics" in tasks and "perplexity" not in tasks:
        methods = [m for m in HMT_METHODS if HMT_METHODS[m].get("stage") == 2]  # traces come from their pass
    overrides = {"cache_size": cache_size} if cache_size is not None else {}
    started = time.perf_counter()
    models = load_eval_models(checkpoint, backbone, methods, device=device, dtype=dtype, **overrides)
    tok = models.backbone.tokenizer
    all_docs = load_token_documents(tok, source, split, text_column=text_column)
    samples = []  # generated first: bad lengths fail before any long computation
    if "passkey" in tasks:
        samples += passkey_samples(tok, recall_lengths, recall_samples, seed)
    if "needle" in tasks:
        samples += needle_samples(tok, haystack_pool(tok, [d.ids for d in all_docs]), recall_lengths,
                                  recall_samples, seed)
    results: dict = {"checkpoint": checkpoint or "default", "backbone": models.backbone.spec, "source": source,
                     "split": split}
    if "perplexity" in tasks or "diagnostics" in tasks:
        docs = select_documents(all_docs, min_tokens=models.model.config.segment_length + 1,
                                max_tokens=max_tokens, max_documents=documents)
        results.update(_perplexity(models, docs, methods, tasks, window=window, stride=stride,
                                   full_context=full_context, batch_size=batch_size, baseline_bos=baseline_bos))
    if samples:
        results["recall"] = _recall(models, samples, window, seed, baseline_bos)
    results["seconds"] = round(time.perf_counter() - started, 1)
    if output:
        _write(Path(output), results)
    return 0


def _bos(models, baseline_bos: bool | None) -> int | None:
    """BOS to put before every backbone window: when asked, else for backbones that need it (Gemma)."""
    wanted = models.backbone.needs_bos if baseline_bos is None else baseline_bos
    bos = models.backbone.tokenizer.bos_token_id
    if wanted and bos is None:
        raise ConfigError(f"baseline_bos is set but the backbone {models.backbone.spec!r} has no BOS token")
    return bos if wanted else None


def _perplexity(models, docs, methods, tasks, baseline_bos: bool | None = None, **options) -> dict:
    """The perplexity comparison (and the diagnostics from its HMT traces), printed; their results."""
    cfg = models.model.config
    longest = max(int(d.ids.shape[0]) for d in docs)
    if "hmt-attention" in methods and longest <= cfg.segment_length * (cfg.cache_size + 1):
        log.warning("no document outlasts the cache (%d segments of %d tokens): FIFO and attention eviction give "
                    "identical results; lower --cache-size to compare them", cfg.cache_size, cfg.segment_length)
    ppl = evaluate_perplexity(models.variants, models.backbone.model, docs, methods, cfg.segment_length,
                              bos_token_id=_bos(models, baseline_bos), recall="diagnostics" in tasks, **options)
    out = {}
    if "perplexity" in tasks:
        out["perplexity"] = ppl.to_dict()
        print(f"\nPerplexity on {len(docs)} document(s), {ppl.settings['tokens_scored']} tokens scored per method, "
              f"segment length {cfg.segment_length}:")
        print(report.perplexity_table(out["perplexity"]))
    if "diagnostics" in tasks:
        out["diagnostics"] = memory_diagnostics(ppl.traces, cfg.cache_size)
        print("\nMemory diagnostics (recall distance in segments; eviction ages):")
        print(report.diagnostics_table(out["diagnostics"]))
    return out


def _recall(models, samples, window: int | None, seed: int, baseline_bos: bool | None = None) -> dict:
    """HMT against the sliding-window backbone on the recall samples, printed; the results."""
    tok, win = models.backbone.tokenizer, window or models.model.config.segment_length
    eos, bos = tok.eos_token_id, _bos(models, baseline_bos)
    answerers = {"hmt": lambda ids, n: hmt_greedy(models.model, ids, n, eos),
                 "sliding": lambda ids, n: sliding_greedy(models.backbone.model, ids, win, n, eos, bos)}
    res = run_recall(samples, answerers, tok)
    print(f"\nRecall accuracy (HMT vs the backbone with a {win}-token sliding window, seed {seed}):")
    print(report.recall_table(res["summary"]))
    return res


def _write(folder: Path, results: dict) -> None:
    written = [report.write_json(folder / "results.json", results)]
    if "perplexity" in results:
        written.append(report.write_csv(folder / "perplexity.csv", report.perplexity_rows(results["perplexity"])))
    if "recall" in results:
        written.append(report.write_csv(folder / "recall.csv", results["recall"]["records"]))
    if results.get("diagnostics"):
        written.append(plot_diagnostics(results["diagnostics"], folder / "memory_diagnostics.png"))
    print("\nwrote " + ", ".join(str(p) for p in written))
