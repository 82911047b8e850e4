"""Context parallelism: bytes each device moves per token per layer, read from the compiled HLO, and
per-device compiled memory against the context size.

    python bench/context_parallel.py                 # small shapes, 2 layers, T = 8k, context 8
    python bench/context_parallel.py --smoke         # d_model 128, T = 64, context 2 (for the test)
    python bench/context_parallel.py --impl allgather --layout contiguous

On CPU it runs on 8 fake devices (``--xla_force_host_platform_device_count=8``).  Nothing is run:
the programs are lowered and compiled on abstract arguments.

**Bytes moved.**  For each mechanism (t6-small, mha-small, gqa-small, mla-small shapes; their
head counts, head dims, ranks and latents, at ``--n-layer`` layers) it compiles, on a mesh whose
``context`` axis holds ``--context`` devices, one training step (loss and gradients: the items
travel forward, their cotangents travel back) and one prefill (the full forward of a ``--seq-len``
prompt).  It sums, over the compiled (SPMD-partitioned, per-device) HLO, the bytes each device
receives: a ``collective-permute``'s operand, ``(C-1)/C`` of an ``all-gather``'s result and of an
``all-to-all``'s operand (XLA's CPU backend moves bfloat16 collectives as float32, so on CPU a
bfloat16 model shows four bytes per number).  The model is compiled with its layers unrolled at L and at L + 1 layers;
the difference is one layer's traffic (the input's and output's re-layout, and the gradient
all-reduce, which is not counted anyway, drop out).  ``bytes_per_token_per_layer`` is that
difference over the T / C tokens a device holds; ``ratio_to_mha`` divides by MHA's, same run.
Table 1's cache ratio (what the ring passes on per token, TPA against MHA) is printed beside it.

**Memory.**  The per-device ``temp_size_in_bytes`` of the t6 training step and prefill at batch 1,
T = ``--memory-seq-len`` (default ``--seq-len``), on meshes of context 1, 2, 4 and 8 devices
(``--memory-contexts``).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
import time
from typing import Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from tpa_jax import accounting, configs, parallel  # noqa: E402
from tpa_jax.eval.bench_timing import environment  # noqa: E402
from tpa_jax.model import init_params, logits_fn, loss_fn  # noqa: E402

MECHANISMS = ("t6", "mha", "gqa", "mla")
BASELINE = "mha"
_DTYPE_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "s8": 1, "u8": 1, "pred": 1, "f64": 8, "s64": 8}
_COLLECTIVE = re.compile(r"=\s*(\(?[^=]*?\)?)\s+(collective-permute|all-gather|all-to-all)(?:-start)?\((.*?)\)")
_COMPUTATION = re.compile(r"^(ENTRY )?%?([\w.\-]+) \(.*\{\s*$")
_BODY = re.compile(r"body=%?([\w.\-]+)")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
_CALLS = re.compile(r"(?:to_apply|calls)=%?([\w.\-]+)")
_SHAPE = re.compile(r"\b(f32|bf16|f16|s32|u32|s8|u8|pred|f64|s64)\[([0-9,]*)\]")


def _bytes(shapes: str) -> int:
    """Total bytes of the array shapes written in an HLO fragment (``bf16[2,64,8]{...}``, tuples)."""
    total = 0
    for dtype, dims in _SHAPE.findall(shapes):
        n = 1
        for d in filter(None, dims.split(",")):
            n *= int(d)
        total += n * _DTYPE_BYTES[dtype]
    return total


def _line_bytes(line: str, c: int) -> Optional[tuple[str, int]]:
    """(kind, bytes one device receives) of one HLO instruction, or None if it is no exchange."""
    m = _COLLECTIVE.search(line)
    if not m or "-done" in line:
        return None
    result, kind, operands = m.groups()
    sent = _bytes(operands) if _SHAPE.search(operands) else _bytes(result)
    if kind == "collective-permute":
        return kind, sent
    if kind == "all-gather":
        return kind, _bytes(result) * (c - 1) // c
    return kind, sent * (c - 1) // c


def received_bytes(hlo: str, c: int) -> dict[str, int]:
    """Bytes one device receives per collective kind in a compiled (per-device) HLO module: each
    computation's own exchanges plus those of the loops it runs, times their known trip counts (the
    ring's scan), and of the computations it calls."""
    comps, name, entry = {}, None, None
    for line in hlo.splitlines():
        head = _COMPUTATION.match(line)
        if head:
            name = head.group(2)
            comps[name] = []
            entry = name if head.group(1) else entry
        elif name is not None:
            comps[name].append(line)

    def total(comp: str, seen: frozenset) -> dict[str, int]:
        out = {"collective-permute": 0, "all-gather": 0, "all-to-all": 0}
        for line in comps.get(comp, ()):
            got = _line_bytes(line, c)
            if got:
                out[got[0]] += got[1]
            calls = [(m.group(1), 1) for m in _CALLS.finditer(line)]
            if " while(" in line:
                trip = _TRIP.search(line)
                calls = [(m.group(1), int(trip.group(1)) if trip else 1) for m in _BODY.finditer(line)]
            for callee, n in calls:
                if callee in comps and callee not in seen:
                    for k, v in total(callee, seen | {callee}).items():
                        out[k] += n * v
        return out

    if entry is None:  # a fragment: its lines as they are
        comps, entry = {"": hlo.splitlines()}, ""
    return total(entry, frozenset({entry}))


