"""Compilations of a notebook session: how many programs ``Run.generate`` and ``Run.logits``
compile over a sequence of calls with different prompt lengths, ``max_new_tokens`` and lengths.

    python bench/compile_counts.py                          # a random-init t6-tiny
    python bench/compile_counts.py --checkpoint runs/t6-tiny

Counts come from ``tpa_jax.inference.count_compiles`` (``jax.monitoring``'s lowering event), so
they do not depend on timing; the seconds per call are printed beside them for scale.  Prints one
JSON object: per call, its arguments, its length buckets, its compilations and its wall time; and
totals.  Calls after the first in each bucket should compile nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

import tpa_jax  # noqa: E402
from tpa_jax.config import TrainConfig  # noqa: E402
from tpa_jax.data.tokenizers import load_tokenizer  # noqa: E402
from tpa_jax.inference.generate import (CACHE_BUCKET, NEW_TOKENS_BUCKET, PROMPT_BUCKET,  # noqa: E402
                                        count_compiles, length_bucket)
from tpa_jax.run import LOGITS_BUCKET, Run  # noqa: E402

# (prompt, max_new_tokens): lengths that a notebook user tries one after another
GENERATE_CALLS = [("def ", 10), ("import os\n", 20), ("class Parser(object):", 40), ("def f(x):", 25),
                  ("import sys", 12), ("for i in range(10):", 33)]
LOGITS_LENGTHS = [5, 9, 17, 30, 12, 64, 40]


def random_run(name: str) -> Run:
    cfg = tpa_jax.configs.get(name)
    params = tpa_jax.init_params(cfg, jax.random.key(0))
    return Run(config=cfg, params=params, tokenizer=load_tokenizer("byte"), train_config=TrainConfig(model=cfg),
               step=0, checkpoint_dir="")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default=None, help="a run directory (default: a random-init --model)")
    p.add_argument("--model", default="t6-tiny", help="named model config for the random-init run")
    args = p.parse_args(argv)
    run = tpa_jax.load(args.checkpoint) if args.checkpoint else random_run(args.model)
    cap = run.config.max_seq_len
    calls = []
    for prompt, n in GENERATE_CALLS:
        k = len(run.encode(prompt))
        with count_compiles() as c:
            t0 = time.perf_counter()
            run.generate(prompt, n)
            dt = time.perf_counter() - t0
        calls.append(dict(call="generate", prompt_tokens=k, max_new_tokens=n, compiles=c.count, seconds=round(dt, 3),
                          buckets=[min(length_bucket(k, PROMPT_BUCKET), cap), length_bucket(n, NEW_TOKENS_BUCKET),
                                   length_bucket(k + n, CACHE_BUCKET, cap)]))
    for length in LOGITS_LENGTHS:
        with count_compiles() as c:
            t0 = time.perf_counter()
            run.logits([[1] * length])
            dt = time.perf_counter() - t0
        calls.append(dict(call="logits", length=length, compiles=c.count, seconds=round(dt, 3),
                          buckets=[length_bucket(length, LOGITS_BUCKET, cap)]))
    out = dict(model=run.config.attention, backend=jax.default_backend(), calls=calls,
               total_compiles={k: sum(c["compiles"] for c in calls if c["call"] == k) for k in ("generate", "logits")},
               calls_that_compiled={k: sum(c["compiles"] > 0 for c in calls if c["call"] == k)
                                    for k in ("generate", "logits")})
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
