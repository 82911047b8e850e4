"""The int8 decode cache: symmetric absmax quantisation of cached items over their last axis.

Each cached leaf ``name`` [..., F] of an int8 cache holds ``round(x / scale)`` clipped to
[-127, 127], beside a float32 leaf ``name_scale`` [...] with ``scale = max |x| / 127`` over the
last axis (1 where that row is all zero).  Per token that is one scale per factor row for TPA's
A [R, H] and B [R, d_b] (A and B quantised separately), per head for MHA/GQA K [K, D] and V, and
one per token for MLA's c_KV [d_c] and k_R [d^R_h].  Dequantised: ``q * scale``, within
``scale / 2`` of x per element.

A decode step attends to every token as the cache holds it, its own new token included
(:func:`as_stored`): the output for a token does not depend on whether it was read from the cache
or attended as the step's new token, and a one-token decode equals a prefill of the same tokens.
"""
from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp

INT8 = jnp.dtype(jnp.int8)
QMAX = 127.0
SCALE_SUFFIX = "_scale"
FLOAT_CACHE_DTYPES = ("float32", "bfloat16", "float16")


def cache_dtype(dtype: Any) -> jnp.dtype:
    """A decode cache's dtype: a float dtype (float32, bfloat16, float16) or int8, else a one-line error."""
    try:
        d = jnp.dtype(dtype)
    except TypeError:
        d = None
    if d is None or (d != INT8 and d.name not in FLOAT_CACHE_DTYPES):
        raise ValueError(f"cache dtype {dtype!r} is not supported: expected one of "
                         f"{', '.join(FLOAT_CACHE_DTYPES)} or int8")
    return d


def scale_name(name: str) -> str:
    return name + SCALE_SUFFIX


def with_scales(spec: dict[str, Any], dtype: Any) -> dict[str, Any]:
    """A layer's cache layout for ``dtype``: with int8, every leaf followed by its float32 scale leaf
    (the leaf's per-token shape and axes without the last), for ``core.CacheLeaf`` values."""
    if jnp.dtype(dtype) != INT8:
        return dict(spec)
    out = {}
    for name, leaf in spec.items():
        out[name] = leaf
        out[scale_name(name)] = leaf._replace(shape=leaf.shape[:-1], axes=leaf.axes[:-1])
    return out


def leaf_dtype(name: str, dtype: Any) -> jnp.dtype:
    """The dtype of leaf ``name`` in a cache of ``dtype`` (scales: float32)."""
    return jnp.dtype(jnp.float32) if name.endswith(SCALE_SUFFIX) else jnp.dtype(dtype)


def quantize(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(q int8 [..., F], scale float32 [...]): symmetric absmax over the last axis."""
    x = x.astype(jnp.float32)
    amax = jnp.max(jnp.abs(x), axis=-1)
    scale = jnp.where(amax > 0, amax / QMAX, 1.0)
    q = jnp.clip(jnp.round(x / scale[..., None]), -QMAX, QMAX).astype(INT8)
    return q, scale


def dequantize(q: jax.Array, scale: Optional[jax.Array], dtype: Any = jnp.float32) -> jax.Array:
    """``q * scale`` in ``dtype`` (``scale`` None: q as it is, cast)."""
    if scale is None:
        return q.astype(dtype)
    return (q.astype(jnp.float32) * scale[..., None].astype(jnp.float32)).astype(dtype)


def is_quantized(rows: dict[str, jax.Array]) -> bool:
    """Whether a cache's leaves (or a layer's rows) are int8 with scales."""
    return any(name.endswith(SCALE_SUFFIX) for name in rows)


def store(items: dict[str, jax.Array], layers: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """New items {name: [B, T, ...]} as a cache of leaves ``layers`` stores them: int8 with their
    scales, or cast to the leaves' dtype."""
    out = {}
    for name, buf in layers.items():
        if name.endswith(SCALE_SUFFIX):
            continue
        if buf.dtype == INT8:
            out[name], out[scale_name(name)] = quantize(items[name])
        else:
            out[name] = items[name].astype(buf.dtype)
    return out


def dequantize_rows(rows: dict[str, jax.Array], dtype: Any) -> dict[str, jax.Array]:
    """A layer's rows {name: [B, S, ...]} as floats: int8 leaves dequantised to ``dtype`` (the whole
    layer at once, for the paths that attend to dense K/V), the scale leaves dropped; a float cache's
    rows as they are."""
    if not is_quantized(rows):
        return rows
    return {name: dequantize(x, rows.get(scale_name(name)), dtype)
            for name, x in rows.items() if not name.endswith(SCALE_SUFFIX)}


def as_stored(items: dict[str, jax.Array], rows: dict[str, jax.Array], dtype: Any) -> dict[str, jax.Array]:
    """A decode step's new items as the cache will hold them, in float: quantised and dequantised
    (``dtype``) for an int8 cache, cast to the rows' dtype otherwise."""
    if not is_quantized(rows):
        return {name: items[name].astype(rows[name].dtype) for name in rows}
    return {name: dequantize(*quantize(items[name]), dtype) for name in rows if not name.endswith(SCALE_SUFFIX)}
