"""Per-token decode time vs context length of MHA, MQA, GQA, MLA and TPA (paper Fig. 5).

    python bench/decode.py                               # d_model 1024 and 2048, batch 1 and 4, 2^10..2^15, bf16
    python bench/decode.py --max-log2 12 --out runs/decode_bench
    python bench/decode.py --d-model 2048 --batch 1 2 4 8 16 --min-log2 12 --max-log2 19 --bandwidth 4.8e12

Times the model's jitted one-token decode step (``ModelConfig.decode_impl``, default "flash";
"pallas" times TPA alone) against a full cache of each context length, with the figure's
settings: d_h = 64 and h = d_model / 64 for every mechanism, TPA ranks (16, 1, 1), GQA with 4 KV
groups, MLA latents scaled from App. I (d_c = d_model/8, d'_c = 3 d_model/8, d^R_h = 32).  The mechanisms of one
point are timed interleaved; points whose cache would exceed ``--memory-cap-gb`` are skipped.
Definitions of every number: ``tpa_jax.eval.decode_bench``; the options are those of
``python eval.py decode-bench``.

Prints one JSON object on stdout (progress lines go to stderr); ``--out DIR`` also writes
``decode_bench.json`` and ``decode_bench.png`` there.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tpa_jax.eval.cli import UsageError, add_decode_bench_arguments, run_decode_bench_args, write_decode_bench  # noqa: E402


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_decode_bench_arguments(ap, out_default=None)
    args = ap.parse_args(argv)
    try:
        result = run_decode_bench_args(args)
    except (ValueError, UsageError) as e:
        raise SystemExit(f"error: {e}") from None
    print(json.dumps(result, indent=1))
    if args.out:
        write_decode_bench(result, args.out)
    return result


if __name__ == "__main__":
    main()
