"""Evaluation: long-document perplexity against baselines, recall tasks, memory diagnostics, lm-eval.

``hiermem eval`` (:func:`hiermem.evaluation.cli.evaluate`) runs them together; the pieces are
usable alone. The lm-evaluation-harness adapter lives in :mod:`hiermem.evaluation.lm_eval_adapter`
(imported on demand: it needs ``lm-eval``).
"""

from hiermem.evaluation.diagnostics import eviction_stats, memory_diagnostics, plot_diagnostics, recall_histogram
from hiermem.evaluation.loading import EvalModels, load_eval_models, load_token_documents, select_documents
from hiermem.evaluation.perplexity import (METHODS, NLLTally, PerplexityResult, TokenDocument, evaluate_perplexity,
                                           hmt_nll, plan_windows, window_nll)
from hiermem.evaluation.readers import hmt_greedy, read_prompt, sliding_greedy
from hiermem.evaluation.tasks import extract_answer, haystack_pool, needle_samples, passkey_samples, run_recall

__all__ = ["METHODS", "EvalModels", "NLLTally", "PerplexityResult", "TokenDocument", "evaluate_perplexity",
           "eviction_stats", "extract_answer", "haystack_pool", "hmt_greedy", "hmt_nll", "load_eval_models",
           "load_token_documents", "memory_diagnostics", "needle_samples", "passkey_samples", "plan_windows",
           "plot_diagnostics", "read_prompt", "recall_histogram", "run_recall", "select_documents",
           "sliding_greedy", "window_nll"]
