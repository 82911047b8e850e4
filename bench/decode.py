"""Per-token decode time vs context length of MHA, MQA, GQA, MLA and TPA (paper Fig. 5).

    python bench/decode.py                               # d_model 1024 and 2048, batch 1 and 4, 2^10..2^15, bf16
    python bench/decode.py --max-log2 12 --out runs/decode_bench
    python bench/decode.py --d-model 2048 --batch 1 2 4 8 16 --min-log2 12 --max-log2 19 --bandwidth 4.8e12

Times the model's jitted one-token decode step (``ModelConfig.decode_impl``, default "flash")
against a full cache of each context length, with the figure's settings: d_h = 64 and
h = d_model / 64 for every mechanism, TPA ranks (16, 1, 1), GQA with 4 KV groups, MLA latents
scaled from App. I (d_c = d_model/8, d'_c = 3 d_model/8, d^R_h = 32).  The mechanisms of one
point are timed interleaved; points whose cache would exceed ``--memory-cap-gb`` are skipped.
Definitions of every number: ``tpa_jax.eval.decode_bench``.

Prints one JSON object on stdout (progress lines go to stderr); ``--out DIR`` also writes
``decode_bench.json`` and ``decode_bench.png`` there.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tpa_jax.eval.decode_bench import MECHANISMS, plot, run_decode_bench  # noqa: E402


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--d-model", type=int, nargs="+", default=[1024, 2048])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--min-log2", type=int, default=10, help="shortest context 2**N (default 10)")
    ap.add_argument("--max-log2", type=int, default=15, help="longest context 2**N (default 15)")
    ap.add_argument("--mechanism", nargs="+", choices=MECHANISMS, default=list(MECHANISMS))
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--n-layer", type=int, default=1)
    ap.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                    help="default auto: float32 on CPU (bf16 matmuls are emulated there), bfloat16 elsewhere")
    ap.add_argument("--reps", type=int, default=10, help="timed steps per point and mechanism")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps after compiling")
    ap.add_argument("--decode-impl", default="flash", choices=("flash", "pallas", "materialize"))
    ap.add_argument("--bandwidth", type=float, default=None, help="memory bandwidth in bytes/s (e.g. 4.8e12)")
    ap.add_argument("--memory-cap-gb", type=float, default=4.0, help="skip caches above this many GiB")
    ap.add_argument("--param-init", default="model", choices=("model", "fast"),
                    help="model: the model's init; fast: pseudo-random weights (quicker to compile on CPU)")
    ap.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    ap.add_argument("--out", default=None, help="directory for decode_bench.json and decode_bench.png")
    args = ap.parse_args(argv)
    try:
        result = run_decode_bench(
            d_models=args.d_model, batch_sizes=args.batch, min_log2=args.min_log2, max_log2=args.max_log2,
            mechanisms=args.mechanism, n_layer=args.n_layer, head_dim=args.head_dim, dtype=args.dtype,
            reps=args.reps, warmup=args.warmup, decode_impl=args.decode_impl, bandwidth=args.bandwidth,
            memory_cap_gb=args.memory_cap_gb, param_init=args.param_init, progress=not args.quiet)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    print(json.dumps(result, indent=1))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "decode_bench.json"), "w") as f:
            json.dump(result, f, indent=1)
            f.write("\n")
        if result["entries"]:
            plot(result, os.path.join(args.out, "decode_bench.png"))
    return result


if __name__ == "__main__":
    main()
