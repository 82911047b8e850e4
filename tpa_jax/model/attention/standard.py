"""MHA / MQA / GQA as one module with ``cfg.kv_heads`` key/value heads (query head h reads kv
head h // G), and what its decode cache holds: K (after RoPE) and V."""
from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from ...config import ModelConfig
from ..layers import cast, fan_in_init, param
from ..rope import Rope, apply_rope
from .context import context_size, expanded_partial, sharded_cache_attention
from .core import (AttentionMask, CacheLeaf, attend_cache, output_params, project_out, read_cache, stored_leaves,
                   write_cache)
from .decode import decode_form, rows_attention, with_token
from .dispatch import attention_items
from .quant import as_stored, dequantize_rows


class StandardAttention(nn.Module):
    """MHA (K = H), MQA (K = 1) or GQA (K = n_kv_head) key/value heads, RoPE on q and k."""

    cfg: ModelConfig

    @staticmethod
    def cache_spec(cfg: ModelConfig) -> dict[str, CacheLeaf]:
        """Per token and layer: K [K, D] after RoPE and V [K, E]."""
        return {"k": CacheLeaf((cfg.kv_heads, cfg.head_dim), ("kv_heads", "head_dim")),
                "v": CacheLeaf((cfg.kv_heads, cfg.value_dim), ("kv_heads", "value_dim"))}

    def setup(self) -> None:
        cfg = self.cfg
        m, h, kv, d, e = cfg.d_model, cfg.n_head, cfg.kv_heads, cfg.head_dim, cfg.value_dim
        self.w_q = param(self, "w_q", fan_in_init(m), (m, h, d), ("embed", "heads", "head_dim"))
        self.w_k = param(self, "w_k", fan_in_init(m), (m, kv, d), ("embed", "kv_heads", "head_dim"))
        self.w_v = param(self, "w_v", fan_in_init(m), (m, kv, e), ("embed", "kv_heads", "value_dim"))
        self.w_o, self.out_norm = output_params(self)

    def query(self, x_BTM: jax.Array, rope: Rope) -> jax.Array:
        """q [B, T, H, D], RoPE'd."""
        return apply_rope(jnp.einsum("btm,mhd->bthd", cast(x_BTM, self.cfg), cast(self.w_q, self.cfg)), *rope)

    def kv_items(self, x_BTM: jax.Array, rope: Rope) -> dict[str, jax.Array]:
        """The cache leaves for T new tokens: k [B, T, K, D] (RoPE'd) and v [B, T, K, E]."""
        cfg = self.cfg
        x_BTM = cast(x_BTM, cfg)
        k_BTKD = apply_rope(jnp.einsum("btm,mkd->btkd", x_BTM, cast(self.w_k, cfg)), *rope)
        v_BTKE = jnp.einsum("btm,mke->btke", x_BTM, cast(self.w_v, cfg))
        return {"k": k_BTKD, "v": v_BTKE}

    def __call__(self, x_BTM: jax.Array, rope: Rope, mask: AttentionMask, cache: Optional[dict[str, jax.Array]] = None,
                 key_rope: Optional[Rope] = None, start_B: Optional[jax.Array] = None,
                 ) -> tuple[jax.Array, Optional[dict[str, jax.Array]]]:
        """Full attention, or cached: the new tokens' K/V are written at rows ``start_B`` and
        attention reads the whole cache (``key_rope`` is unused: cached keys are already rotated)."""
        cfg = self.cfg
        items = self.kv_items(x_BTM, rope)
        if cache is not None and context_size() > 1:  # the cache's length axis is split over devices
            cache = write_cache(cache, items, start_B)
            o_BTHE = sharded_cache_attention({"q": self.query(x_BTM, rope)}, self.read(cache), start_B,
                                             expanded_partial(cfg, self.keys_values))
            return project_out(cfg, o_BTHE.astype(x_BTM.dtype), self.w_o, self.out_norm), cache
        if cache is not None and x_BTM.shape[1] == 1:  # decode: read the old rows, then write the new one in place
            q_BHD = self.query(x_BTM, rope)[:, 0]

            def attend(rows: dict[str, jax.Array], kv_len_B: jax.Array) -> tuple[jax.Array, jax.Array]:
                form = decode_form(cfg.kv_heads, cfg.n_head, rows["k"].dtype)
                return rows_attention(q_BHD, rows["k"], rows["v"], kv_len_B, scale=cfg.attn_scale, form=form)

            o_BHE, lse_BH = attend_cache(cache, start_B, attend, cfg.compute_dtype)  # a paged one block by block
            new = as_stored(items, stored_leaves(cache), cfg.compute_dtype)  # as the cache will hold them
            o_B1HE = with_token(q_BHD, o_BHE, lse_BH, (new["k"], new["v"]), scale=cfg.attn_scale)
            cache = write_cache(cache, items, start_B)
            return project_out(cfg, o_B1HE.astype(x_BTM.dtype), self.w_o, self.out_norm), cache
        if cache is not None:
            cache = write_cache(cache, items, start_B)
            items = self.read(cache)
        o_BTHE = attention_items(cfg, self.query(x_BTM, rope), items, self.keys_values, key_rope, mask)
        return project_out(cfg, o_BTHE, self.w_o, self.out_norm), cache

    def read(self, cache) -> dict[str, jax.Array]:
        """The layer's cached K and V rows in float (an int8 cache's dequantised)."""
        return dequantize_rows(read_cache(cache), self.cfg.compute_dtype)

    @staticmethod
    def keys_values(items: dict[str, jax.Array], key_rope: Optional[Rope] = None, batch: int = 0,
                    length: int = 0) -> tuple[jax.Array, jax.Array]:
        """The cached K and V as they are."""
        return items["k"], items["v"]
