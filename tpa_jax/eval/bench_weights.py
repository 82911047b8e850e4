"""Weights and arrays for benchmarks: the model's own initial parameters, or the same shapes filled
with cheap pseudo-random values.

A benchmark times shapes, not values, so it may skip the model's initialiser: threefry draws are
the slowest thing XLA:CPU compiles.  :func:`bench_params` gives either the entry point's
``init_params(cfg, key(0))`` (``"model"``) or :func:`filled_like` of ``abstract_params(cfg)``
(``"fast"``: uniform in [-0.02, 0.02)).  :func:`filled_like` also fills decode caches: small leaves
come from NumPy, large ones from one jitted integer hash on the device, so no host copy of a
multi-GiB cache is ever made.
"""
from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ..config import ModelConfig
from ..model import abstract_params, init_params

__all__ = ["PARAM_INITS", "FAST_SCALE", "HOST_FILL_MAX", "bench_params", "filled_like", "nbytes"]

PARAM_INITS = ("model", "fast")
FAST_SCALE = 0.02  # "fast" weights are uniform in [-FAST_SCALE, FAST_SCALE)
HOST_FILL_MAX = 2 ** 22  # leaves up to this many elements are filled on the host (no compile)


def _hash_uniform(shape: tuple, dtype, seed: int) -> jax.Array:
    """Values in [-1, 1) from an integer hash of the element index (murmur-style finaliser)."""
    n = math.prod(shape)
    h = jax.lax.iota(jnp.uint32, n) * jnp.uint32(0x9E3779B1) + jnp.uint32((seed * 0x85EBCA77) & 0xFFFFFFFF)
    h = h ^ (h >> 15)
    h = h * jnp.uint32(0x2C1B3C6D)
    h = h ^ (h >> 12)
    h = h * jnp.uint32(0x297A2D39)
    h = h ^ (h >> 15)
    u = (h >> 8).astype(jnp.float32) * (2.0 / (1 << 24)) - 1.0
    return u.reshape(shape).astype(dtype)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _fill_leaves(specs: tuple, seed: int, scale: float) -> list:
    return [_hash_uniform(shape, dtype, seed + 7919 * i) * jnp.asarray(scale, dtype)
            for i, (shape, dtype) in enumerate(specs)]


def filled_like(abstract: Any, seed: int, scale: float = 1.0) -> Any:
    """A pytree of ``abstract``'s shapes and dtypes filled with values in [-scale, scale)."""
    leaves, treedef = jax.tree_util.tree_flatten(abstract)
    rng = np.random.default_rng(seed)
    out: list = []
    big = []
    for i, x in enumerate(leaves):
        shape, dtype = tuple(x.shape), jnp.dtype(x.dtype)
        if math.prod(shape) <= HOST_FILL_MAX:
            out.append(jnp.asarray(rng.uniform(-scale, scale, shape).astype(np.float32).astype(dtype)))
        else:
            out.append(None)
            big.append((i, shape, dtype))
    if big:
        filled = _fill_leaves(tuple((shape, dtype) for _, shape, dtype in big), seed, float(scale))
        for (i, _, _), value in zip(big, filled):
            out[i] = value
    return jax.tree_util.tree_unflatten(treedef, out)


def bench_params(cfg: ModelConfig, how: str = "model") -> Any:
    """Unboxed parameters of ``cfg``: ``"model"`` the model's own init (key 0), ``"fast"`` the same
    shapes and dtypes filled by :func:`filled_like` (seed 1, scale ``FAST_SCALE``)."""
    if how not in PARAM_INITS:
        raise ValueError(f"param_init: expected one of {PARAM_INITS}, got {how!r}")
    if how == "model":
        return init_params(cfg, jax.random.key(0))
    return filled_like(abstract_params(cfg), seed=1, scale=FAST_SCALE)


def nbytes(tree: Any) -> int:
    """Bytes held by the array leaves of ``tree``."""
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree)))
