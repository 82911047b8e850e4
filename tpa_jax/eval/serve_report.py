"""Options, summary and figure of the serving benchmark (``tpa_jax.eval.serve_bench``).

* :func:`add_serve_bench_arguments` and :func:`run_serve_bench_args` -- the options shared by
  ``python eval.py serve-bench`` and ``bench/serve.py``; ``--smoke`` swaps the defaults for tiny
  ones (a 64-wide one-layer model, 6 short requests, small budgets: seconds on a CPU), and any option
  given explicitly still wins;
* :func:`write_serve_bench` -- ``serve_bench.json`` and ``serve_bench.png`` in an output directory;
* :func:`format_summary` -- a few lines of text: the concurrency ratios and each run's tokens/s;
* :func:`plot` -- the most concurrent requests (log axis) against the memory budget (log2 axis),
  one line per mechanism x cache dtype (mechanism by colour as in the decode figures, int8
  dashed), on an Agg canvas.
"""
from __future__ import annotations

import argparse
import json
import os
from typing import Optional

__all__ = ["DEFAULTS", "SMOKE", "add_serve_bench_arguments", "run_serve_bench_args", "write_serve_bench",
           "format_summary", "plot"]

DEFAULTS = dict(requests=32, prompt_range=[8, 96], output_range=[4, 64], d_model=256, head_dim=64, n_layer=2,
                max_batch=8, page_size=16, prefill_chunk=64, decode_steps=8, budgets_gib=[0.5, 1, 2, 4, 8],
                concurrency_requests=50_000, reps=3)
SMOKE = dict(requests=6, prompt_range=[4, 12], output_range=[2, 8], d_model=64, head_dim=16, n_layer=1,
             max_batch=4, page_size=8, prefill_chunk=16, decode_steps=4, budgets_gib=[0.0625, 0.125, 0.25],
             concurrency_requests=5_000, reps=1)


def _int_at_least(minimum: int):
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}") from None
        if v < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}")
        return v
    return parse


def _budget(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        v = float("nan")
    if not 0 < v < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}")
    return v


def add_serve_bench_arguments(p: argparse.ArgumentParser, out_default: Optional[str]) -> None:
    """The serving benchmark's options; those left unset take :data:`DEFAULTS` (or :data:`SMOKE`)."""
    from .serve_bench import CACHE_DTYPES, MECHANISMS

    pos = _int_at_least(1)
    p.add_argument("--smoke", action="store_true", help="tiny defaults (seconds on a CPU; the tests run this)")
    p.add_argument("--mechanism", nargs="+", choices=MECHANISMS, default=list(MECHANISMS), metavar="M",
                   help=f"mechanisms (default: {' '.join(MECHANISMS)})")
    p.add_argument("--cache-dtype", nargs="+", choices=CACHE_DTYPES, default=list(CACHE_DTYPES), metavar="D",
                   help=f"cache dtypes (default: {' '.join(CACHE_DTYPES)})")
    p.add_argument("--requests", type=pos, help=f"requests in the timed workload (default {DEFAULTS['requests']})")
    p.add_argument("--prompt-range", type=pos, nargs=2, metavar=("LO", "HI"), help="prompt lengths (default 8 96)")
    p.add_argument("--output-range", type=pos, nargs=2, metavar=("LO", "HI"), help="output lengths (default 4 64)")
    p.add_argument("--seed", type=int, default=0, help="workload seed (default 0)")
    p.add_argument("--d-model", type=pos, help="timed models' width (default 256; heads = d_model / head_dim)")
    p.add_argument("--head-dim", type=pos, help="timed models' d_h (default 64)")
    p.add_argument("--n-layer", type=pos, help="timed models' layers (default 2)")
    p.add_argument("--max-batch", type=pos, help="engine slots and padded batch size (default 8)")
    p.add_argument("--page-size", type=pos, help="tokens per page (default 16)")
    p.add_argument("--prefill-chunk", type=pos, help="engine prefill chunk (default 64)")
    p.add_argument("--decode-steps", type=pos, help="engine decode steps per call while only decoding (default 8)")
    p.add_argument("--run-budget-mb", type=_budget, default=None,
                   help="page pool of the timed runs in MiB (default: max_batch mean requests of the largest cache)")
    p.add_argument("--concurrency-size", default="small", choices=("small", "medium", "large", "xl", "tiny", "mini"),
                   help="configs of the concurrency figures (default small: the paper's t6/mha/gqa/mla-small)")
    p.add_argument("--budget-gib", type=_budget, nargs="+", dest="budgets_gib",
                   help="memory budgets of the concurrency figures in GiB (default 0.5 1 2 4 8)")
    p.add_argument("--concurrency-requests", type=pos, help="requests queued for those figures (default 50000)")
    p.add_argument("--reps", type=pos, help="timed passes of the workload per run; the median is kept (default 3)")
    p.add_argument("--no-run", action="store_true", help="the concurrency figures only (nothing is timed)")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    p.add_argument("--out", default=out_default, help="directory for serve_bench.json and serve_bench.png"
                   + (f" (default {out_default})" if out_default else ""))


