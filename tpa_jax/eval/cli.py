"""Command line of ``eval.py``: one sub-command per evaluation.

    python eval.py kv-report                                # the paper's small family, 80 GiB, bf16
    python eval.py kv-report --config t6-small --config mha-small --out runs/eval
    python eval.py perplexity --checkpoint runs/t6-tiny     # loss / perplexity on held-out shards
    python eval.py cache-quality --checkpoint runs/t6-tiny  # the same through float32 and int8 decode caches
    python eval.py generate --checkpoint runs/t6-tiny --prompt "def "
    python eval.py decode-bench --max-log2 15               # per-token decode time (paper Fig. 5)
    python eval.py serve-bench --smoke                      # continuous batching and concurrency at a budget

Each sub-command is registered by an ``_add_<name>(subparsers)`` function that sets its handler
with ``set_defaults(func=...)``; a handler takes the parsed arguments and returns the exit code.
Bad input prints one ``error: ...`` line on stderr and exits with code 2; an unexpected error
prints one ``error: <type>: <message>`` line and exits 1 (its traceback only with
``TPA_JAX_DEBUG=1``).  The decode benchmark's options (:func:`add_decode_bench_arguments`) are
shared with ``bench/decode.py``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional

from ..config import DECODE_IMPLS, DTYPES

DEFAULT_FAMILY = "small"
SIZES = ("small", "medium", "large", "xl", "tiny", "mini")


def _checkpoint_error():
    """The project's CheckpointError, imported only when an exception is being handled."""
    from ..train.checkpoint import CheckpointError

    return CheckpointError


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


# ------------------------------------------------------------------------------------ perplexity
def _add_checkpoint_args(p) -> None:
    p.add_argument("--checkpoint", required=True, metavar="DIR",
                   help="a training run directory (or its checkpoints/ folder)")
    p.add_argument("--step", type=_positive_int, default=None, help="checkpoint step (default: the latest)")


def _load_run(args):
    import tpa_jax

    return tpa_jax.load(args.checkpoint, step=args.step)


def _report(res: dict, args) -> int:
    """Print a checkpoint evaluation's result as one JSON line, and write it to ``--out`` if given."""
    res["checkpoint"] = os.path.abspath(args.checkpoint)
    print(json.dumps(res))
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
    return 0


def _add_perplexity(sub) -> None:
    p = sub.add_parser("perplexity", help="validation loss and perplexity of a checkpoint",
                       description="Loss and perplexity of a checkpoint on held-out shards (default: the "
                                   "validation split of the data it was trained on).")
    _add_checkpoint_args(p)
    p.add_argument("--data", default=None, metavar="MANIFEST",
                   help="prepared shards (manifest.json or its directory; default: the run's own data)")
    p.add_argument("--split", default="val", help="split to read (default val)")
    p.add_argument("--seq-len", type=_positive_int, default=None, help="window length (default: the run's)")
    p.add_argument("--batch-size", type=_positive_int, default=8, help="windows per batch (default 8)")
    p.add_argument("--max-batches", type=_positive_int, default=None, help="stop after this many batches")
    p.add_argument("--out", default=None, metavar="FILE", help="also write the result as JSON here")
    p.add_argument("--allow-tokenizer-mismatch", action="store_true",
                   help="score data tokenized differently from the checkpoint (refused by default)")
    p.set_defaults(func=_run_perplexity)


def _run_perplexity(args) -> int:
    from .perplexity import perplexity

    res = perplexity(_load_run(args), args.data, split=args.split, seq_len=args.seq_len,
                     batch_size=args.batch_size, max_batches=args.max_batches,
                     allow_tokenizer_mismatch=args.allow_tokenizer_mismatch)
    return _report(res, args)


def _add_cache_quality(sub) -> None:
    p = sub.add_parser("cache-quality", help="perplexity through decode caches of different dtypes",
                       description="Teacher-forced decoding of held-out shards through a decode cache of each "
                                   "--cache-dtype: loss, perplexity, its change and max |d logits| against the first.")
    _add_checkpoint_args(p)
    p.add_argument("--data", default=None, metavar="MANIFEST", help="prepared shards (default: the run's own data)")
    p.add_argument("--split", default="val", help="split to read (default val)")
    p.add_argument("--seq-len", type=_positive_int, default=None, help="window length (default: the run's)")
    p.add_argument("--batch-size", type=_positive_int, default=8, help="windows per batch (default 8)")
    p.add_argument("--max-batches", type=_positive_int, default=4, help="batches to score (default 4)")
    p.add_argument("--cache-dtype", nargs="+", default=["float32", "int8"], metavar="DTYPE",
                   help="cache dtypes, the reference first (default: float32 int8)")
    p.add_argument("--out", default=None, metavar="FILE", help="also write the result as JSON here")
    p.set_defaults(func=_run_cache_quality)


