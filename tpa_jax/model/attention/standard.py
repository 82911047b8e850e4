"""MHA / MQA / GQA: one module, ``cfg.kv_heads`` key/value heads; query head h reads kv head h // G."""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from ...config import ModelConfig
from ..layers import cast, fan_in_init, param
from ..rope import apply_rope
from .core import attend, output_projection, write_cache


class StandardAttention(nn.Module):
    cfg: ModelConfig

    def project(self, x, rope):
        """q [B,T,H,D] (RoPE'd) and the cacheable items k [B,T,K,D] (RoPE'd), v [B,T,K,D]."""
        cfg = self.cfg
        m, h, kv, d = cfg.d_model, cfg.n_head, cfg.kv_heads, cfg.head_dim
        w_q = param(self, "w_q", fan_in_init(m), (m, h, d), ("embed", "heads", "head_dim"))
        w_k = param(self, "w_k", fan_in_init(m), (m, kv, d), ("embed", "kv_heads", "head_dim"))
        w_v = param(self, "w_v", fan_in_init(m), (m, kv, d), ("embed", "kv_heads", "head_dim"))
        q = apply_rope(jnp.einsum("btm,mhd->bthd", x, cast(w_q, cfg)), *rope)
        k = apply_rope(jnp.einsum("btm,mkd->btkd", x, cast(w_k, cfg)), *rope)
        v = jnp.einsum("btm,mkd->btkd", x, cast(w_v, cfg))
        return q, {"k": k, "v": v}

    @nn.compact
    def __call__(self, x_BTM, rope, mask_BTS, cache=None, key_rope=None, start=None):
        cfg = self.cfg
        q, items = self.project(cast(x_BTM, cfg), rope)
        if cache is not None:
            items = cache = write_cache(cache, items, start)
        o = attend(q, items["k"], items["v"], scale=cfg.attn_scale, mask_BTS=mask_BTS)
        return output_projection(self, o), cache
