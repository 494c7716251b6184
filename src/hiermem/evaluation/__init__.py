"""Evaluation: long-document perplexity and bits per byte against baselines, recall tasks, memory
diagnostics, lm-eval.

``hiermem eval`` (:func:`hiermem.evaluation.cli.evaluate`) runs them together; the pieces are
usable alone: :func:`score_model` scores one model of any family on tokenised documents (an
:class:`NLLTally` with ppl and bpb overall and by segment), :func:`evaluate_perplexity` compares
a checkpoint's methods on the same tokens. The lm-evaluation-harness adapter lives in
:mod:`hiermem.evaluation.lm_eval_adapter` (imported on demand: it needs ``lm-eval``).
"""

from hiermem.evaluation.diagnostics import eviction_stats, memory_diagnostics, plot_diagnostics, recall_histogram
from hiermem.evaluation.loading import (EvalModels, checkpoint_spec, load_eval_models, load_token_documents,
                                        select_documents)
from hiermem.evaluation.perplexity import (BACKBONE_METHODS, METHODS, MODEL_METHOD, NLLTally, PerplexityResult,
                                           TokenDocument, available_methods, default_methods, evaluate_perplexity,
                                           hmt_nll, model_nll, plan_windows, score_model, segment_bytes, token_bytes,
                                           window_nll)
from hiermem.evaluation.readers import hmt_greedy, model_generate, model_greedy, read_prompt, sliding_greedy
from hiermem.evaluation.tasks import extract_answer, haystack_pool, needle_samples, passkey_samples, run_recall

__all__ = ["BACKBONE_METHODS", "METHODS", "MODEL_METHOD", "EvalModels", "NLLTally", "PerplexityResult",
           "TokenDocument", "available_methods", "checkpoint_spec", "default_methods", "evaluate_perplexity",
           "eviction_stats", "extract_answer", "haystack_pool", "hmt_greedy", "hmt_nll", "load_eval_models",
           "load_token_documents", "memory_diagnostics", "model_generate", "model_greedy", "model_nll",
           "needle_samples", "passkey_samples", "plan_windows", "plot_diagnostics", "read_prompt",
           "recall_histogram", "run_recall", "score_model", "segment_bytes", "select_documents",
           "sliding_greedy", "token_bytes", "window_nll"]