def _run_cache_quality(args) -> int:
    from .cache_quality import cache_quality

    res = cache_quality(_load_run(args), args.data, cache_dtypes=args.cache_dtype, split=args.split,
                        seq_len=args.seq_len, batch_size=args.batch_size, max_batches=args.max_batches)
    return _report(res, args)


# ------------------------------------------------------------------------------------ generate
def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="continue a prompt with a checkpoint",
                       description="Continue --prompt with a checkpoint (greedy unless --temperature > 0).")
    _add_checkpoint_args(p)
    p.add_argument("--prompt", action="append", required=True, metavar="TEXT",
                   help="prompt text (repeatable: the prompts are generated as one batch)")
    p.add_argument("--max-new-tokens", type=_positive_int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=_positive_int, default=None)
    p.add_argument("--top-p", type=_positive_float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the texts")
    p.set_defaults(func=_run_generate)


def _run_generate(args) -> int:
    run = _load_run(args)
    texts = run.generate(args.prompt, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                         top_p=args.top_p, seed=args.seed)
    if args.json:
        print(json.dumps({"step": run.step, "prompts": args.prompt, "completions": texts}))
    else:
        for prompt, text in zip(args.prompt, texts):
            print(prompt + text)
    return 0


# ------------------------------------------------------------------------------------ decode-bench
def add_decode_bench_arguments(p: argparse.ArgumentParser, out_default: Optional[str]) -> None:
    """The decode benchmark's options (shared by ``eval.py decode-bench`` and ``bench/decode.py``)."""
    from .decode_bench import MECHANISMS, PALLAS_MECHANISMS

    p.add_argument("--d-model", type=_positive_int, nargs="+", default=[1024, 2048], metavar="M",
                   help="embedding dimensions (default 1024 2048); heads = d_model / head_dim")
    p.add_argument("--batch", type=_positive_int, nargs="+", default=[1, 4], metavar="B",
                   help="batch sizes (default 1 4)")
    p.add_argument("--min-log2", type=int, default=10, help="shortest context 2**N (default 10)")
    p.add_argument("--max-log2", type=int, default=15, help="longest context 2**N (default 15)")
    p.add_argument("--mechanism", nargs="+", choices=MECHANISMS, default=None,
                   help=f"mechanisms to time (default: all five; {', '.join(PALLAS_MECHANISMS)} only with "
                        "--decode-impl pallas, the only one its kernel covers)")
    p.add_argument("--head-dim", type=_positive_int, default=64, help="d_h of every mechanism (default 64)")
    p.add_argument("--n-layer", type=_positive_int, default=1, help="layers of the timed model (default 1)")
    p.add_argument("--dtype", default="auto", choices=("auto",) + DTYPES,
                   help="compute, weight and cache dtype (default auto: float32 on CPU, bfloat16 elsewhere)")
    p.add_argument("--cache-dtype", default=None, choices=("float32", "bfloat16", "float16", "int8"),
                   help="decode cache dtype (default: --dtype; int8: quantised with float32 scales)")
    p.add_argument("--reps", type=_positive_int, default=10, help="timed steps per point and mechanism")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps after compiling (default 2)")
    p.add_argument("--decode-impl", default="flash", choices=DECODE_IMPLS,
                   help="ModelConfig.decode_impl (default flash)")
    p.add_argument("--bandwidth", type=_positive_float, default=None,
                   help="memory bandwidth in bytes/s (e.g. 4.8e12): adds the memory-bound time per point")
    p.add_argument("--memory-cap-gb", type=_positive_float, default=4.0,
                   help="skip points whose cache exceeds this many GiB (default 4)")
    p.add_argument("--param-init", default="model", choices=("model", "fast"),
                   help="model: the model's init; fast: pseudo-random weights of the same shapes")
    p.add_argument("--prefill-lengths", type=_positive_int, nargs="*", default=[4096, 16384], metavar="P",
                   help="TPA cached-prefill prompt lengths, Alg. 1 vs materialize (default 4096 16384; none: skip)")
    p.add_argument("--prefill-chunk", type=_positive_int, default=1024,
                   help="tokens per prefill call (default 1024; must divide every prefill length)")
    p.add_argument("--prefill-reps", type=_positive_int, default=3, help="timed prompts per prefill point (default 3)")
    p.add_argument("--prefill-only", action="store_true", help="time only the prefill points (no decode steps)")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    p.add_argument("--out", default=out_default,
                   help="output directory for decode_bench.json and decode_bench.png"
                        + (f" (default {out_default})" if out_default else ""))


def run_decode_bench_args(args: argparse.Namespace) -> dict:
    """``run_decode_bench`` with the options of :func:`add_decode_bench_arguments`."""
    from .decode_bench import run_decode_bench

    if args.min_log2 > args.max_log2:
        raise UsageError(f"--min-log2 {args.min_log2} is larger than --max-log2 {args.max_log2}")
    return run_decode_bench(
        d_models=args.d_model, batch_sizes=args.batch, min_log2=args.min_log2, max_log2=args.max_log2,
        mechanisms=args.mechanism, n_layer=args.n_layer, head_dim=args.head_dim, dtype=args.dtype, reps=args.reps,
        warmup=args.warmup, decode_impl=args.decode_impl, bandwidth=args.bandwidth,
        memory_cap_gb=args.memory_cap_gb, param_init=args.param_init, prefill_lengths=args.prefill_lengths,
        prefill_chunk=args.prefill_chunk, prefill_reps=args.prefill_reps, prefill_only=args.prefill_only,
        progress=not args.quiet, cache_dtype=args.cache_dtype)


def write_decode_bench(result: dict, out: str) -> tuple[str, Optional[str]]:
    """``decode_bench.json`` and, when anything was measured, ``decode_bench.png`` in ``out``;
    returns their paths (the figure's None when every point was skipped)."""
    from .decode_report import plot

    os.makedirs(out, exist_ok=True)
    json_path = os.path.join(out, "decode_bench.json")
    with open(json_path, "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
    if not result["entries"]:
        return json_path, None
    return json_path, plot(result, os.path.join(out, "decode_bench.png"))


def _add_decode_bench(sub) -> None:
    p = sub.add_parser(
        "decode-bench", help="per-token decode time vs context length of every mechanism (paper Fig. 5)",
        description="Times the model's jitted one-token decode step against a full cache at contexts "
                    "2**min-log2 .. 2**max-log2 (d_h, TPA ranks (16,1,1), GQA 4 groups as in Fig. 5) and "
                    "reports ms per token per mechanism and TPA's time ratios to the others.")
    add_decode_bench_arguments(p, os.path.join("runs", "decode_bench"))
    p.set_defaults(func=_run_decode_bench)


def _run_decode_bench(args) -> int:
    from .decode_report import format_table

    result = run_decode_bench_args(args)
    print(format_table(result))
    json_path, png_path = write_decode_bench(result, args.out)
    if png_path:
        print(f"\nwrote {json_path} and {png_path}")
    else:
        print(f"\nwrote {json_path} (no decode point measured: no plot)")
    return 0


# ------------------------------------------------------------------------------------ serve-bench
def _add_serve_bench(sub) -> None:
    from .serve_report import add_serve_bench_arguments

    p = sub.add_parser("serve-bench", help="continuous batching vs padded generate; concurrency at a memory budget",
                       description="Serves ragged requests through the paged engine and through padded generate "
                                   "batches (tokens/s, token latency), and counts the requests each mechanism's "
                                   "cache fits in memory budgets (the options of bench/serve.py).")
    add_serve_bench_arguments(p, os.path.join("runs", "serve_bench"))
    p.set_defaults(func=_run_serve_bench)


def _run_serve_bench(args) -> int:
    from .serve_report import format_summary, run_serve_bench_args, write_serve_bench

    result = run_serve_bench_args(args)
    print(format_summary(result))
    print("\nwrote {} and {}".format(*write_serve_bench(result, args.out)))
    return 0


# ------------------------------------------------------------------------------------ main
def build_parser() -> argparse.ArgumentParser:
    script = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0].endswith(".py") else ""
    parser = _Parser(prog=script if script == "eval.py" else "tpa-eval",
                     description="Evaluate TPA / T6 models and their baselines.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_kv_report(sub)
    _add_perplexity(sub)
    _add_cache_quality(sub)
    _add_generate(sub)
    _add_decode_bench(sub)
    _add_serve_bench(sub)
    return parser


def main(argv=None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return args.func(args)
    except (UsageError, ValueError, FileNotFoundError, _checkpoint_error()) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except Exception as e:  # unexpected: one line, exit 1; the traceback only with TPA_JAX_DEBUG=1
        if os.environ.get("TPA_JAX_DEBUG") == "1":
            raise
        lines = str(e).strip().splitlines()
        print(f"error: {type(e).__name__}: {lines[0] if lines else ''}", file=sys.stderr)
        return 1
