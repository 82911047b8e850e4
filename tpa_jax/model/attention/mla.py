"""Multi-head Latent Attention (DeepSeek-V2; paper App. F.3) with decoupled RoPE: the module, what
its decode cache holds (the latent c_KV and the shared RoPE key) and its absorbed decode.

    c_Q  = RMSNorm(x W^DQ)                          [d'_c]
    q_C  = c_Q W^UQ,  q_R = RoPE(c_Q W^QR)          per head d_h and d^R_h
    c_KV = RMSNorm(x W^DKV)                         [d_c]   (cached)
    k_R  = RoPE(x W^KR)                             [d^R_h] one head shared by all heads (cached)
    k_C  = c_KV W^UK,  v = c_KV W^UV                per head d_h and d_v
    o    = softmax((q_C.k_C + q_R.k_R) / sqrt(d_h + d^R_h)) v,   out = o W^O

Letters: C is either latent (d'_c or d_c, by the weight it meets), F = d^R_h, D = d_h, E = d_v.
"""
from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from ...config import ModelConfig
from ...parallel import constrain
from ..layers import RMSNorm, cast, fan_in_init, param
from ..rope import Rope, apply_rope
from .core import (AttentionMask, CacheLeaf, attend_cache, filled_BS, merge_parts, output_params, project_out,
                   read_cache, row_softmax, stored_leaves, write_cache)
from .context import context_size, expanded_partial, sharded_cache_attention, varying
from .dispatch import attention_items
from .quant import as_stored, dequantize_rows

LATENT = ("batch", "length", "latent")  # the logical layout of the q and kv latents under a mesh