def _compiled_text(cfg, mesh, batch: int, seq_len: int, training: bool) -> str:
    params = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    tokens = jax.ShapeDtypeStruct((batch, seq_len), jnp.int32)
    with parallel.mesh_context(mesh):
        params = jax.tree.map(lambda p, s: jax.ShapeDtypeStruct(p.shape, p.dtype, sharding=s), params,
                              parallel.param_shardings({"params": params}, mesh)["params"])
        tokens = jax.ShapeDtypeStruct(tokens.shape, tokens.dtype,
                                      sharding=parallel.batch_sharding(mesh, batch, seq_len=seq_len))
        fn = jax.grad(loss_fn(cfg)) if training else logits_fn(cfg)
        args = (params, tokens, tokens) if training else (params, tokens)
        return jax.jit(fn).lower(*args).compile().as_text()


def layer_traffic(cfg, c: int, batch: int, seq_len: int, training: bool) -> dict:
    """Bytes one device receives for one layer (the L + 1 minus L layer programs), per kind."""
    mesh = parallel.make_mesh(1, 1, 1, c, devices=jax.devices()[:c])
    t0 = time.perf_counter()
    per = [received_bytes(_compiled_text(dataclasses.replace(cfg, n_layer=n), mesh, batch, seq_len, training), c)
           for n in (cfg.n_layer, cfg.n_layer + 1)]
    kinds = {k: per[1][k] - per[0][k] for k in per[0]}
    tokens = batch * seq_len // c
    total = sum(kinds.values())
    return {"bytes_per_layer": total, "bytes_per_token_per_layer": round(total / tokens, 2), "by_kind": kinds,
            "compile_s": round(time.perf_counter() - t0, 1)}


def temp_memory(cfg, c: int, seq_len: int) -> dict[str, int]:
    """Per-device temp bytes of the training step (loss and gradients) and of the prefill (the full
    forward) at batch 1 on ``c`` devices."""
    mesh = parallel.make_mesh(1, 1, 1, c, devices=jax.devices()[:c])
    params = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    with parallel.mesh_context(mesh):
        tokens = jax.ShapeDtypeStruct((1, seq_len), jnp.int32, sharding=parallel.batch_sharding(mesh, 1, seq_len=seq_len))
        train = jax.jit(jax.grad(loss_fn(cfg))).lower(params, tokens, tokens).compile()
        prefill = jax.jit(logits_fn(cfg)).lower(params, tokens).compile()
    return {"train_step": int(train.memory_analysis().temp_size_in_bytes),
            "prefill": int(prefill.memory_analysis().temp_size_in_bytes)}


