"""Continuous batching over the paged cache against padded batched generation, and the most
concurrent requests each mechanism's cache allows in a memory budget.

    python bench/serve.py                                  # tpa, mha, gqa, mla x bf16, int8 caches
    python bench/serve.py --smoke --out runs/serve_bench   # tiny, seconds on a CPU (the tests run it)
    python bench/serve.py --no-run --budget-gib 1 4 16 64  # the concurrency figures only

Serves a seeded workload of ragged requests (prompts 8..96, outputs 4..64 tokens) through
``tpa_jax.inference.Engine`` and through padded ``tpa_jax.generate`` batches, and reports tokens/s,
the gaps between a request's tokens (p50 / p99) and the first-token latency; then, for the paper's
small configs, how many requests fit each budget and the ratios TPA / MHA.  Definitions of every
number: ``tpa_jax.eval.serve_bench``; the options are those of ``python eval.py serve-bench``.

Prints one JSON object on stdout (progress lines go to stderr); ``--out DIR`` also writes
``serve_bench.json`` and ``serve_bench.png`` there.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tpa_jax.eval.serve_report import add_serve_bench_arguments, run_serve_bench_args, write_serve_bench  # noqa: E402


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_serve_bench_arguments(ap, out_default=None)
    args = ap.parse_args(argv)
    if args.smoke:
        from tpa_jax.eval.bench_timing import use_smoke_xla_flags

        use_smoke_xla_flags()  # before jax creates its backend: fast unoptimised CPU compiles
    try:
        result = run_serve_bench_args(args)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    print(json.dumps(result, indent=1))
    if args.out:
        write_serve_bench(result, args.out)
    return result


if __name__ == "__main__":
    main()