class MLAttention(nn.Module):
    """MLA with decoupled RoPE; decode steps score in the latent space unless ``decode_impl="materialize"``."""

    cfg: ModelConfig

    @staticmethod
    def cache_spec(cfg: ModelConfig) -> dict[str, CacheLeaf]:
        """Per token and layer: the latent c_KV [d_c] and the shared RoPE key k_R [d^R_h]."""
        return {"c_kv": CacheLeaf((cfg.kv_lora_rank,), ("latent",)),
                "k_r": CacheLeaf((cfg.rope_head_dim,), ("rope_dim",))}

    def setup(self) -> None:
        cfg = self.cfg
        m, h, d, f, e = cfg.d_model, cfg.n_head, cfg.head_dim, cfg.rope_head_dim, cfg.value_dim
        dq, dc = cfg.q_lora_rank, cfg.kv_lora_rank
        self.w_dq = param(self, "w_dq", fan_in_init(m), (m, dq), ("embed", "latent"))
        self.w_dkv = param(self, "w_dkv", fan_in_init(m), (m, dc), ("embed", "latent"))
        self.w_kr = param(self, "w_kr", fan_in_init(m), (m, f), ("embed", "rope_dim"))
        self.q_norm = RMSNorm(cfg, dq, cfg.mla_norm_eps, True, "latent")
        self.kv_norm = RMSNorm(cfg, dc, cfg.mla_norm_eps, True, "latent")
        self.w_uq = param(self, "w_uq", fan_in_init(dq), (dq, h, d), ("latent", "heads", "head_dim"))
        self.w_qr = param(self, "w_qr", fan_in_init(dq), (dq, h, f), ("latent", "heads", "rope_dim"))
        self.w_uk = param(self, "w_uk", fan_in_init(dc), (dc, h, d), ("latent", "heads", "head_dim"))
        self.w_uv = param(self, "w_uv", fan_in_init(dc), (dc, h, e), ("latent", "heads", "value_dim"))
        self.w_o, self.out_norm = output_params(self)

    def _w(self, name: str) -> jax.Array:
        return cast(varying(getattr(self, name)), self.cfg)

    def queries(self, x_BTM: jax.Array, rope: Rope) -> tuple[jax.Array, jax.Array]:
        """q_C [B, T, H, D] and the RoPE'd q_R [B, T, H, F], both from the normed c_Q [B, T, C]."""
        c_q_BTC = constrain(self.q_norm(jnp.einsum("btm,mc->btc", cast(x_BTM, self.cfg), self._w("w_dq"))), LATENT)
        q_c_BTHD = jnp.einsum("btc,chd->bthd", c_q_BTC, self._w("w_uq"))
        q_r_BTHF = apply_rope(jnp.einsum("btc,chf->bthf", c_q_BTC, self._w("w_qr")), *rope)
        return q_c_BTHD, q_r_BTHF

    def kv_items(self, x_BTM: jax.Array, rope: Rope) -> dict[str, jax.Array]:
        """The cache leaves for T new tokens: c_kv [B, T, C] (normed) and k_r [B, T, F] (RoPE'd)."""
        x_BTM = cast(x_BTM, self.cfg)
        c_kv_BTC = constrain(self.kv_norm(jnp.einsum("btm,mc->btc", x_BTM, self._w("w_dkv"))), LATENT)
        k_r_BTF = apply_rope(jnp.einsum("btm,mf->btf", x_BTM, self._w("w_kr")), *rope)
        return {"c_kv": c_kv_BTC, "k_r": k_r_BTF}

    def absorbed_attention(self, q_c_BTHD: jax.Array, q_r_BTHF: jax.Array, cache: Any, start_B: jax.Array,
                           new: dict[str, jax.Array]) -> jax.Array:
        """Decode with weight absorption (DeepSeek-V2): score and aggregate in the latent space, o [B, 1, H, E].

        q_C . k_C = (q_C W^UK^T) . c_KV, and sum_s p_s v_s = (sum_s p_s c_KV,s) W^UV, so the cached
        c_KV [S, d_c] is read as is and no per-head K or V is built: per cached token the cost is
        h (2 d_c + d^R_h) instead of h d_c (d_h + d_v) for the up-projections alone.  ``cache``: the
        layer's cache, read before the new token is written (rows ``< start_B`` filled; a paged
        one page by page, ``core.paged_parts``), or its rows {c_kv, k_r} [B, S, ...] as they are; the
        token's own items ``new`` join the softmax by log-sum-exp (``core.LayerCache``).
        """
        cfg = self.cfg
        f32 = jnp.float32
        q_lat_BHC = jnp.einsum("bhd,chd->bhc", q_c_BTHD[:, 0], self._w("w_uk")).astype(f32) * cfg.attn_scale
        q_r_BHF = q_r_BTHF[:, 0].astype(f32) * cfg.attn_scale

        def attend(rows: dict[str, jax.Array], kv_len_B: jax.Array) -> tuple[jax.Array, jax.Array]:
            c_kv_BSC, k_r_BSF = rows["c_kv"], rows["k_r"]
            logits_BSH = (jnp.einsum("bsc,bhc->bsh", c_kv_BSC, q_lat_BHC.astype(c_kv_BSC.dtype),
                                     preferred_element_type=f32)
                          + jnp.einsum("bsf,bhf->bsh", k_r_BSF, q_r_BHF.astype(k_r_BSF.dtype),
                                       preferred_element_type=f32))
            filled_BS_ = filled_BS(kv_len_B, jnp.arange(c_kv_BSC.shape[1], dtype=jnp.int32))
            p_BSH, l_BH, lse_BH = row_softmax(logits_BSH, filled_BS_)  # rows past the length: p exactly 0
            o_lat_BHC = jnp.einsum("bsh,bsc->bhc", p_BSH.astype(c_kv_BSC.dtype), c_kv_BSC, preferred_element_type=f32)
            return o_lat_BHC / l_BH[..., None], lse_BH

        o_lat_BHC, lse_BH = attend_cache(cache, start_B, attend, cfg.compute_dtype)
        c_new_BC, k_r_new_BF = new["c_kv"][:, 0].astype(f32), new["k_r"][:, 0].astype(f32)
        lse_new_BH = jnp.einsum("bhc,bc->bh", q_lat_BHC, c_new_BC) + jnp.einsum("bhf,bf->bh", q_r_BHF, k_r_new_BF)
        o_new_BHC = jnp.broadcast_to(c_new_BC[:, None], o_lat_BHC.shape)
        o_lat_BHC = merge_parts(o_lat_BHC, lse_BH, o_new_BHC, lse_new_BH)[0]
        return jnp.einsum("bhc,che->bhe", o_lat_BHC.astype(q_c_BTHD.dtype), self._w("w_uv"))[:, None]

    def __call__(self, x_BTM: jax.Array, rope: Rope, mask: AttentionMask, cache: Optional[dict[str, jax.Array]] = None,
                 key_rope: Optional[Rope] = None, start_B: Optional[jax.Array] = None,
                 ) -> tuple[jax.Array, Optional[dict[str, jax.Array]]]:
        """Full attention, or cached: the cache holds only c_KV and the shared RoPE key k_R."""
        cfg = self.cfg
        items = self.kv_items(x_BTM, rope)
        q_c_BTHD, q_r_BTHF = self.queries(x_BTM, rope)
        if (cache is not None and x_BTM.shape[1] == 1 and cfg.decode_impl != "materialize"
                and context_size() == 1):  # absorbed decode: read the rows, then write the token (in place)
            new = as_stored(items, stored_leaves(cache), cfg.compute_dtype)  # as the cache will hold them
            o_B1HE = self.absorbed_attention(q_c_BTHD, q_r_BTHF, cache, start_B, new)
            return project_out(cfg, o_B1HE, self.w_o, self.out_norm), write_cache(cache, items, start_B)
        if cache is not None:
            cache = write_cache(cache, items, start_B)
            items = dequantize_rows(read_cache(cache), cfg.compute_dtype)
        if cache is not None and context_size() > 1:  # the cache's length axis is split over devices
            q_BTHD = jnp.concatenate([q_c_BTHD, q_r_BTHF], axis=-1)
            o_BTHE = sharded_cache_attention({"q": q_BTHD}, items, start_B, expanded_partial(cfg, self.keys_values))
            return project_out(cfg, o_BTHE.astype(x_BTM.dtype), self.w_o, self.out_norm), cache
        # attend's head dim is the query/key dim d_h + d^R_h here
        q_BTHD = jnp.concatenate([q_c_BTHD, q_r_BTHF], axis=-1)
        o_BTHE = attention_items(cfg, q_BTHD, items, self.keys_values, key_rope, mask)
        return project_out(cfg, o_BTHE, self.w_o, self.out_norm), cache

    def keys_values(self, items: dict[str, jax.Array], key_rope: Optional[Rope] = None, batch: int = 0,
                    length: int = 0) -> tuple[jax.Array, jax.Array]:
        """K [B, S, H, d_h + d^R_h] (up-projected c_KV beside the shared k_R) and V [B, S, H, E]."""
        k_c_BSHD = jnp.einsum("bsc,chd->bshd", items["c_kv"], self._w("w_uk"))
        v_BSHE = jnp.einsum("bsc,che->bshe", items["c_kv"], self._w("w_uv"))
        k_r_BSHF = jnp.broadcast_to(items["k_r"][:, :, None, :], k_c_BSHD.shape[:3] + items["k_r"].shape[-1:])
        return jnp.concatenate([k_c_BSHD, k_r_BSHF], axis=-1), v_BSHE