def model_config(name: str, size: str, args) -> "configs.ModelConfig":
    fields = dict(compute_dtype=args.dtype, max_seq_len=args.seq_len, n_layer=args.n_layer, scan_layers=False,
                  context_impl=args.impl, context_layout=args.layout)
    if args.block_size:
        fields["attention_block_size"] = args.block_size
    for k in ("d_model", "vocab_size"):
        if getattr(args, k):
            fields[k] = getattr(args, k)
    return configs.get(f"{name}-{size}", **fields)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="small", help="shape family of the four models (default small)")
    ap.add_argument("--seq-len", type=int, default=8192)
    ap.add_argument("--context", type=int, default=8, help="devices on the context axis for the bytes")
    ap.add_argument("--n-layer", type=int, default=1, help="L: layers compiled (L and L + 1 are compared)")
    ap.add_argument("--d-model", type=int, default=None, help="override d_model (heads and ranks kept)")
    ap.add_argument("--vocab-size", type=int, default=None, help="override the vocabulary")
    ap.add_argument("--mechanisms", default=",".join(MECHANISMS), help=f"comma-separated, {BASELINE} included")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--impl", default="ring", choices=("ring", "allgather"))
    ap.add_argument("--layout", default="striped", choices=("striped", "contiguous"))
    ap.add_argument("--block-size", type=int, default=512)
    ap.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
    ap.add_argument("--memory-contexts", default="1,2,4,8", help="context sizes for the memory table ('' skips)")
    ap.add_argument("--memory-seq-len", type=int, default=None, help="T of the memory table (default --seq-len)")
    ap.add_argument("--smoke", action="store_true",
                    help="t6 and mha: the small family's heads and ranks at d_model 128, vocabulary 512, float32, "
                         "T = 64, context 2, block 16; memory at T = 1024 for context 1 and 2 (about a minute)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.d_model, args.vocab_size, args.dtype, args.seq_len, args.context = 128, 512, "float32", 64, 2
        args.block_size, args.mechanisms, args.memory_contexts, args.memory_seq_len = 16, "t6,mha", "1,2", 1024
    mechanisms = [m for m in args.mechanisms.split(",") if m]
    if BASELINE not in mechanisms or set(mechanisms) - set(MECHANISMS):
        raise SystemExit(f"--mechanisms: a subset of {','.join(MECHANISMS)} that includes {BASELINE}, got {mechanisms}")
    if len(jax.devices()) < args.context:
        raise SystemExit(f"--context {args.context}: only {len(jax.devices())} devices")

    bytes_table, items = {}, {}
    for name in mechanisms:
        cfg = model_config(name, args.size, args)
        items[name] = accounting.kv_cache_per_token(cfg)
        bytes_table[name] = {kind: layer_traffic(cfg, args.context, args.batch, args.seq_len, kind == "train_step")
                             for kind in ("train_step", "prefill")}
    ratio = {name: {kind: round(r["bytes_per_token_per_layer"] / bytes_table[BASELINE][kind]["bytes_per_token_per_layer"],
                                4) for kind, r in rs.items()} for name, rs in bytes_table.items()}
    memory = {}
    contexts = [int(v) for v in args.memory_contexts.split(",") if v]
    if contexts:
        mem_t = args.memory_seq_len or args.seq_len
        cfg = dataclasses.replace(model_config("t6", args.size, args), max_seq_len=mem_t)
        per_c = {str(c): temp_memory(cfg, c, mem_t) for c in contexts if c <= len(jax.devices())}
        memory = {kind: {c: m[kind] for c, m in per_c.items()} for kind in ("train_step", "prefill")}
    out = {
        "benchmark": "context_parallel",
        "config": {"size": args.size, "seq_len": args.seq_len, "context": args.context, "n_layer": args.n_layer,
                   "memory_seq_len": args.memory_seq_len or args.seq_len, "vocab_size": args.vocab_size,
                   "batch": args.batch, "impl": args.impl, "layout": args.layout, "dtype": args.dtype,
                   "block_size": args.block_size, "smoke": args.smoke, **environment()},
        "baseline": BASELINE,
        "bytes": bytes_table,
        f"ratio_to_{BASELINE}": ratio,
        "cache_elems_per_token_per_layer": items,
        "cache_ratio_to_mha": {n: round(v / items[BASELINE], 4) for n, v in items.items()},
        "temp_bytes_per_device": memory,
        "memory_ratio_to_context_1": {kind: {c: round(v / m[min(m, key=int)], 4) for c, v in m.items()}
                                      for kind, m in memory.items()},
    }
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
