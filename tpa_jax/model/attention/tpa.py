"""Tensor Product Attention (paper eqs. 3.1-3.3) and its variants (App. C and G).

Each token's query/key/value slice is a scaled sum of outer products of contextual factors:

    Q_t = (1/R_Q) A_Q(x_t)^T B_Q(x_t),   A_Q in R^{R_Q x h},  B_Q in R^{R_Q x d_h}

with A and B produced by linear maps of x_t.  RoPE is applied to the B factors of Q and K only
(Theorem 3.1), so key factors come out pre-rotated (eq. 3.5) and are what a decode cache stores.

Variants chosen by the config:
  * ``attention="tpa_kvonly"``: plain query projection, factorised K and V;
  * ``contextual_a=False`` / ``contextual_b=False``: learned constant A / B factors;
  * ``shared_kv_b``: K and V share the token-dimension factor (B_K = B_V before RoPE);
  * ``tpa_order=3``: B is replaced by vec(b (x) c), b in R^{d_b}, c in R^{d_c}, RoPE on b (Thm C.1);
  * ``head_factor_activation``: sigmoid, or softmax over the h entries of each A factor;
  * ``attn_out_norm``: per-head RMSNorm of the attention output before W_O.
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from ...config import ModelConfig
from ..layers import cast, param, uniform_init
from ..rope import apply_rope
from . import flashtpa
from .core import attend, output_params, project_out, write_cache
from .kernels import flashtpa_decode_pallas


def _xavier_bound(fan_in: int, fan_out: int) -> float:
    return math.sqrt(6.0 / (fan_in + fan_out))


class TPAttention(nn.Module):
    cfg: ModelConfig

    def setup(self):
        cfg = self.cfg
        m, h, d, db = cfg.d_model, cfg.n_head, cfg.head_dim, cfg.b_dim
        official = cfg.factor_init == "official"
        ranks = {"k": cfg.k_rank, "v": cfg.v_rank}
        if cfg.attention == "tpa":
            ranks = {"q": cfg.q_rank, **ranks}
        else:  # TPA-KVonly: plain query projection
            self.w_q = param(self, "w_q", uniform_init(_xavier_bound(m, h * d)), (m, h, d),
                             ("embed", "heads", "head_dim"))
        a_w, b_w, c_w = {}, {}, {}
        for n, r in ranks.items():
            if cfg.contextual_a:  # A(x) = x W^a, W^a in R^{M x R x h}
                bound = _xavier_bound(h * r, m * r) if official else _xavier_bound(m, r * h)
                a_w[n] = param(self, f"w_a{n}", uniform_init(bound), (m, r, h), ("embed", "rank", "heads"))
            else:  # learned constant A in R^{R x h}
                a_w[n] = param(self, f"a_{n}", uniform_init(_xavier_bound(r, h)), (r, h), ("rank", "heads"))
            if n == "v" and cfg.shared_kv_b:
                continue
            if cfg.contextual_b:
                bound = _xavier_bound(r * db, m * db) if official else _xavier_bound(m, r * db)
                b_w[n] = param(self, f"w_b{n}", uniform_init(bound), (m, r, db), ("embed", "rank", "head_dim"))
            else:
                b_w[n] = param(self, f"b_{n}", uniform_init(_xavier_bound(r, db)), (r, db), ("rank", "head_dim"))
            if cfg.tpa_order == 3:
                dc = cfg.tpa_c_dim
                bound = _xavier_bound(r * dc, m * dc) if official else _xavier_bound(m, r * dc)
                c_w[n] = param(self, f"w_c{n}", uniform_init(bound), (m, r, dc), ("embed", "rank", "head_dim"))
        self.a_w, self.b_w, self.c_w = a_w, b_w, c_w
        self.w_o, self.out_norm = output_params(self)

    # ---------------------------------------------------------------- factors
    def _act(self, a):
        cfg = self.cfg
        if cfg.head_factor_activation == "sigmoid":
            return jax.nn.sigmoid(a)
        if cfg.head_factor_activation == "softmax":
            return jax.nn.softmax(a.astype(jnp.float32), axis=-1).astype(a.dtype)
        return a

    def _a(self, x, n: str):
        """Head-dimension factor A, [B, T, R, H] (or [1, 1, R, H] when non-contextual)."""
        cfg = self.cfg
        w = cast(self.a_w[n], cfg)
        return self._act(jnp.einsum("btm,mrh->btrh", x, w) if cfg.contextual_a else w[None, None])

    def _b_raw(self, x, n: str):
        """B before RoPE, [B, T, R, d_b] (broadcast constant when non-contextual)."""
        cfg = self.cfg
        w = cast(self.b_w[n], cfg)
        if cfg.contextual_b:
            return jnp.einsum("btm,mrd->btrd", x, w)
        return jnp.broadcast_to(w[None, None], (x.shape[0], x.shape[1]) + w.shape)

    def _c(self, x, n: str):
        return jnp.einsum("btm,mrc->btrc", x, cast(self.c_w[n], self.cfg))

    @staticmethod
    def vec_bc(b_BTRD, c_BTRC):
        """Third order: vec(b (x) c) stacks the columns of b c^T, so index j * d_b + i (Thm C.1)."""
        return jnp.einsum("btrc,btrd->btrcd", c_BTRC, b_BTRD).reshape(*b_BTRD.shape[:3], -1)

    def _b(self, x, n: str, rope):
        """Token-dimension factor B, [B, T, R, d_h], RoPE'd when ``rope`` is given (RoPE on b, then vec)."""
        b = self._b_raw(x, n)
        if rope is not None:
            b = apply_rope(b, *rope)
        return self.vec_bc(b, self._c(x, n)) if self.cfg.tpa_order == 3 else b

    @staticmethod
    def contract(a_BTRH, b_BTRD, rank: int):
        """(1/R) A^T B per token: [B, T, H, D]  (eq. 3.1)."""
        return jnp.einsum("btrh,btrd->bthd", a_BTRH, b_BTRD) / rank

    # ---------------------------------------------------------------- what a decode cache holds
    def kv_items(self, x, rope):
        """The per-token K/V factors a decode cache stores (never K or V themselves):
        a_k, a_v (contextual A), b_k pre-rotated (eq. 3.5) and b_v, or one unrotated b_kv when
        shared; third order keeps b and c apart ((R_K + R_V)(h + d_b + d_c) numbers)."""
        cfg = self.cfg
        x = cast(x, cfg)
        items = {}
        if cfg.contextual_a:
            items["a_k"], items["a_v"] = self._a(x, "k"), self._a(x, "v")
        if cfg.contextual_b:
            if cfg.shared_kv_b:
                items["b_kv"] = self._b_raw(x, "k")
            else:
                items["b_k"] = apply_rope(self._b_raw(x, "k"), *rope)
                items["b_v"] = self._b_raw(x, "v")
        if cfg.tpa_order == 3:
            items["c_k"], items["c_v"] = self._c(x, "k"), self._c(x, "v")
        return items

    def kv_factors(self, items, key_rope, batch: int, length: int):
        """Full K/V factors [B, S, R, .] over ``length`` key positions from cached items."""
        cfg = self.cfg
        f = {}
        for n in ("k", "v"):
            if cfg.contextual_a:
                f[f"a_{n}"] = items[f"a_{n}"]
            else:
                w = self._act(cast(self.a_w[n], cfg))
                f[f"a_{n}"] = jnp.broadcast_to(w[None, None], (batch, length) + w.shape)
            if not cfg.contextual_b:  # learned constant (one shared by K and V with shared_kv_b)
                w = cast(self.b_w["k" if cfg.shared_kv_b else n], cfg)
                b = jnp.broadcast_to(w[None, None], (batch, length) + w.shape)
            else:
                b = items["b_kv"] if cfg.shared_kv_b else items[f"b_{n}"]
            if n == "k" and (cfg.shared_kv_b or not cfg.contextual_b):
                b = apply_rope(b, *key_rope)  # these are not stored pre-rotated
            if cfg.tpa_order == 3:
                b = self.vec_bc(b, items[f"c_{n}"])
            f[f"b_{n}"] = b
        return f

    def factors(self, x, rope):
        """All factors of one layer: a_q/b_q (TPA only), a_k, b_k (pre-rotated), a_v, b_v."""
        cfg = self.cfg
        x = cast(x, cfg)
        f = self.kv_factors(self.kv_items(x, rope), rope, x.shape[0], x.shape[1])
        if cfg.attention == "tpa":
            f["a_q"], f["b_q"] = self._a(x, "q"), self._b(x, "q", rope)
        return f

    def query(self, x, rope):
        cfg = self.cfg
        x = cast(x, cfg)
        if cfg.attention == "tpa":
            return self.contract(self._a(x, "q"), self._b(x, "q", rope), cfg.q_rank)
        return apply_rope(jnp.einsum("btm,mhd->bthd", x, cast(self.w_q, cfg)), *rope)

    def flash_decode(self, x_B1M, rope, key_rope, cache, lengths_B):
        """One-token decode straight from the factor cache (FlashTPA, paper Alg. 2): K and V are
        never formed.  ``lengths_B`` counts the valid cache rows, the new token's included."""
        cfg = self.cfg
        x = cast(x_B1M, cfg)
        s = jax.tree_util.tree_leaves(cache)[0].shape[1]
        f = self.kv_factors(cache, key_rope, x.shape[0], s)
        kv = (f["a_k"], f["b_k"], f["a_v"], f["b_v"], lengths_B)
        kw = dict(k_rank=cfg.k_rank, v_rank=cfg.v_rank, scale=cfg.attn_scale, block_size=cfg.decode_block_size)
        if cfg.attention == "tpa_kvonly":
            o = flashtpa.flashtpa_decode_plain_q(self.query(x, rope)[:, 0], *kv, **kw)
        else:
            a_q, b_q = self._a(x, "q")[:, 0], self._b(x, "q", rope)[:, 0]
            if cfg.decode_impl == "pallas":
                o = flashtpa_decode_pallas(a_q, b_q, *kv, q_rank=cfg.q_rank, **kw,
                                           interpret=jax.default_backend() == "cpu")
            else:
                o = flashtpa.flashtpa_decode(a_q, b_q, *kv, q_rank=cfg.q_rank, **kw)
        return project_out(cfg, o[:, None].astype(x.dtype), self.w_o, self.out_norm)

    def __call__(self, x_BTM, rope, mask_BTS, cache=None, key_rope=None, start=None):
        """Full attention (cache None) or cached prefill/decode: the new tokens' items are written
        into ``cache`` at ``start`` and attention reads the whole cache.  Returns (out, cache)."""
        cfg = self.cfg
        items = self.kv_items(x_BTM, rope)
        if cache is not None:
            cache = write_cache(cache, items, start)
            if x_BTM.shape[1] == 1 and cfg.decode_impl != "materialize":
                return self.flash_decode(x_BTM, rope, key_rope, cache, start + 1), cache
            items = cache
        else:
            key_rope = rope
        s = mask_BTS.shape[-1]
        f = self.kv_factors(items, key_rope, x_BTM.shape[0], s)
        k = self.contract(f["a_k"], f["b_k"], cfg.k_rank)
        v = self.contract(f["a_v"], f["b_v"], cfg.v_rank)
        o = attend(self.query(x_BTM, rope), k, v, scale=cfg.attn_scale, mask_BTS=mask_BTS)
        return project_out(cfg, o, self.w_o, self.out_norm), cache
