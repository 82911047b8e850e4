"""Decode caches, one pytree per mechanism, pre-allocated to ``max_len`` with a length per sequence.

    cache = init_cache(cfg, batch_size, max_len)
    logits, cache = model.apply({"params": params}, prompt, cache=cache)      # prefill
    logits, cache = model.apply({"params": params}, next_token, cache=cache)  # decode, one token

``cache = {"lengths": int32 [B], "layers": {name: [L, B, S, ...]}}`` with, per layer and token:

* TPA / TPA-KVonly: A_K [R_K, h], B~_K [R_K, d_h] (after RoPE, eq. 3.5), A_V [R_V, h], B_V [R_V, d_h]
  -- never K or V.  Variants store only their contextual factors (non-contextual A: B's only;
  non-contextual B: A's only; shared B: one unrotated B; third order: b [d_b] and c [d_c]).
* MHA / MQA / GQA: K (after RoPE) and V with n_kv_head heads.
* MLA: the compressed latent c_KV [d_c] and the shared RoPE key k_R [d^R_h].
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from .. import parallel
from ..config import ModelConfig


def cache_layout(cfg: ModelConfig) -> dict:
    """{leaf name: (per-token shape, logical axes of that shape)} for one layer."""
    h, db, rk, rv = cfg.n_head, cfg.b_dim, cfg.k_rank, cfg.v_rank
    if cfg.attention == "mla":
        return {"c_kv": ((cfg.kv_lora_rank,), ("latent",)), "k_r": ((cfg.rope_head_dim,), ("head_dim",))}
    if not cfg.is_tpa:
        shape = (cfg.kv_heads, cfg.head_dim)
        return {"k": (shape, ("kv_heads", "head_dim")), "v": (shape, ("kv_heads", "head_dim"))}
    out = {}
    if cfg.contextual_a:
        out["a_k"] = ((rk, h), ("rank", "heads"))
        out["a_v"] = ((rv, h), ("rank", "heads"))
    if cfg.contextual_b:
        if cfg.shared_kv_b:
            out["b_kv"] = ((rk, db), ("rank", "head_dim"))
        else:
            out["b_k"] = ((rk, db), ("rank", "head_dim"))
            out["b_v"] = ((rv, db), ("rank", "head_dim"))
    if cfg.tpa_order == 3:
        out["c_k"] = ((rk, cfg.tpa_c_dim), ("rank", "head_dim"))
        out["c_v"] = ((rv, cfg.tpa_c_dim), ("rank", "head_dim"))
    return out


def cache_logical_axes(cfg: ModelConfig) -> dict:
    return {"lengths": ("batch",),
            "layers": {k: ("layers", "batch", "cache_seq") + axes for k, (_, axes) in cache_layout(cfg).items()}}


def init_cache(cfg: ModelConfig, batch_size: int, max_len: int, dtype=None) -> dict:
    """An empty cache (all lengths 0) in ``dtype`` (default: the compute dtype)."""
    if batch_size < 1 or max_len < 1:
        raise ValueError(f"init_cache: batch_size and max_len must be >= 1, got {batch_size}, {max_len}")
    if max_len > cfg.max_seq_len:
        raise ValueError(f"init_cache: max_len={max_len} exceeds the model's max_seq_len={cfg.max_seq_len}")
    dtype = jnp.dtype(dtype or cfg.compute_dtype)
    layers = {k: jnp.zeros((cfg.n_layer, batch_size, max_len) + shape, dtype)
              for k, (shape, _) in cache_layout(cfg).items()}
    return {"lengths": jnp.zeros((batch_size,), jnp.int32), "layers": layers}


def cache_bytes_per_token(cache: dict) -> int:
    """Measured bytes per token (all layers) of a cache pytree."""
    total = 0
    for leaf in jax.tree_util.tree_leaves(cache["layers"]):
        total += math.prod(leaf.shape[3:]) * leaf.shape[0] * leaf.dtype.itemsize
    return total


def cache_shardings(cfg: ModelConfig, cache: dict, mesh) -> dict:
    """NamedShardings of a decode cache from its logical axes: batch over (data, fsdp), heads over
    tensor (TPA's head-shared B factors and MLA's latent are replicated over tensor), with the
    same divisibility fallback as the parameters."""
    return parallel.tree_shardings(cache_logical_axes(cfg), cache, mesh)
