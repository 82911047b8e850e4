"""Throughput of the real training step (AdamW, sharded state, donated buffers) of every mechanism.

    python bench/train.py                        # CPU: mini family, batch 8 x 256, float32, 6 reps
    python bench/train.py --size small           # the paper's small size (the default on an accelerator:
                                                 #   batch 16 x 1024, bfloat16, 20 reps)
    python bench/train.py --quick                # smoke run (seconds)
    python bench/train.py --mechanisms t6 --remat dots
    python bench/train.py --size tiny --attention-impl xla,blocked --batch 1 --seq-len 8192   # impls compared

Unlike ``bench/forward.py`` (a bare forward + backward + SGD step), this times exactly what
``tpa_jax.train.loop.train`` runs per step: ``make_train_step`` with ``make_optimizer``'s AdamW
(clipping, masked weight decay, schedule), the {"step", "params", "opt_state"} state sharded on the
mesh from ``parallel.mesh_from_config`` (params initialised sharded by ``parallel.shard_params``),
the batch sharded by ``parallel.batch_sharding``, and ``jax.jit`` with in/out shardings and the
state donated.  Batches are random tokens (one fixed batch per run, already on device), so no data
pipeline (and no grain) is involved; on that fixed batch the loss falls, which checks the updates.

All mechanisms come from ``tpa_jax.configs.family(size)`` (same d_model, layers, head_dim and
vocabulary; head counts matched on attention parameters, Table 10).  The mechanisms are
initialised and compiled concurrently (``--jobs`` threads; XLA compiles outside the GIL), then,
after ``--warmup`` untimed steps each, timed steps are interleaved round robin with a rotating order, so
machine-load drift hits every mechanism alike.  Prints one JSON object: configuration (backend,
device kind, jax version, mesh), per-mechanism parameters, training FLOPs per token, median step
time, tokens/s, MFU (null where the peak FLOP/s is unknown, e.g. CPU), final loss, and
``ratio_to_mha`` (tokens/s over MHA's in the same run).  ``ratio_to_mha_cpu_time`` is the same
ratio from this process's CPU time per step (less disturbed by other load on a shared CPU machine;
not meaningful on an accelerator).

With several comma-separated ``--attention-impl`` values every mechanism runs under each (results
keyed ``mechanism@impl``, timed interleaved in the same run) and ``time_ratio_to_<first impl>``
gives each one's median step time over the same mechanism's under the first implementation.  A
``--seq-len`` beyond the family's ``max_seq_len`` raises ``max_seq_len`` to it.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tpa_jax.eval.bench_timing import environment, time_interleaved, use_smoke_xla_flags  # noqa: E402

if "--quick" in sys.argv[1:]:
    use_smoke_xla_flags()  # before the first array creates the backend

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402

from tpa_jax import accounting, configs, parallel  # noqa: E402
from tpa_jax.config import ATTENTION_IMPLS, REMAT_POLICIES, DataConfig, MeshConfig, OptimConfig, TrainConfig  # noqa: E402
from tpa_jax.train import metrics as metrics_mod  # noqa: E402
from tpa_jax.train import optimizer as optimizer_mod  # noqa: E402
from tpa_jax.train import step as train_step_mod  # noqa: E402

BASELINE = "mha"
# defaults per backend (CPU: sized for a few minutes on 2 cores, compiles included)
CPU_DEFAULTS = dict(size="mini", batch=8, seq_len=256, reps=6, warmup=1, dtype="float32")
ACCEL_DEFAULTS = dict(size="small", batch=16, seq_len=1024, reps=20, warmup=3, dtype="bfloat16")


def build(tcfg: TrainConfig, mesh, tokens):
    """Sharded state, sharded batch and the compiled, state-donating train step, as loop.train builds
    them; also (init + lowering seconds, compile seconds)."""
    t0 = time.perf_counter()
    schedule = optimizer_mod.lr_schedule(tcfg.optim, tcfg.steps)
    tx = optimizer_mod.make_optimizer(tcfg.optim, tcfg.steps)
    replicated = NamedSharding(mesh, PartitionSpec())
    state, state_sh = train_step_mod.init_state(tcfg, mesh, tx)
    batch_sh = parallel.batch_sharding(mesh, tcfg.batch_size, seq_len=tcfg.data.seq_len)
    batch = jax.device_put({"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}, batch_sh)
    step_fn = jax.jit(train_step_mod.make_train_step(tcfg, tx, schedule), in_shardings=(state_sh, batch_sh),
                      out_shardings=(state_sh, replicated), donate_argnums=0)
    lowered = step_fn.lower(state, batch)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    return state, batch, compiled, (t1 - t0, time.perf_counter() - t1)


def build_all(tcfgs: dict, mesh, tokens, workers: int) -> dict:
    """build() for every mechanism, ``workers`` at a time in threads (XLA compiles outside the GIL,
    so set-up of a family takes about 1/workers as long; nothing is timed while this runs)."""
    def one(tcfg):
        with parallel.mesh_context(mesh):  # jax's mesh context is per thread
            return build(tcfg, mesh, tokens)

    if workers <= 1:
        return {name: one(tcfg) for name, tcfg in tcfgs.items()}
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        futures = {name: pool.submit(one, tcfg) for name, tcfg in tcfgs.items()}
        return {name: f.result() for name, f in futures.items()}


def _stepper(s: dict):
    """One timed train step of a mechanism's state ``s`` (keeps the first step's metrics)."""
    def call():
        s["state"], s["metrics"] = s["step"](s["state"], s["batch"])
        if s["first_metrics"] is None:
            s["first_metrics"] = s["metrics"]
        return s["state"], s["metrics"]
    return call


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default=None,
                    help=f"configs family size (default {CPU_DEFAULTS['size']} on CPU, {ACCEL_DEFAULTS['size']} "
                         "on an accelerator)")
    ap.add_argument("--batch", type=int, default=None, help="global batch (sequences per step)")
    ap.add_argument("--seq-len", type=int, default=None)
    ap.add_argument("--reps", type=int, default=None, help="timed steps per mechanism")
    ap.add_argument("--warmup", type=int, default=None,
                    help="untimed steps per mechanism after compiling (default 1 on CPU, 3 elsewhere)")
    ap.add_argument("--dtype", default=None, choices=("float32", "bfloat16"),
                    help="compute dtype (default float32 on CPU, bfloat16 elsewhere); params stay float32")
    ap.add_argument("--remat", default="none", choices=REMAT_POLICIES, help="ModelConfig.remat_policy")
    ap.add_argument("--accum", type=int, default=1, help="gradient-accumulation micro-steps (OptimConfig)")
    ap.add_argument("--mesh", default="1,-1,1", help="data,fsdp,tensor mesh sizes (-1: the remaining devices)")
    ap.add_argument("--jobs", type=int, default=0,
                    help="mechanisms initialised and compiled concurrently before timing (default: min(#, cpus))")
    ap.add_argument("--attention-impl", default=None,
                    help=f"ModelConfig.attention_impl of every mechanism (default: the configs', auto); several, "
                         f"comma-separated, are compared; from {ATTENTION_IMPLS}")
    ap.add_argument("--mechanisms", default=None, help="comma-separated subset (default: all; mha always runs)")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: tiny family, batch 2 x 32, 2 reps, unoptimised XLA (not a measurement)")
    args = ap.parse_args(argv)
    cpu = jax.default_backend() == "cpu"
    defaults = CPU_DEFAULTS if cpu else ACCEL_DEFAULTS
    if args.quick:
        defaults = dict(defaults, size="tiny", batch=2, seq_len=32, reps=2, warmup=1)
    for k in ("size", "batch", "seq_len", "reps", "warmup", "dtype"):
        if getattr(args, k) is None:
            setattr(args, k, defaults[k])
    for k in ("batch", "seq_len", "reps", "accum"):
        if getattr(args, k) < 1:
            ap.error(f"--{k.replace('_', '-')}: expected an integer >= 1, got {getattr(args, k)}")
    if args.warmup < 0:
        ap.error(f"--warmup: expected an integer >= 0, got {args.warmup}")
    args.impls = [i.strip() for i in (args.attention_impl or "").split(",") if i.strip()]
    bad = [i for i in args.impls if i not in ATTENTION_IMPLS]
    if bad:
        ap.error(f"--attention-impl: unknown {bad}; expected some of {ATTENTION_IMPLS}")
    try:
        args.mesh = MeshConfig(*(int(v) for v in args.mesh.split(",")))
    except (TypeError, ValueError) as e:
        ap.error(f"--mesh: expected data,fsdp,tensor integers: {e}")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    impl = {"attention_impl": args.impls[0]} if len(args.impls) == 1 else {}
    family = configs.family(args.size, compute_dtype=args.dtype, remat_policy=args.remat, **impl)
    if args.mechanisms:
        keep = {m.strip() for m in args.mechanisms.split(",") if m.strip()} | {BASELINE}
        unknown = keep - set(family)
        if unknown:
            raise SystemExit(f"--mechanisms: unknown {sorted(unknown)}; expected some of {sorted(family)}")
        family = {k: v for k, v in family.items() if k in keep}
    family = {k: configs.replace(v, max_seq_len=max(v.max_seq_len, args.seq_len)) for k, v in family.items()}
    baseline = BASELINE
    if len(args.impls) > 1:  # every mechanism under every implementation, keyed mechanism@impl
        family = {f"{k}@{i}": configs.replace(v, attention_impl=i) for i in args.impls for k, v in family.items()}
        baseline = f"{BASELINE}@{args.impls[0]}"

    mesh = parallel.mesh_from_config(args.mesh)
    n_chips = mesh.devices.size
    peak = metrics_mod.peak_flops()
    total_steps = args.warmup + args.reps
    optim = OptimConfig(warmup_steps=0, accum_steps=args.accum)  # paper AdamW; no warmup so every step updates
    tokens = jax.random.randint(jax.random.key(1), (args.batch, args.seq_len + 1), 0, family[baseline].vocab_size,
                                dtype=jnp.int32)
    state, results = {}, {}
    phase = {"start": time.perf_counter()}
    tcfgs = {name: TrainConfig(model=cfg, data=DataConfig(seq_len=args.seq_len), optim=optim, mesh=args.mesh,
                               steps=total_steps, batch_size=args.batch, run_dir="runs/bench-train")
             for name, cfg in family.items()}
    built = build_all(tcfgs, mesh, tokens, args.jobs or min(len(tcfgs), os.cpu_count() or 1))
    phase["built"] = time.perf_counter()
    with parallel.mesh_context(mesh):
        for name, cfg in family.items():
            st, batch, compiled, (init_s, compile_s) = built.pop(name)
            first_loss = None
            for _ in range(args.warmup):
                st, m = compiled(st, batch)
                first_loss = first_loss if first_loss is not None else m["loss"]
            jax.block_until_ready(st)
            state[name] = dict(step=compiled, state=st, batch=batch, first_metrics=None)
            results[name] = dict(
                attention=cfg.attention, n_head=cfg.n_head, model_params=int(accounting.model_params(cfg)),
                attention_params_per_layer=int(accounting.attention_params(cfg)),
                train_flops_per_token=float(accounting.flops_per_token(cfg, args.seq_len, training=True)),
                init_and_lower_s=round(init_s, 3), compile_s=round(compile_s, 3),
                first_loss=None if first_loss is None else round(float(first_loss), 4))

        phase["warm"] = time.perf_counter()
        names = list(family)
        times = time_interleaved({name: _stepper(state[name]) for name in names}, args.reps)
        for name in names:
            if results[name]["first_loss"] is None:  # no warmup: the first timed step's loss
                results[name]["first_loss"] = round(float(state[name]["first_metrics"]["loss"]), 4)

    phase["timed"] = time.perf_counter()
    n_tok = args.batch * args.seq_len
    for name in names:
        s, r, wall = state[name], results[name], times[name]["wall"]
        med = statistics.median(wall)
        tps = n_tok / med
        m = jax.device_get(s["metrics"])
        r.update(median_s=round(med, 9), min_s=round(min(wall), 9),
                 cpu_median_s=round(statistics.median(times[name]["cpu"]), 9), tokens_per_s=round(tps, 1),
                 mfu=round(tps * r["train_flops_per_token"] / (peak * n_chips), 5) if peak else None,
                 final_loss=round(float(m["loss"]), 4), final_grad_norm=round(float(m["grad_norm"]), 4),
                 finite=bool(m["finite"]))
        r["flops_ratio_to_mha"] = round(results[baseline]["train_flops_per_token"] / r["train_flops_per_token"], 4)
    base, base_cpu = results[baseline]["tokens_per_s"], results[baseline]["cpu_median_s"]
    ratios = {name: round(results[name]["tokens_per_s"] / base, 4) for name in names}
    cpu_ratios = {name: round(base_cpu / results[name]["cpu_median_s"], 4) for name in names}
    for name in names:
        results[name]["ratio_to_mha"] = ratios[name]
        results[name]["ratio_to_mha_cpu_time"] = cpu_ratios[name]

    env = environment()
    b = family[baseline]
    out = {
        "benchmark": "train_step_adamw_sharded",
        "config": {
            "size": args.size, "batch": args.batch, "seq_len": args.seq_len, "tokens_per_step": n_tok,
            "reps": args.reps, "warmup": args.warmup, "compute_dtype": args.dtype, "param_dtype": b.param_dtype,
            "remat_policy": args.remat, "accum_steps": args.accum, "attention_impl": args.attention_impl,
            "build_jobs": args.jobs or min(len(names), os.cpu_count() or 1),
            "phase_s": {"build": round(phase["built"] - phase["start"], 3),
                        "warmup": round(phase["warm"] - phase["built"], 3),
                        "timed": round(phase["timed"] - phase["warm"], 3)},
            "d_model": b.d_model, "n_layer": b.n_layer, "head_dim": b.head_dim, "vocab_size": b.vocab_size,
            "mesh": dict(mesh.shape), "devices": env.pop("device_count"), **env, "mesh_devices": n_chips,
            "peak_flops_per_device": peak, "quick": args.quick,
        },
        "baseline": baseline,
        "results": results,
        "ratio_to_mha": ratios,
        "ratio_to_mha_cpu_time": cpu_ratios,
    }
    if len(args.impls) > 1:
        first = args.impls[0]
        out[f"time_ratio_to_{first}"] = {
            name: round(results[name]["median_s"] / results[f"{name.split('@')[0]}@{first}"]["median_s"], 4)
            for name in names if not name.endswith(f"@{first}")}
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
