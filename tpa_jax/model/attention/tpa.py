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
from .core import attend, output_projection


def _xavier_bound(fan_in: int, fan_out: int) -> float:
    return math.sqrt(6.0 / (fan_in + fan_out))


class TPAttention(nn.Module):
    cfg: ModelConfig

    # ---------------------------------------------------------------- factors
    def _a(self, x, name: str, rank: int):
        """Head-dimension factor A, [B, T, R, H] (or [1, 1, R, H] when non-contextual)."""
        cfg = self.cfg
        m, h = cfg.d_model, cfg.n_head
        if cfg.contextual_a:
            bound = (_xavier_bound(h * rank, m * rank) if cfg.factor_init == "official"
                     else _xavier_bound(m, rank * h))
            w = param(self, f"w_a{name}", uniform_init(bound), (m, rank, h), ("embed", "rank", "heads"))
            a = jnp.einsum("btm,mrh->btrh", x, cast(w, cfg))
        else:
            w = param(self, f"a_{name}", uniform_init(_xavier_bound(rank, h)), (rank, h), ("rank", "heads"))
            a = cast(w, cfg)[None, None]
        if cfg.head_factor_activation == "sigmoid":
            a = jax.nn.sigmoid(a)
        elif cfg.head_factor_activation == "softmax":
            a = jax.nn.softmax(a.astype(jnp.float32), axis=-1).astype(a.dtype)
        return a

    def _b(self, x, name: str, rank: int, rope):
        """Token-dimension factor B, [B, T, R, d_h] (d_h = d_c * d_b for third order), RoPE'd if asked."""
        cfg = self.cfg
        m, db = cfg.d_model, cfg.b_dim
        if cfg.contextual_b:
            bound = (_xavier_bound(rank * db, m * db) if cfg.factor_init == "official"
                     else _xavier_bound(m, rank * db))
            w = param(self, f"w_b{name}", uniform_init(bound), (m, rank, db), ("embed", "rank", "head_dim"))
            b = jnp.einsum("btm,mrd->btrd", x, cast(w, cfg))
        else:
            w = param(self, f"b_{name}", uniform_init(_xavier_bound(rank, db)), (rank, db), ("rank", "head_dim"))
            b = jnp.broadcast_to(cast(w, cfg)[None, None], (x.shape[0], x.shape[1], rank, db))
        return self._finish_b(x, name, rank, b, rope)

    def _finish_b(self, x, name: str, rank: int, b, rope):
        cfg = self.cfg
        if rope is not None:
            b = apply_rope(b, *rope)
        if cfg.tpa_order == 3:
            m, dc = cfg.d_model, cfg.tpa_c_dim
            bound = (_xavier_bound(rank * dc, m * dc) if cfg.factor_init == "official"
                     else _xavier_bound(m, rank * dc))
            w = param(self, f"w_c{name}", uniform_init(bound), (m, rank, dc), ("embed", "rank", "head_dim"))
            c = jnp.einsum("btm,mrc->btrc", x, cast(w, cfg))
            # vec(b (x) c): column-stacking of the d_b x d_c matrix -> index j * d_b + i
            b = jnp.einsum("btrc,btrd->btrcd", c, b).reshape(*b.shape[:3], dc * b.shape[-1])
        return b

    @staticmethod
    def contract(a_BTRH, b_BTRD, rank: int):
        """(1/R) A^T B per token: [B, T, H, D]  (eq. 3.1)."""
        return jnp.einsum("btrh,btrd->bthd", a_BTRH, b_BTRD) / rank

    def factors(self, x, rope):
        """All factors of one layer: dict with a_q/b_q (or q), a_k, b_k (pre-rotated), a_v, b_v."""
        cfg = self.cfg
        out = {}
        if cfg.attention == "tpa":
            out["a_q"] = self._a(x, "q", cfg.q_rank)
            out["b_q"] = self._b(x, "q", cfg.q_rank, rope)
        out["a_k"] = self._a(x, "k", cfg.k_rank)
        out["a_v"] = self._a(x, "v", cfg.v_rank)
        if cfg.shared_kv_b:
            b = self._b(x, "k", cfg.k_rank, None)  # one shared factor, rotated for K only
            out["b_k"] = apply_rope(b, *rope)
            out["b_v"] = b
        else:
            out["b_k"] = self._b(x, "k", cfg.k_rank, rope)
            out["b_v"] = self._b(x, "v", cfg.v_rank, None)
        return out

    def query(self, x, f, rope):
        cfg = self.cfg
        if cfg.attention == "tpa":
            return self.contract(f["a_q"], f["b_q"], cfg.q_rank)
        m, h, d = cfg.d_model, cfg.n_head, cfg.head_dim
        w = param(self, "w_q", uniform_init(_xavier_bound(m, h * d)), (m, h, d), ("embed", "heads", "head_dim"))
        return apply_rope(jnp.einsum("btm,mhd->bthd", x, cast(w, cfg)), *rope)

    @nn.compact
    def __call__(self, x_BTM, rope, mask_BTS):
        cfg = self.cfg
        x = cast(x_BTM, cfg)
        f = self.factors(x, rope)
        q = self.query(x, f, rope)
        k = self.contract(f["a_k"], f["b_k"], cfg.k_rank)
        v = self.contract(f["a_v"], f["b_v"], cfg.v_rank)
        o = attend(q, k, v, scale=cfg.attn_scale, mask_BTS=mask_BTS)
        return output_projection(self, o)
