"""Rotary position embedding: the inverse frequencies, the cos/sin tables and the rotation of any
``[B, T, ..., d]`` factor tensor.

Convention of the official T6 code (needed to load its checkpoints): half-split pairs
``x1 = x[..., :d/2]``, ``x2 = x[..., d/2:]`` rotated as

    y1 =  x1 cos + x2 sin
    y2 = -x1 sin + x2 cos

i.e. a rotation by ``-pos * theta_j`` (the opposite sign of the usual rotate_half).  Only the
relative position enters attention scores (Theorem 3.1), so either sign is a valid RoPE.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

Rope = tuple[jax.Array, jax.Array]  # (cos, sin), each [T, d/2] or [B, T, d/2]


def inv_frequencies(dim: int, theta: float = 10000.0) -> np.ndarray:
    """``1 / theta**(2j/dim)`` computed the way torch does (power in float64, rest in float32)."""
    exponent = (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)).astype(np.float32)
    power = np.power(np.float64(theta), exponent.astype(np.float64)).astype(np.float32)
    return (np.float32(1.0) / power).astype(np.float32)


def rope_tables(positions: jax.Array, dim: int, theta: float = 10000.0, bf16_round: bool = False) -> Rope:
    """cos/sin tables of shape ``positions.shape + (dim // 2,)`` in float32.

    ``bf16_round`` reproduces the official code, which rounds its tables to bfloat16.
    """
    inv_freq = jnp.asarray(inv_frequencies(dim, theta))
    freqs = jnp.asarray(positions, jnp.float32)[..., None] * inv_freq
    cos, sin = jnp.cos(freqs), jnp.sin(freqs)
    if bf16_round:
        cos = cos.astype(jnp.bfloat16).astype(jnp.float32)
        sin = sin.astype(jnp.bfloat16).astype(jnp.float32)
    return cos, sin


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate the last axis of ``x`` ([B, T, *mid, d]) by tables of shape [T, d/2] or [B, T, d/2].

    The tables broadcast over every axis between T and d (ranks, heads).  Computed in float32,
    returned in x's dtype.
    """
    n_mid = x.ndim - 3
    shape = cos.shape[:-1] + (1,) * n_mid + cos.shape[-1:]
    cos = cos.reshape(shape).astype(jnp.float32)
    sin = sin.reshape(shape).astype(jnp.float32)
    half = x.shape[-1] // 2
    x32 = x.astype(jnp.float32)
    x1, x2 = x32[..., :half], x32[..., half:]
    y = jnp.concatenate([x1 * cos + x2 * sin, x2 * cos - x1 * sin], axis=-1)
    return y.astype(x.dtype)
