"""Decode caches: one pytree per model, pre-allocated to ``max_len`` with a length per sequence,
laid out by the attention family's ``cache_spec`` (the one description of what is cached), with
its logical axes, measured size and shardings.

    cache = init_cache(cfg, batch_size, max_len)
    logits, cache = model.apply({"params": params}, prompt, cache=cache)      # prefill
    logits, cache = model.apply({"params": params}, next_token, cache=cache)  # decode, one token

``cache = {"lengths": int32 [B], "layers": {name: [L, B, S, *per-token shape]}}`` with, per layer
and token (``tpa_jax.model.attention.cache_spec``):

* TPA / TPA-KVonly: A_K [R_K, h], B~_K [R_K, d_h] (after RoPE, eq. 3.5), A_V [R_V, h], B_V [R_V, d_h]
  -- never K or V.  Variants store only their contextual factors (non-contextual A: B's only;
  non-contextual B: A's only; shared B: one unrotated B; third order: b [d_b] and c [d_c]).
* MHA / MQA / GQA: K (after RoPE) and V with n_kv_head heads.
* MLA: the compressed latent c_KV [d_c] and the shared RoPE key k_R [d^R_h].

An int8 cache (``dtype="int8"``) holds every leaf as int8 beside a float32 leaf ``<name>_scale``
of its per-token shape without the last axis (``tpa_jax.model.attention.quant``): one scale per
token and factor row for TPA's A and B, per token and head for K and V, per token for MLA.
"""
from __future__ import annotations

import math
from typing import Any, Optional

import jax
import jax.numpy as jnp

from .. import parallel
from ..config import ModelConfig
from ..model.attention import CacheLeaf, cache_spec
from ..model.attention.quant import cache_dtype, is_quantized, leaf_dtype, with_scales

Cache = dict[str, Any]  # {"lengths": [B], "layers": {name: [L, B, S, ...]}}


def cache_layout(cfg: ModelConfig, dtype: Optional[str | jnp.dtype] = None) -> dict[str, CacheLeaf]:
    """{leaf name: (per-token shape, logical axes of that shape)} for one layer (an int8 ``dtype``
    adds the scale leaves)."""
    return with_scales(cache_spec(cfg), cache_dtype(dtype or cfg.compute_dtype))


def cache_logical_axes(cfg: ModelConfig, dtype: Optional[str | jnp.dtype] = None) -> dict[str, Any]:
    """The logical axes of every leaf of ``init_cache(cfg, ..., dtype)``, as a matching pytree of
    tuples (a scale leaf has its leaf's leading axes)."""
    return {"lengths": ("batch",),
            "layers": {name: ("layers", "batch", "cache_length") + leaf.axes
                       for name, leaf in cache_layout(cfg, dtype).items()}}


def init_cache(cfg: ModelConfig, batch_size: int, max_len: int, dtype: Optional[str | jnp.dtype] = None,
               mesh: Optional[jax.sharding.Mesh] = None) -> Cache:
    """An empty cache (all lengths 0) in ``dtype`` (default: the compute dtype; float32, bfloat16,
    float16 or int8 with float32 scales, others a one-line error).  With ``mesh`` it is
    placed by :func:`cache_shardings`: on a mesh with a ``context`` axis the length axis is split over
    it (each device holds max_len / context rows; decoding merges the devices' partial softmaxes),
    which must then divide ``max_len``."""
    if batch_size < 1 or max_len < 1:
        raise ValueError(f"init_cache: batch_size and max_len must be >= 1, got {batch_size}, {max_len}")
    if max_len > cfg.max_seq_len:
        raise ValueError(f"init_cache: max_len={max_len} exceeds the model's max_seq_len={cfg.max_seq_len}")
    check_context_divides(max_len, mesh, "init_cache: max_len")
    dtype = cache_dtype(dtype or cfg.compute_dtype)
    layers = {name: jnp.zeros((cfg.n_layer, batch_size, max_len) + leaf.shape, leaf_dtype(name, dtype))
              for name, leaf in cache_layout(cfg, dtype).items()}
    cache = {"lengths": jnp.zeros((batch_size,), jnp.int32), "layers": layers}
    return cache if mesh is None else jax.device_put(cache, cache_shardings(cfg, cache, mesh))


def check_context_divides(max_len: int, mesh: Optional[jax.sharding.Mesh], what: str) -> None:
    """A one-line error unless the mesh's ``context`` axis (if any) divides the cache length."""
    c = 1 if mesh is None else dict(mesh.shape).get("context", 1)
    if max_len % c:
        raise ValueError(f"{what}={max_len} is not divisible by the mesh's context axis {c} (the cache's length "
                         f"axis is split over it)")


def cache_bytes_per_token(cache: Cache) -> int:
    """Measured bytes per token (all layers) of a cache pytree, scale leaves included."""
    total = 0
    for leaf in jax.tree_util.tree_leaves(cache["layers"]):
        total += math.prod(leaf.shape[3:]) * leaf.shape[0] * leaf.dtype.itemsize
    return total


def cache_shardings(cfg: ModelConfig, cache: Cache, mesh: jax.sharding.Mesh) -> dict[str, Any]:
    """NamedShardings of a decode cache from its logical axes: batch over (data, fsdp), heads over
    tensor (TPA's head-shared B factors and MLA's latent are replicated over tensor), with the
    same divisibility fallback as the parameters; an int8 cache's scales like their leaves."""
    dtype = "int8" if is_quantized(cache["layers"]) else next(iter(cache["layers"].values())).dtype
    return parallel.tree_shardings(cache_logical_axes(cfg, dtype), cache, mesh)


# the mechanisms whose decode contracts long, thin factor matrices (TPA's factors, MLA's latents)
EIGEN_DECODE = ("tpa", "tpa_kvonly", "mla")


def paged_compiler_options(cfg: Optional[ModelConfig] = None) -> dict[str, Any]:
    """:func:`decode_compiler_options` for steps on a paged cache, and on a CPU XLA's classic loop
    emitters: the newer fusion emitters materialise a same-width bitcast of a whole 16-bit pool (its
    reads and writes go through the uint16 bits, ``core._bits``), a copy of the pool per step."""
    options = decode_compiler_options(cfg)
    if jax.default_backend() == "cpu":
        options["xla_cpu_use_fusion_emitters"] = False
    return options


def decode_compiler_options(cfg: Optional[ModelConfig] = None) -> dict[str, Any]:
    """XLA options for a jitted decode step with a donated cache.  On a CPU: copy insertion by region
    analysis, which sees that the layer loop only reads the cache and that the one write after it
    can update the donated buffer in place (the default analysis copies the whole cache every
    step).  For ``cfg``'s of TPA, TPA-KVonly and MLA also the dots through Eigen rather than
    XNNPACK/YNNPACK: their tall-skinny factor contractions (S rows by a few columns) streamed the
    cache at about a third of Eigen's speed at 32k rows, while MHA/GQA's block-diagonal GEMMs run
    faster through XNNPACK.  Elsewhere none."""
    if jax.default_backend() != "cpu":
        return {}
    options = {"xla_cpu_copy_insertion_use_region_analysis": True}
    if cfg is not None and cfg.attention in EIGEN_DECODE:
        options.update(xla_cpu_use_xnnpack=False, xla_cpu_experimental_ynn_fusion_type="")
    return options