def run_serve_bench_args(args: argparse.Namespace) -> dict:
    """``run_serve_bench`` with the options of :func:`add_serve_bench_arguments`."""
    from .serve_bench import run_serve_bench

    kw = dict(SMOKE if args.smoke else DEFAULTS)
    kw.update({k: getattr(args, k) for k in DEFAULTS if getattr(args, k, None) is not None})
    for name in ("prompt_range", "output_range"):
        if kw[name][0] > kw[name][1]:
            raise ValueError(f"--{name.replace('_', '-')}: LO {kw[name][0]} is larger than HI {kw[name][1]}")
    budget = None if args.run_budget_mb is None else int(args.run_budget_mb * 2 ** 20)
    return run_serve_bench(mechanisms=args.mechanism, cache_dtypes=args.cache_dtype, seed=args.seed,
                           concurrency_size=args.concurrency_size, run_budget_bytes=budget, run=not args.no_run,
                           progress=not args.quiet, **kw)


def write_serve_bench(result: dict, out: str) -> tuple[str, str]:
    """``serve_bench.json`` and ``serve_bench.png`` in ``out``; returns their paths."""
    os.makedirs(out, exist_ok=True)
    json_path = os.path.join(out, "serve_bench.json")
    with open(json_path, "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
    return json_path, plot(result, os.path.join(out, "serve_bench.png"))


def _ms(seconds: Optional[float]) -> str:
    return "-" if seconds is None else f"{1e3 * seconds:.1f}"


def format_summary(result: dict) -> str:
    """The headline ratios (with their goals) and one line per timed run."""
    lines = [f"concurrency at {result['ratio_budget_gib']:g} GiB, {result['concurrency']['size']} configs, "
             f"page size {result['concurrency']['page_size']}:"]
    for key, v in result["ratios"].items():
        if key != "engine/padded":
            g = result["goals"].get(key)
            lines.append(f"  {key}: {v:.2f}" + (f" (goal >= {g['goal']:g}: {'met' if g['met'] else 'not met'})"
                                               if g else ""))
    for r in result["runs"]:
        e, p = r["engine"], r["padded"]
        lines.append(f"{r['mechanism']}/{r['cache_dtype']}: engine {e['tokens_per_s']:.1f} tok/s (p50 gap "
                     f"{_ms(e['token_gap']['p50_s'])} ms, p99 {_ms(e['token_gap']['p99_s'])} ms), padded "
                     f"{p['tokens_per_s']:.1f} tok/s, x{r['speedup']:.2f}; {r['max_concurrent']} running in "
                     f"{r['num_pages']} pages")
    return "\n".join(lines)


def plot(result: dict, png_path: str) -> str:
    """Most concurrent requests vs memory budget, a line per mechanism x cache dtype; returns ``png_path``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from .decode_report import COLORS

    conc = result["concurrency"]
    fig = Figure(figsize=(7, 5), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    series: dict = {}
    for e in conc["entries"]:
        series.setdefault((e["mechanism"], e["cache_dtype"], e["config"]), []).append(e)
    for (m, d, name), pts in series.items():
        pts.sort(key=lambda e: e["budget_bytes"])
        ax.plot([e["budget_gib"] for e in pts], [max(e["max_concurrent"], 1e-1) for e in pts], color=COLORS.get(m),
                linestyle="--" if d == "int8" else "-", marker="o" if d == "int8" else "s", markersize=3,
                label=f"{name} ({d})")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("cache memory budget (GiB, log2 scale)")
    ax.set_ylabel("most concurrent requests (log scale)")
    ax.set_title(f"Requests that fit a page pool ({conc['size']} configs, page size {conc['page_size']}, "
                 f"{conc['requests']} queued)", fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png_path, format="png")
    return png_path
