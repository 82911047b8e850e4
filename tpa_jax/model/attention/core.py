"""Scaled dot-product attention shared by every mechanism (eq. 3.2), GQA-aware, float32 softmax."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from ...config import ModelConfig
from ..layers import RMSNorm, cast, param


def causal_mask(q_positions, kv_positions):
    """Boolean [B|1, T, S]: query at position t sees keys at positions <= t."""
    q_positions = jnp.atleast_2d(q_positions)
    kv_positions = jnp.atleast_2d(kv_positions)
    return q_positions[:, :, None] >= kv_positions[:, None, :]


def attend(q_BTHD, k_BSKD, v_BSKE, *, scale: float, mask_BTS):
    """softmax(scale * q k^T masked) v with H = K * G query heads; head h reads kv head h // G.

    Logits and softmax statistics are float32; the value contraction runs in v's dtype.
    """
    b, t, h, d = q_BTHD.shape
    kv = k_BSKD.shape[2]
    g = h // kv
    q = q_BTHD.reshape(b, t, kv, g, d)
    logits = jnp.einsum("btkgd,bskd->bkgts", q, k_BSKD, preferred_element_type=jnp.float32) * scale
    big_neg = jnp.finfo(jnp.float32).min
    logits = jnp.where(mask_BTS[:, None, None, :, :], logits, big_neg)
    probs = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum("bkgts,bske->btkge", probs.astype(v_BSKE.dtype), v_BSKE)
    return out.reshape(b, t, h, v_BSKE.shape[-1])


def output_params(module):
    """Create W_O [h, E, d_model] (zero-initialised) and the optional per-head output RMSNorm.

    Works from ``setup`` or a compact method; the parameter tree is ``w_o`` and ``out_norm/scale``.
    """
    cfg = module.cfg
    h, e, m = cfg.n_head, cfg.value_dim, cfg.d_model
    norm = RMSNorm(cfg, e, cfg.attn_out_norm_eps, True, "head_dim", name="out_norm") if cfg.attn_out_norm else None
    w_o = param(module, "w_o", nn.initializers.zeros, (h, e, m), ("heads", "head_dim", "embed"))
    return w_o, norm


def project_out(cfg, o_BTHE, w_o, norm=None):
    """[per-head RMSNorm] then concat heads and W_O (eq. 3.3)."""
    if norm is not None:
        o_BTHE = norm(o_BTHE)
    return jnp.einsum("bthe,hem->btm", cast(o_BTHE, cfg), cast(w_o, cfg))


def output_projection(module, o_BTHE):
    """``project_out`` for compact modules."""
    w_o, norm = output_params(module)
    return project_out(module.cfg, o_BTHE, w_o, norm)
