"""Evaluation of TPA / T6 models: the KV-cache report (``kv_report``), validation perplexity
(``perplexity``), recall accuracy (``recall``), the per-token decode benchmark (``decode_bench``,
``decode_report``, with the benchmark helpers ``bench_weights`` and ``bench_timing``), the int8
cache quality (``cache_quality``), the serving benchmark (``serve_bench``, ``serve_report``) and the
lm-evaluation-harness adapter (``lm_eval_adapter``, ``lm_eval_base``, ``lm_eval_scoring``); the
command line of ``eval.py`` is ``cli``."""
from .kv_report import format_table, kv_report, plot

__all__ = ["kv_report", "format_table", "plot"]
