"""The building blocks every module shares: parameter creation with logical axes and the
initialisers, the compute-dtype cast, RMSNorm, the SwiGLU feed-forward and the tied embedding."""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from ..config import ModelConfig

Initializer = Callable[..., jax.Array]


def dtype_of(name: str) -> jnp.dtype:
    return jnp.dtype(name)


def uniform_init(bound: float) -> Initializer:
    """U(-bound, bound), as torch's xavier_uniform_ / default nn.Linear init draw."""

    def init(key: jax.Array, shape: Sequence[int], dtype: jnp.dtype = jnp.float32) -> jax.Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def fan_in_init(fan_in: int) -> Initializer:
    """torch's default nn.Linear init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    return uniform_init(1.0 / math.sqrt(fan_in))


def param(module: nn.Module, name: str, init: Initializer, shape: Sequence[int], axes: Sequence[str]) -> jax.Array:
    """Create a parameter of ``module`` in ``cfg.param_dtype`` carrying its logical axes (every
    parameter does, so every parameter can be sharded)."""
    cfg: ModelConfig = module.cfg
    return module.param(name, nn.with_logical_partitioning(init, tuple(axes)), tuple(shape),
                        dtype_of(cfg.param_dtype))


def cast(x: jax.Array, cfg: ModelConfig) -> jax.Array:
    """``x`` in the compute dtype."""
    return jnp.asarray(x, dtype_of(cfg.compute_dtype))


def rms_norm(x: jax.Array, eps: float, weight: Optional[jax.Array] = None) -> jax.Array:
    """y = x * rsqrt(mean(x^2) + eps) [* weight] over the last axis, computed in float32, returned
    in x's dtype."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    if weight is not None:
        y = y * weight.astype(jnp.float32)
    return y.astype(x.dtype)


class RMSNorm(nn.Module):
    """RMSNorm over the last axis; ``use_weight=False`` is the official T6 block norm."""

    cfg: ModelConfig
    dim: int
    eps: float
    use_weight: bool
    axis_name: str = "embed"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        w = param(self, "scale", nn.initializers.ones, (self.dim,), (self.axis_name,)) if self.use_weight else None
        return rms_norm(x, self.eps, w)


class SwiGLU(nn.Module):
    """FFN(x) = (SiLU(x W1) * (x W2)) W3 with hidden width I = floor(8/3 d_model); W3 zero-initialised."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BTM: jax.Array) -> jax.Array:
        cfg = self.cfg
        m, i = cfg.d_model, cfg.ffn_dim
        w1_MI = param(self, "w1", fan_in_init(m), (m, i), ("embed", "mlp"))
        w2_MI = param(self, "w2", fan_in_init(m), (m, i), ("embed", "mlp"))
        w3_IM = param(self, "w3", nn.initializers.zeros, (i, m), ("mlp", "embed"))
        x_BTM = cast(x_BTM, cfg)
        h_BTI = (jax.nn.silu(jnp.einsum("btm,mi->bti", x_BTM, cast(w1_MI, cfg)))
                 * jnp.einsum("btm,mi->bti", x_BTM, cast(w2_MI, cfg)))
        return jnp.einsum("bti,im->btm", h_BTI, cast(w3_IM, cfg))


class Embedding(nn.Module):
    """Token embedding tied with the output head (logits = x E^T, float32)."""

    cfg: ModelConfig

    def setup(self) -> None:
        cfg = self.cfg
        self.embedding = param(self, "embedding", fan_in_init(cfg.d_model), (cfg.vocab_size, cfg.d_model),
                               ("vocab", "embed"))

    def __call__(self, tokens_BT: jax.Array) -> jax.Array:
        return cast(jnp.take(self.embedding, tokens_BT, axis=0), self.cfg)

    def attend(self, x_BTM: jax.Array) -> jax.Array:
        cfg = self.cfg
        return jnp.einsum("btm,vm->btv", cast(x_BTM, cfg), cast(self.embedding, cfg),
                          preferred_element_type=jnp.float32)
