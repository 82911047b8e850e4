"""Compiled temporary memory of one T6 training step per attention implementation and length.

    python bench/memory.py                  # T = 2k, 4k, 8k, 16k; "xla" and "blocked"
    python bench/memory.py --smoke          # T = 128, 256 on a 1-layer model (seconds; for the test)
    python bench/memory.py --seq-lens 4096,32768 --block-size 256

The step is ``tpa_jax.train.step.make_train_step`` (loss, gradients, AdamW update) of a small T6
(``--size``, d_model and layers overridable) at batch ``--batch``; it is only lowered and compiled
on abstract arguments, never run, so long lengths cost compile time, not memory.  The figure is
XLA's ``memory_analysis().temp_size_in_bytes``: the buffers the step needs besides its arguments
and outputs (activations kept for the backward, scores, workspaces).

Prints one JSON object: per implementation and length the temp bytes, ``ratio_to_xla`` (blocked /
xla at each length, same run) and ``growth`` (bytes at T over bytes at the previous T, per
implementation: about 2 per doubling is linear in T, about 4 quadratic).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tpa_jax.eval.bench_timing import environment, use_smoke_xla_flags  # noqa: E402

if "--smoke" in sys.argv[1:]:
    use_smoke_xla_flags()  # before the first array creates the backend

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from tpa_jax import configs  # noqa: E402
from tpa_jax.config import DataConfig, OptimConfig, TrainConfig  # noqa: E402
from tpa_jax.model import init_params  # noqa: E402
from tpa_jax.train.optimizer import lr_schedule, make_optimizer  # noqa: E402
from tpa_jax.train.step import make_train_step  # noqa: E402

BASELINE = "xla"


def step_memory(cfg, batch: int, seq_len: int) -> dict:
    """Compile one training step of ``cfg`` on abstract arguments: temp bytes and compile seconds."""
    tcfg = TrainConfig(model=cfg, data=DataConfig(seq_len=seq_len), optim=OptimConfig(warmup_steps=0), steps=10,
                       batch_size=batch)
    tx = make_optimizer(tcfg.optim, tcfg.steps)
    step = make_train_step(tcfg, tx, lr_schedule(tcfg.optim, tcfg.steps))
    params = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    state = {"step": jax.ShapeDtypeStruct((), jnp.int32), "params": params,
             "opt_state": jax.eval_shape(tx.init, params)}
    tokens = jax.ShapeDtypeStruct((batch, seq_len), jnp.int32)
    t0 = time.perf_counter()
    compiled = jax.jit(step).lower(state, {"inputs": tokens, "targets": tokens}).compile()
    mem = compiled.memory_analysis()
    return {"temp_bytes": int(mem.temp_size_in_bytes), "argument_bytes": int(mem.argument_size_in_bytes),
            "compile_s": round(time.perf_counter() - t0, 2)}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seq-lens", default="2048,4096,8192,16384", help="comma-separated lengths")
    ap.add_argument("--impls", default="xla,blocked", help=f"comma-separated attention_impl values ({BASELINE} first)")
    ap.add_argument("--size", default="tiny", help="t6 family size (default tiny: d_model 64, 2 layers)")
    ap.add_argument("--n-layer", type=int, default=None)
    ap.add_argument("--d-model", type=int, default=None)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--block-size", type=int, default=None, help="attention_block_size (default the config's)")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="compute dtype")
    ap.add_argument("--smoke", action="store_true", help="T = 128, 256, one layer, block 64 (not a measurement)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.seq_lens, args.n_layer, args.block_size = "128,256", 1, 64
    seq_lens = [int(v) for v in args.seq_lens.split(",")]
    impls = [v.strip() for v in args.impls.split(",")]
    if impls[0] != BASELINE:
        raise SystemExit(f"--impls: the first must be the baseline {BASELINE!r}, got {impls}")
    fields = dict(compute_dtype=args.dtype, max_seq_len=max(seq_lens))
    for k in ("n_layer", "d_model"):
        if getattr(args, k) is not None:
            fields[k] = getattr(args, k)
    if args.block_size is not None:
        fields["attention_block_size"] = args.block_size
    base = configs.get(f"t6-{args.size}", **fields)

    results = {impl: {} for impl in impls}
    for impl in impls:
        cfg = dataclasses.replace(base, attention_impl=impl)
        for t in seq_lens:
            results[impl][str(t)] = step_memory(cfg, args.batch, t)
    temp = {impl: {t: r["temp_bytes"] for t, r in rs.items()} for impl, rs in results.items()}
    ratios = {impl: {t: round(temp[impl][t] / temp[BASELINE][t], 4) for t in temp[impl]} for impl in impls[1:]}
    growth = {impl: {str(b): round(temp[impl][str(b)] / temp[impl][str(a)], 3) for a, b in zip(seq_lens, seq_lens[1:])}
              for impl in impls}
    out = {
        "benchmark": "train_step_temp_memory",
        "config": {"model": f"t6-{args.size}", "n_layer": base.n_layer, "d_model": base.d_model, "n_head": base.n_head,
                   "head_dim": base.head_dim, "batch": args.batch, "compute_dtype": args.dtype,
                   "attention_block_size": base.attention_block_size, "seq_lens": seq_lens, "impls": impls,
                   "smoke": args.smoke, **environment()},
        "baseline": BASELINE,
        "results": results,
        f"ratio_to_{BASELINE}": ratios,
        "growth": growth,
    }
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
