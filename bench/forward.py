"""Training-step throughput (forward + backward + SGD update) of every attention mechanism.

    python bench/forward.py                      # mini family, batch 8 x 256 tokens, float32
    python bench/forward.py --quick              # smoke run (seconds)
    python bench/forward.py --heads matched      # re-choose head counts by counting parameters
    python bench/forward.py --attention-impl blocked              # every mechanism on one attention_impl
    python bench/forward.py --attention-impl xla,blocked --size tiny   # implementations compared, T = 1k, 8k

All mechanisms share d_model, layers, head_dim and vocabulary (``tpa_jax.configs.family(size)``),
with the family's head counts, which are chosen so that one attention layer's parameters are
closest to MHA's (Table 10's rule).  The JSON reports each mechanism's attention parameters and
their ratio to MHA's so the match is checked on every run; ``--heads matched`` re-chooses the
head counts here from ``tpa_jax.accounting``'s parameter counts (independent of the configs table).
The step is ``value_and_grad`` of the model entry point's ``loss_fn(cfg)`` and a plain SGD update.

Steps of all mechanisms are timed interleaved (round robin, rotating order) in one process after
one compile and ``--warmup`` untimed steps each, so machine-load drift hits every mechanism alike.
Prints one JSON object: configuration, per-mechanism medians / tokens per second / parameter counts,
and ``ratio_to_mha`` (tokens/s over MHA's, wall clock); ``ratio_to_mha_cpu_time`` is the same ratio
from the process's CPU time per step, which other load on a shared machine disturbs less.

With several ``--attention-impl`` values (the first is the baseline) it instead times each of
``--mechanisms`` (default t6) under each implementation at every ``--impl-seq-lens`` length (default
1024 and 8192, batch 1), interleaved per length, and reports ``time_ratio_to_<baseline>``: median
step time over the baseline's, per mechanism and length.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tpa_jax.eval.bench_timing import compile_timed, environment, time_interleaved, use_smoke_xla_flags  # noqa: E402

if "--quick" in sys.argv[1:]:
    use_smoke_xla_flags()  # before the first array creates the backend

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from tpa_jax import accounting, configs, loss_fn  # noqa: E402
from tpa_jax.eval.bench_weights import bench_params  # noqa: E402

BASELINE = "mha"


def param_counts(cfg) -> tuple[int, int]:
    """(attention parameters of one layer incl. W_O, all model parameters)."""
    return int(accounting.attention_params(cfg)), int(accounting.model_params(cfg))


def matched_family(size: str, **overrides) -> dict:
    """configs.family(size) with each mechanism's n_head re-chosen to match MHA's attention parameters."""
    family = configs.family(size, **overrides)
    target, _ = param_counts(configs.replace(family[BASELINE], n_layer=1))
    out = {}
    for name, cfg in family.items():
        if name == BASELINE:
            out[name] = cfg
            continue
        best = None
        for h in range(1, 4 * family[BASELINE].n_head + 1):
            try:
                cand = configs.replace(cfg, n_head=h, n_layer=1)
            except ValueError:  # e.g. GQA heads not divisible by n_kv_head
                continue
            gap = abs(param_counts(cand)[0] - target)
            if best is None or gap < best[0]:
                best = (gap, h)
        out[name] = configs.replace(cfg, n_head=best[1])
    return out


def make_step(cfg):
    """jitted ``(params, tokens [B, T+1]) -> (params after one SGD step, loss)``."""
    loss = loss_fn(cfg)

    @jax.jit
    def step(params, tokens):
        value, grads = jax.value_and_grad(loss)(params, tokens[:, :-1], tokens[:, 1:])
        return jax.tree.map(lambda p, g: p - 1e-3 * g, params, grads), value

    return step


def stepper(s: dict, tokens):
    """One timed step of the state ``s`` ({"step", "params"}), which keeps the new params and loss."""
    def call():
        s["params"], s["loss"] = s["step"](s["params"], tokens)
        return s["params"], s["loss"]
    return call


def compare_impls(args, impls: list) -> dict:
    """Each of ``args.mechanisms`` under each attention implementation, at each length."""
    names = [m.strip() for m in (args.mechanisms or "t6").split(",")]
    seq_lens = [int(v) for v in args.impl_seq_lens.split(",")]
    family = configs.family(args.size, compute_dtype=args.dtype, max_seq_len=max(seq_lens))
    unknown = set(names) - set(family)
    if unknown:
        raise SystemExit(f"--mechanisms: unknown {sorted(unknown)}; expected some of {sorted(family)}")
    results, ratios = {name: {} for name in names}, {name: {} for name in names}
    for t in seq_lens:
        tokens = jax.random.randint(jax.random.key(1), (args.batch, t + 1), 0, family[names[0]].vocab_size,
                                    dtype=jnp.int32)
        state = {}
        for name in names:
            for impl in impls:
                cfg = configs.replace(family[name], attention_impl=impl)
                params = bench_params(cfg, "fast" if args.quick else "model")
                compiled, compile_s = compile_timed(make_step(cfg), params, tokens)
                for _ in range(args.warmup):
                    params, loss = compiled(params, tokens)
                jax.block_until_ready(params)
                state[f"{name}/{impl}"] = dict(step=compiled, params=params, compile_s=compile_s)
        times = time_interleaved({key: stepper(s, tokens) for key, s in state.items()}, args.reps)
        for name in names:
            med = {impl: statistics.median(times[f"{name}/{impl}"]["wall"]) for impl in impls}
            results[name][str(t)] = {
                impl: dict(median_s=round(med[impl], 6), tokens_per_s=round(args.batch * t / med[impl], 1),
                           compile_s=round(state[f"{name}/{impl}"]["compile_s"], 2),
                           final_loss=round(float(state[f"{name}/{impl}"]["loss"]), 4)) for impl in impls}
            ratios[name][str(t)] = {impl: round(med[impl] / med[impls[0]], 4) for impl in impls[1:]}
        del state
    env = environment()
    out = {"benchmark": "train_step_attention_impls",
           "config": {"size": args.size, "batch": args.batch, "seq_lens": seq_lens, "reps": args.reps,
                      "warmup": args.warmup, "compute_dtype": args.dtype, "mechanisms": names, "impls": impls,
                      "d_model": family[names[0]].d_model, "n_layer": family[names[0]].n_layer,
                      "attention_block_size": family[names[0]].attention_block_size,
                      "devices": env.pop("device_count"), **env, "quick": args.quick},
           "baseline_impl": impls[0], "results": results, f"time_ratio_to_{impls[0]}": ratios}
    print(json.dumps(out, indent=1))
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="mini", help="configs family size (default mini)")
    ap.add_argument("--batch", type=int, default=None, help="sequences per step (default 8; 1 comparing impls)")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--reps", type=int, default=15, help="timed steps per mechanism")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per mechanism after compiling")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="compute dtype")
    ap.add_argument("--heads", default="config", choices=("config", "matched"),
                    help="config: the family's head counts; matched: re-chosen here to match MHA's attention params")
    ap.add_argument("--mechanisms", default=None, help="comma-separated subset (default: all; mha always runs)")
    ap.add_argument("--attention-impl", default=None,
                    help="ModelConfig.attention_impl (default the config's); several, comma-separated: compare them")
    ap.add_argument("--impl-seq-lens", default="1024,8192", help="lengths at which implementations are compared")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: tiny family, batch 2 x 32, 2 reps, unoptimised XLA, pseudo-random params "
                         "(not a measurement)")
    args = ap.parse_args(argv)
    impls = [v.strip() for v in (args.attention_impl or "").split(",") if v.strip()]
    if args.quick:
        args.size, args.batch, args.seq_len, args.reps, args.warmup = "tiny", 2, 32, 2, 1
        args.impl_seq_lens = "32,64"
    if len(impls) > 1:
        args.batch = args.batch or 1
        return compare_impls(args, impls)
    args.batch = args.batch or 8

    overrides = dict(compute_dtype=args.dtype, **({"attention_impl": impls[0]} if impls else {}))
    if args.heads == "matched":
        family = matched_family(args.size, **overrides)
    else:
        family = configs.family(args.size, **overrides)
    if args.mechanisms:
        keep = {m.strip() for m in args.mechanisms.split(",")} | {BASELINE}
        unknown = keep - set(family)
        if unknown:
            raise SystemExit(f"--mechanisms: unknown {sorted(unknown)}; expected some of {sorted(family)}")
        family = {k: v for k, v in family.items() if k in keep}
    for cfg in family.values():
        if args.seq_len > cfg.max_seq_len:
            raise SystemExit(f"--seq-len: expected <= max_seq_len={cfg.max_seq_len}, got {args.seq_len}")

    tokens = jax.random.randint(jax.random.key(1), (args.batch, args.seq_len + 1), 0, family[BASELINE].vocab_size,
                                dtype=jnp.int32)
    state, results = {}, {}
    for name, cfg in family.items():
        params = bench_params(cfg, "fast" if args.quick else "model")
        compiled, compile_s = compile_timed(make_step(cfg), params, tokens)
        for _ in range(args.warmup):
            params, loss = compiled(params, tokens)
        jax.block_until_ready(params)
        attn_p, model_p = param_counts(cfg)
        state[name] = dict(step=compiled, params=params)
        results[name] = dict(n_head=cfg.n_head, attention_params_per_layer=attn_p, model_params=model_p,
                             train_flops_per_token=float(accounting.flops_per_token(cfg, args.seq_len, training=True)),
                             compile_s=round(compile_s, 3))

    names = list(family)
    times = time_interleaved({name: stepper(state[name], tokens) for name in names}, args.reps)

    n_tok = args.batch * args.seq_len
    for name in names:
        wall, cpu = times[name]["wall"], times[name]["cpu"]
        med = statistics.median(wall)
        results[name].update(median_s=round(med, 9), min_s=round(min(wall), 9),
                             cpu_median_s=round(statistics.median(cpu), 9),
                             tokens_per_s=round(n_tok / med, 1), final_loss=round(float(state[name]["loss"]), 4))
    for name in names:
        r = results[name]
        r["attention_params_vs_mha"] = round(r["attention_params_per_layer"]
                                             / results[BASELINE]["attention_params_per_layer"], 4)
        # the ratio a purely FLOP-bound implementation would reach
        r["flops_ratio_to_mha"] = round(results[BASELINE]["train_flops_per_token"] / r["train_flops_per_token"], 4)
    base = results[BASELINE]["tokens_per_s"]
    ratios = {name: round(results[name]["tokens_per_s"] / base, 4) for name in names}
    # the same ratio from this process's CPU time: less sensitive to other load on a shared machine
    base_cpu = results[BASELINE]["cpu_median_s"]
    cpu_ratios = {name: round(base_cpu / results[name]["cpu_median_s"], 4) for name in names}
    for name in names:
        results[name]["ratio_to_mha"] = ratios[name]
        results[name]["ratio_to_mha_cpu_time"] = cpu_ratios[name]

    env = environment()
    out = {
        "benchmark": "train_step_forward_backward",
        "config": {
            "size": args.size, "heads": args.heads, "batch": args.batch, "seq_len": args.seq_len,
            "tokens_per_step": n_tok, "reps": args.reps, "warmup": args.warmup, "compute_dtype": args.dtype,
            "d_model": family[BASELINE].d_model, "n_layer": family[BASELINE].n_layer,
            "head_dim": family[BASELINE].head_dim, "vocab_size": family[BASELINE].vocab_size,
            "attention_impl": family[BASELINE].attention_impl,
            "devices": env.pop("device_count"), **env, "quick": args.quick,
        },
        "baseline": BASELINE,
        "results": results,
        "ratio_to_mha": ratios,
        "ratio_to_mha_cpu_time": cpu_ratios,
    }
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
