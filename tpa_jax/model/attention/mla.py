"""Multi-head Latent Attention (DeepSeek-V2; paper App. F.3) with decoupled RoPE.

    c_Q  = RMSNorm(x W^DQ)                          [d'_c]
    q_C  = c_Q W^UQ,  q_R = RoPE(c_Q W^QR)          per head d_h and d^R_h
    c_KV = RMSNorm(x W^DKV)                         [d_c]   (cached)
    k_R  = RoPE(x W^KR)                             [d^R_h] one head shared by all heads (cached)
    k_C  = c_KV W^UK,  v = c_KV W^UV                per head d_h and d_v
    o    = softmax((q_C.k_C + q_R.k_R) / sqrt(d_h + d^R_h)) v,   out = o W^O
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from ...config import ModelConfig
from ..layers import RMSNorm, cast, fan_in_init, param
from ..rope import apply_rope
from .core import attend, output_projection, write_cache


class MLAttention(nn.Module):
    cfg: ModelConfig

    def latents(self, x, rope):
        """c_Q [B,T,d'_c] (normed), c_KV [B,T,d_c] (normed), k_R [B,T,1,d^R] (RoPE'd)."""
        cfg = self.cfg
        m, dq, dc, dr = cfg.d_model, cfg.q_lora_rank, cfg.kv_lora_rank, cfg.rope_head_dim
        w_dq = param(self, "w_dq", fan_in_init(m), (m, dq), ("embed", "latent"))
        w_dkv = param(self, "w_dkv", fan_in_init(m), (m, dc), ("embed", "latent"))
        w_kr = param(self, "w_kr", fan_in_init(m), (m, dr), ("embed", "head_dim"))
        c_q = RMSNorm(cfg, dq, cfg.mla_norm_eps, True, "latent", name="q_norm")(
            jnp.einsum("btm,mc->btc", x, cast(w_dq, cfg)))
        c_kv = RMSNorm(cfg, dc, cfg.mla_norm_eps, True, "latent", name="kv_norm")(
            jnp.einsum("btm,mc->btc", x, cast(w_dkv, cfg)))
        k_r = apply_rope(jnp.einsum("btm,md->btd", x, cast(w_kr, cfg))[:, :, None, :], *rope)
        return c_q, c_kv, k_r

    def up(self):
        """W^UQ [d'_c,H,d_h], W^QR [d'_c,H,d^R], W^UK [d_c,H,d_h], W^UV [d_c,H,d_v] (compute dtype)."""
        cfg = self.cfg
        h, d, dr, dv = cfg.n_head, cfg.head_dim, cfg.rope_head_dim, cfg.value_dim
        dq, dc = cfg.q_lora_rank, cfg.kv_lora_rank
        ws = {
            "w_uq": param(self, "w_uq", fan_in_init(dq), (dq, h, d), ("latent", "heads", "head_dim")),
            "w_qr": param(self, "w_qr", fan_in_init(dq), (dq, h, dr), ("latent", "heads", "head_dim")),
            "w_uk": param(self, "w_uk", fan_in_init(dc), (dc, h, d), ("latent", "heads", "head_dim")),
            "w_uv": param(self, "w_uv", fan_in_init(dc), (dc, h, dv), ("latent", "heads", "head_dim")),
        }
        return {k: cast(w, cfg) for k, w in ws.items()}

    def absorbed_attention(self, q_c, q_r, items, w, mask_BTS):
        """Decode with weight absorption (DeepSeek-V2): score and aggregate in the latent space.

        q_C . k_C = (q_C W^UK^T) . c_KV, and sum_s p_s v_s = (sum_s p_s c_KV,s) W^UV, so the cached
        c_KV [S, d_c] is read as is and no per-head K or V is built: per cached token the cost is
        h (2 d_c + d^R_h) instead of h d_c (d_h + d_v) for the up-projections alone.
        """
        cfg = self.cfg
        q_lat = jnp.einsum("bthd,chd->bthc", q_c, w["w_uk"])
        c_kv, k_r = items["c_kv"].astype(q_lat.dtype), items["k_r"].astype(q_r.dtype)
        logits = (jnp.einsum("bthc,bsc->bhts", q_lat, c_kv, preferred_element_type=jnp.float32)
                  + jnp.einsum("bthr,bsr->bhts", q_r, k_r, preferred_element_type=jnp.float32)) * cfg.attn_scale
        logits = jnp.where(mask_BTS[:, None], logits, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(logits, axis=-1)
        o_lat = jnp.einsum("bhts,bsc->bthc", probs.astype(c_kv.dtype), c_kv)
        return jnp.einsum("bthc,che->bthe", o_lat, w["w_uv"])

    @nn.compact
    def __call__(self, x_BTM, rope, mask_BTS, cache=None, key_rope=None, start=None):
        """Full attention, or cached: the cache holds only c_KV and the shared RoPE key k_R."""
        cfg = self.cfg
        x = cast(x_BTM, cfg)
        c_q, c_kv, k_r = self.latents(x, rope)
        items = {"c_kv": c_kv, "k_r": k_r[:, :, 0, :]}
        if cache is not None:
            items = cache = write_cache(cache, items, start)
        w = self.up()
        q_c = jnp.einsum("btc,chd->bthd", c_q, w["w_uq"])
        q_r = apply_rope(jnp.einsum("btc,chd->bthd", c_q, w["w_qr"]), *rope)
        if cache is not None and x.shape[1] == 1 and cfg.decode_impl != "materialize":
            o = self.absorbed_attention(q_c, q_r, cache, w, mask_BTS)
            return output_projection(self, o), cache
        k_c = jnp.einsum("bsc,chd->bshd", items["c_kv"], w["w_uk"])
        v = jnp.einsum("bsc,che->bshe", items["c_kv"], w["w_uv"])
        q = jnp.concatenate([q_c, q_r], axis=-1)
        k_r = items["k_r"][:, :, None, :]
        k = jnp.concatenate([k_c, jnp.broadcast_to(k_r, k_c.shape[:3] + k_r.shape[-1:])], axis=-1)
        o = attend(q, k, v, scale=cfg.attn_scale, mask_BTS=mask_BTS)
        return output_projection(self, o), cache
