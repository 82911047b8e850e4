"""RMSNorm, SwiGLU feed-forward, tied embedding, and parameter/init helpers shared by all modules."""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from ..config import ModelConfig


def dtype_of(name: str):
    return jnp.dtype(name)


def uniform_init(bound: float):
    """U(-bound, bound), as torch's xavier_uniform_ / default nn.Linear init draw."""

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def fan_in_init(fan_in: int):
    """torch's default nn.Linear init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    return uniform_init(1.0 / math.sqrt(fan_in))


def param(module: nn.Module, name: str, init, shape, axes):
    """Create a parameter carrying its logical axes (DESIGN: every parameter is partitioned)."""
    cfg: ModelConfig = module.cfg
    return module.param(name, nn.with_logical_partitioning(init, axes), tuple(shape), dtype_of(cfg.param_dtype))


def cast(x, cfg: ModelConfig):
    return jnp.asarray(x, dtype_of(cfg.compute_dtype))


def rms_norm(x, eps: float, weight=None):
    """y = x * rsqrt(mean(x^2) + eps) [* weight], computed in float32, returned in x's dtype."""
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
    def __call__(self, x):
        w = param(self, "scale", nn.initializers.ones, (self.dim,), (self.axis_name,)) if self.use_weight else None
        return rms_norm(x, self.eps, w)


class SwiGLU(nn.Module):
    """FFN(x) = (SiLU(x W1) * (x W2)) W3 with hidden floor(8/3 d_model); W3 zero-initialised."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.cfg
        m, f = cfg.d_model, cfg.ffn_dim
        w1 = param(self, "w1", fan_in_init(m), (m, f), ("embed", "mlp"))
        w2 = param(self, "w2", fan_in_init(m), (m, f), ("embed", "mlp"))
        w3 = param(self, "w3", nn.initializers.zeros, (f, m), ("mlp", "embed"))
        x = cast(x, cfg)
        h = jax.nn.silu(jnp.einsum("btm,mf->btf", x, cast(w1, cfg))) * jnp.einsum("btm,mf->btf", x, cast(w2, cfg))
        return jnp.einsum("btf,fm->btm", h, cast(w3, cfg))


class Embedding(nn.Module):
    """Token embedding tied with the output head (logits = x E^T, float32)."""

    cfg: ModelConfig

    def setup(self):
        cfg = self.cfg
        self.embedding = param(self, "embedding", fan_in_init(cfg.d_model), (cfg.vocab_size, cfg.d_model),
                               ("vocab", "embed"))

    def __call__(self, tokens):
        return cast(jnp.take(self.embedding, tokens, axis=0), self.cfg)

    def attend(self, x):
        cfg = self.cfg
        return jnp.einsum("btm,vm->btv", cast(x, cfg), cast(self.embedding, cfg),
                          preferred_element_type=jnp.float32)
