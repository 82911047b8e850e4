"""Shared helpers for the tests."""
import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import tpa_jax
from tpa_jax import ModelConfig

ROOT = Path(__file__).resolve().parents[1]  # the repository
FIXTURES_DIR = Path(__file__).resolve().parent / "fixtures"

BASE = ModelConfig(vocab_size=97, n_layer=2, d_model=48, n_head=6, head_dim=8, q_rank=3, k_rank=2, v_rank=2,
                   compute_dtype="float32", max_seq_len=64)

MLA_FIELDS = dict(attention="mla", n_head=4, q_lora_rank=20, kv_lora_rank=12, rope_head_dim=4, v_head_dim=6)

# every mechanism and every TPA variant, on tiny sizes
VARIANTS = {
    "tpa": {},
    "tpa_kvonly": dict(attention="tpa_kvonly"),
    "mha": dict(attention="mha"),
    "mqa": dict(attention="mqa"),
    "gqa": dict(attention="gqa", n_kv_head=3),
    "mla": MLA_FIELDS,
    "tpa_nonctx_a": dict(contextual_a=False),
    "tpa_nonctx_b": dict(contextual_b=False),
    "tpa_shared_b": dict(shared_kv_b=True),
    "tpa_shared_b_nonctx_b": dict(shared_kv_b=True, contextual_b=False),
    "tpa_order3": dict(tpa_order=3, tpa_c_dim=2),
    "tpa_sigmoid": dict(head_factor_activation="sigmoid"),
    "tpa_softmax": dict(head_factor_activation="softmax"),
    "tpa_outnorm": dict(attn_out_norm=True),
    "tpa_r1": dict(q_rank=1, k_rank=1, v_rank=1),
    "tpa_kvonly_outnorm_weighted": dict(attention="tpa_kvonly", attn_out_norm=True, norm_weight=True),
}


def cfg_of(name, **extra):
    return dataclasses.replace(BASE, **{**VARIANTS[name], **extra})


def paper_tables() -> dict:
    """The paper's Tables 9 and 10 and App. H.1 settings (the one copy, typed in from the paper)."""
    with open(FIXTURES_DIR / "paper_tables.json") as f:
        return json.load(f)


def init_params(cfg, seed=0, randomize=True):
    """(model, unboxed params) from the model's entry point; zero-initialised output projections
    get random values so tests can see them."""
    model = tpa_jax.model.model_of(cfg)
    params = tpa_jax.init_params(cfg, jax.random.key(seed))
    if randomize:
        leaves, tree = jax.tree_util.tree_flatten(params)
        keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
        leaves = [l if np.any(np.asarray(l)) else 0.3 * jax.random.normal(k, l.shape, l.dtype)
                  for l, k in zip(leaves, keys)]
        params = jax.tree_util.tree_unflatten(tree, leaves)
    return model, params


def tokens(cfg, batch=2, seq=12, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, cfg.vocab_size, (batch, seq)), jnp.int32)


def forward(model):
    """jit-compiled logits function of ``model``'s config (eager Flax apply is slow)."""
    return jax.jit(tpa_jax.logits_fn(model.cfg))


def largest_intermediate(fn, *args, floating_only: bool = False):
    """Element count of the largest value any equation of ``fn``'s jaxpr produces (sub-jaxprs too;
    with ``floating_only``, of the floating-point values only)."""
    best = 0

    def walk(jaxpr):
        nonlocal best
        for eqn in jaxpr.eqns:
            for v in eqn.outvars:
                if hasattr(v.aval, "shape") and not (floating_only and not jnp.issubdtype(v.aval.dtype, jnp.floating)):
                    best = max(best, int(np.prod(v.aval.shape)))
            for p in eqn.params.values():
                for sub in (p if isinstance(p, (tuple, list)) else (p,)):
                    if hasattr(sub, "jaxpr"):
                        walk(sub.jaxpr if hasattr(sub.jaxpr, "eqns") else sub.jaxpr.jaxpr)
                    elif hasattr(sub, "eqns"):
                        walk(sub)

    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return best


def find_pallas_call(jaxpr):
    """The pallas_call equation of a jaxpr, searched through nested jaxprs."""
    stack = [jaxpr]
    while stack:
        for eqn in stack.pop().eqns:
            if eqn.primitive.name == "pallas_call":
                return eqn
            for p in eqn.params.values():
                for sub in p if isinstance(p, (tuple, list)) else (p,):
                    inner = getattr(sub, "jaxpr", sub)
                    if hasattr(inner, "eqns"):
                        stack.append(inner)
    raise AssertionError("no pallas_call in the jaxpr")
