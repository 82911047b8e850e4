"""Evaluation tools of ``eval.py``: KV-cache report (``kv_report``); the CLI lives in ``cli``."""
from .kv_report import format_table, kv_report, plot

__all__ = ["kv_report", "format_table", "plot"]
