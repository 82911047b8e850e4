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
from .core import attend, output_params, project_out


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
    def _a(self, x, n: str):
        """Head-dimension factor A, [B, T, R, H] (or [1, 1, R, H] when non-contextual)."""
        cfg = self.cfg
        w = cast(self.a_w[n], cfg)
        a = jnp.einsum("btm,mrh->btrh", x, w) if cfg.contextual_a else w[None, None]
        if cfg.head_factor_activation == "sigmoid":
            a = jax.nn.sigmoid(a)
        elif cfg.head_factor_activation == "softmax":
            a = jax.nn.softmax(a.astype(jnp.float32), axis=-1).astype(a.dtype)
        return a

    def _b(self, x, n: str, rope):
        """Token-dimension factor B, [B, T, R, d_h], RoPE'd when ``rope`` is given.

        Third order: B = vec(b (x) c) with RoPE on b (Theorem C.1); vec stacks columns, so the
        d_h index is j * d_b + i for c index j and b index i.
        """
        cfg = self.cfg
        w = cast(self.b_w[n], cfg)
        if cfg.contextual_b:
            b = jnp.einsum("btm,mrd->btrd", x, w)
        else:
            b = jnp.broadcast_to(w[None, None], (x.shape[0], x.shape[1]) + w.shape)
        if rope is not None:
            b = apply_rope(b, *rope)
        if cfg.tpa_order == 3:
            c = jnp.einsum("btm,mrc->btrc", x, cast(self.c_w[n], cfg))
            b = jnp.einsum("btrc,btrd->btrcd", c, b).reshape(*b.shape[:3], c.shape[-1] * b.shape[-1])
        return b

    @staticmethod
    def contract(a_BTRH, b_BTRD, rank: int):
        """(1/R) A^T B per token: [B, T, H, D]  (eq. 3.1)."""
        return jnp.einsum("btrh,btrd->bthd", a_BTRH, b_BTRD) / rank

    def factors(self, x, rope):
        """All factors of one layer: a_q/b_q (TPA only), a_k, b_k (pre-rotated, eq. 3.5), a_v, b_v."""
        cfg = self.cfg
        x = cast(x, cfg)
        f = {}
        if cfg.attention == "tpa":
            f["a_q"], f["b_q"] = self._a(x, "q"), self._b(x, "q", rope)
        f["a_k"], f["a_v"] = self._a(x, "k"), self._a(x, "v")
        if cfg.shared_kv_b:  # one factor; K sees it rotated, V as is
            f["b_v"] = self._b(x, "k", None)
            f["b_k"] = apply_rope(f["b_v"], *rope)
        else:
            f["b_k"], f["b_v"] = self._b(x, "k", rope), self._b(x, "v", None)
        return f

    def query(self, x, f, rope):
        cfg = self.cfg
        if cfg.attention == "tpa":
            return self.contract(f["a_q"], f["b_q"], cfg.q_rank)
        return apply_rope(jnp.einsum("btm,mhd->bthd", cast(x, cfg), cast(self.w_q, cfg)), *rope)

    def __call__(self, x_BTM, rope, mask_BTS):
        cfg = self.cfg
        f = self.factors(x_BTM, rope)
        q = self.query(x_BTM, f, rope)
        k = self.contract(f["a_k"], f["b_k"], cfg.k_rank)
        v = self.contract(f["a_v"], f["b_v"], cfg.v_rank)
        o = attend(q, k, v, scale=cfg.attn_scale, mask_BTS=mask_BTS)
        return project_out(cfg, o, self.w_o, self.out_norm)
