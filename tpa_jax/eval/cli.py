"""Command line of ``eval.py``: one sub-command per evaluation.

    python eval.py kv-report                                # the paper's small family, 80 GiB, bf16
    python eval.py kv-report --family medium --memory-gb 40 --batch 8
    python eval.py kv-report --config t6-small --config mha-small --out runs/eval

Each sub-command is registered by an ``_add_<name>(subparsers)`` function that sets its handler
with ``set_defaults(func=...)``; a handler takes the parsed arguments and returns the exit code.
Bad input prints one ``error: ...`` line on stderr and exits with code 2.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

DEFAULT_FAMILY = "small"
SIZES = ("small", "medium", "large", "xl", "tiny", "mini")


class UsageError(Exception):
    """Bad command-line input: reported as one line on stderr, exit code 2."""


class _Parser(argparse.ArgumentParser):
    """argparse that raises :class:`UsageError` instead of printing usage and exiting."""

    def error(self, message):  # noqa: D401 - argparse API
        raise UsageError(message)


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}") from None
    if not v > 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}")
    return v


def _positive_int(text: str) -> int:
    """An integer >= 1, written plainly or as a power ``a**b`` (e.g. ``2**20``)."""
    t = text.strip()
    try:
        if "**" in t:
            base, exp = t.split("**", 1)
            v = int(base) ** int(exp)
        else:
            v = int(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1 (or a power like 2**20), got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return v


# ------------------------------------------------------------------------------------ kv-report
def _add_kv_report(sub) -> None:
    p = sub.add_parser(
        "kv-report", help="KV-cache bytes per token, ratio to MHA and the longest context that fits",
        description="KV-cache size per token of each mechanism (paper Table 1) and the longest context "
                    "whose cache fits a memory budget (GiB = 2^30 bytes; cache only).")
    p.add_argument("--config", action="append", default=[], metavar="NAME",
                   help="a named config (repeatable), e.g. t6-small, mha-medium")
    p.add_argument("--family", action="append", default=[], choices=SIZES,
                   help=f"every mechanism of one size (repeatable; default: {DEFAULT_FAMILY} when no --config)")
    p.add_argument("--memory-gb", type=_positive_float, default=80.0,
                   help="cache budget in GiB (2^30 bytes; default 80)")
    p.add_argument("--dtype-bytes", type=_positive_int, default=2, help="bytes per cached number (bf16: 2)")
    p.add_argument("--batch", type=_positive_int, default=None,
                   help="also report the longest context per sequence for this many sequences")
    p.add_argument("--max-context", type=_positive_int, default=2 ** 20,
                   help="longest context on the plot's x axis (default 2**20)")
    p.add_argument("--out", default=os.path.join("runs", "eval"),
                   help="output directory for kv_report.json and kv_report.png (default runs/eval)")
    p.set_defaults(func=_run_kv_report)


def _kv_report_configs(args) -> list:
    from .. import configs

    names = list(args.config)
    families = args.family or ([] if names else [DEFAULT_FAMILY])
    for size in families:
        names += [f"{m}-{size}" for m in configs.MECHANISMS]
    pairs = []
    for name in dict.fromkeys(names):  # de-duplicated, order kept
        try:
            pairs.append((name, configs.get(name)))
        except ValueError:
            raise UsageError(f"unknown config {name!r}; expected one of: {', '.join(configs.names())}") from None
    return pairs


def _run_kv_report(args) -> int:
    from .kv_report import format_table, kv_report, plot

    rows = kv_report(_kv_report_configs(args), memory_gb=args.memory_gb, dtype_bytes=args.dtype_bytes,
                     batch=args.batch)
    print(format_table(rows))
    os.makedirs(args.out, exist_ok=True)
    json_path = os.path.join(args.out, "kv_report.json")
    png_path = os.path.join(args.out, "kv_report.png")
    report = dict(memory_gb=args.memory_gb, gb_definition="GiB (2**30 bytes)", dtype_bytes=args.dtype_bytes,
                  batch=args.batch, max_context_plotted=args.max_context, rows=rows)
    with open(json_path, "w") as f:
        json.dump(report, f, indent=1)
        f.write("\n")
    plot(rows, png_path, max_context=args.max_context, memory_gb=args.memory_gb)
    print(f"\nwrote {json_path} and {png_path}")
    return 0


# ------------------------------------------------------------------------------------ main
def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="eval.py", description="Evaluate TPA / T6 models and their baselines.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_kv_report(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        return args.func(args)
    except (UsageError, ValueError, FileNotFoundError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
