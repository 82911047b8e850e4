"""Tensor Product Attention (paper eqs. 3.1-3.3) and its variants (App. C and G): the TPA module,
its factors, what its decode cache holds, and its one-token decode from that cache (FlashTPA).

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

Rank letters follow the factor (P = R_Q, R = R_K, U = R_V); a B factor's feature axis is D for
Q and K, E for V, and X = d_b in third order, whose c factor has length J = d_c.
"""
from __future__ import annotations

import math
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from ...config import ModelConfig
from ...parallel import constrain
from ..layers import cast, param, uniform_init
from ..rope import Rope, apply_rope
from . import flashtpa
from .context import context_size, sharded_cache_attention, varying
from .core import AttentionMask, CacheLeaf, is_paged, output_params, project_out, read_cache, write_cache
from .flashtpa_paged import flashtpa_decode_paged
from .dispatch import attention_items
from .kernels import flashtpa_decode_paged_pallas, flashtpa_decode_pallas
from .quant import SCALE_SUFFIX, as_stored, dequantize, is_quantized, scale_name

RANK_LETTER = {"q": "p", "k": "r", "v": "u"}  # P = R_Q, R = R_K, U = R_V


def _xavier_bound(fan_in: int, fan_out: int) -> float:
    return math.sqrt(6.0 / (fan_in + fan_out))


def _feature_letter(cfg: ModelConfig, n: str) -> str:
    """Letter of factor n's B feature axis: X (third order), else D for Q and K, E for V."""
    return "x" if cfg.tpa_order == 3 else ("e" if n == "v" else "d")


def contract(n: str, a: jax.Array, b: jax.Array, rank: int) -> jax.Array:
    """(1/R) A^T B per position (eq. 3.1) for factor n of rank R: Q [B, T, H, D] from a [B, T, P, H]
    and b [B, T, P, D]; K [B, S, H, D] from [B, S, R, H] and [B, S, R, D]; V [B, S, H, E] likewise with U."""
    spec = {"q": "btph,btpd->bthd", "k": "bsrh,bsrd->bshd", "v": "bsuh,bsue->bshe"}[n]
    return jnp.einsum(spec, a, b) / rank


class TPAttention(nn.Module):
    """TPA or TPA-KVonly with the variants ``cfg`` selects (see the module docstring)."""

    cfg: ModelConfig

    @staticmethod
    def cache_spec(cfg: ModelConfig) -> dict[str, CacheLeaf]:
        """Per token and layer, the contextual K/V factors (never K or V): A_K [R, H] and A_V [U, H]
        (contextual A); B_K [R, d_b] pre-rotated (eq. 3.5) and B_V [U, d_b], or one unrotated
        B_KV [R, d_b] when shared (contextual B); third order adds c_K [R, d_c] and c_V [U, d_c]."""
        ranks = {"k": cfg.k_rank, "v": cfg.v_rank}
        spec = {}
        if cfg.contextual_a:
            for n, r in ranks.items():
                spec[f"a_{n}"] = CacheLeaf((r, cfg.n_head), ("rank", "heads"))
        if cfg.contextual_b:
            owners = {"kv": cfg.k_rank} if cfg.shared_kv_b else ranks
            for n, r in owners.items():
                spec[f"b_{n}"] = CacheLeaf((r, cfg.b_dim), ("rank", "factor_dim"))
        if cfg.tpa_order == 3:
            for n, r in ranks.items():
                spec[f"c_{n}"] = CacheLeaf((r, cfg.tpa_c_dim), ("rank", "factor_dim"))
        return spec

    @staticmethod
    def reads_pages(cfg: ModelConfig) -> bool:
        """Whether FlashTPA decoding reads a paged cache page by page: when every factor it uses is
        stored as it is used (contextual A and B, second order, B_K and B_V apart).  The other variants
        read each sequence's pages gathered into rows (``core.read_cache``)."""
        return cfg.contextual_a and cfg.contextual_b and not cfg.shared_kv_b and cfg.tpa_order == 2

    def setup(self) -> None:
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
                b_w[n] = param(self, f"w_b{n}", uniform_init(bound), (m, r, db), ("embed", "rank", "factor_dim"))
            else:
                b_w[n] = param(self, f"b_{n}", uniform_init(_xavier_bound(r, db)), (r, db), ("rank", "factor_dim"))
            if cfg.tpa_order == 3:
                dc = cfg.tpa_c_dim
                bound = _xavier_bound(r * dc, m * dc) if official else _xavier_bound(m, r * dc)
                c_w[n] = param(self, f"w_c{n}", uniform_init(bound), (m, r, dc), ("embed", "rank", "factor_dim"))
        self.a_w, self.b_w, self.c_w = a_w, b_w, c_w
        self.w_o, self.out_norm = output_params(self)

    # ---------------------------------------------------------------- factors of one tensor n in {q, k, v}
    def _act(self, a: jax.Array) -> jax.Array:
        cfg = self.cfg
        if cfg.head_factor_activation == "sigmoid":
            return jax.nn.sigmoid(a)
        if cfg.head_factor_activation == "softmax":
            return jax.nn.softmax(a.astype(jnp.float32), axis=-1).astype(a.dtype)
        return a

    def _a(self, x_BTM: jax.Array, n: str) -> jax.Array:
        """Head-dimension factor A of tensor n: [B, T, P|R|U, H] ([1, 1, ., H] when non-contextual)."""
        cfg = self.cfg
        w = cast(self.a_w[n], cfg)
        if not cfg.contextual_a:
            return self._act(w[None, None])
        r = RANK_LETTER[n]
        return self._act(constrain(jnp.einsum(f"btm,m{r}h->bt{r}h", x_BTM, w), ("batch", "length", "rank", "heads")))

    def _b_raw(self, x_BTM: jax.Array, n: str) -> jax.Array:
        """B of tensor n before RoPE, [B, T, P|R|U, d_b] (a broadcast constant when non-contextual)."""
        cfg = self.cfg
        w = cast(self.b_w[n], cfg)
        if not cfg.contextual_b:
            return jnp.broadcast_to(w[None, None], (x_BTM.shape[0], x_BTM.shape[1]) + w.shape)
        r, f = RANK_LETTER[n], _feature_letter(cfg, n)
        return constrain(jnp.einsum(f"btm,m{r}{f}->bt{r}{f}", x_BTM, w), ("batch", "length", "rank", "factor_dim"))

    def _c(self, x_BTM: jax.Array, n: str) -> jax.Array:
        """Third-order c factor of tensor n, [B, T, P|R|U, J]."""
        r = RANK_LETTER[n]
        c = jnp.einsum(f"btm,m{r}j->bt{r}j", x_BTM, cast(self.c_w[n], self.cfg))
        return constrain(c, ("batch", "length", "rank", "factor_dim"))

    @staticmethod
    def vec_bc(n: str, b: jax.Array, c: jax.Array) -> jax.Array:
        """Third order: vec(b (x) c) of b [B, T, ., X] and c [B, T, ., J] stacks the columns of
        b c^T, so entry j * d_b + i (Thm C.1): [B, T, ., X J]."""
        r = RANK_LETTER[n]
        return jnp.einsum(f"bt{r}j,bt{r}x->bt{r}jx", c, b).reshape(*b.shape[:3], -1)

    def _b(self, x_BTM: jax.Array, n: str, rope: Optional[Rope]) -> jax.Array:
        """Token-dimension factor B of tensor n, [B, T, P|R|U, D], RoPE'd when ``rope`` is given
        (RoPE on b, then vec in third order)."""
        b = self._b_raw(x_BTM, n)
        if rope is not None:
            b = apply_rope(b, *rope)
        return self.vec_bc(n, b, self._c(x_BTM, n)) if self.cfg.tpa_order == 3 else b

    # ---------------------------------------------------------------- what a decode cache holds
    def kv_items(self, x_BTM: jax.Array, rope: Rope) -> dict[str, jax.Array]:
        """The leaves of ``cache_spec`` for T new tokens, each [B, T, *per-token shape]: a_k, a_v,
        b_k pre-rotated (eq. 3.5) and b_v, or one unrotated b_kv when shared; third order c_k, c_v."""
        cfg = self.cfg
        x_BTM = cast(x_BTM, cfg)
        items = {}
        if cfg.contextual_a:
            items["a_k"], items["a_v"] = self._a(x_BTM, "k"), self._a(x_BTM, "v")
        if cfg.contextual_b:
            if cfg.shared_kv_b:
                items["b_kv"] = self._b_raw(x_BTM, "k")
            else:
                items["b_k"] = apply_rope(self._b_raw(x_BTM, "k"), *rope)
                items["b_v"] = self._b_raw(x_BTM, "v")
        if cfg.tpa_order == 3:
            items["c_k"], items["c_v"] = self._c(x_BTM, "k"), self._c(x_BTM, "v")
        return items

    def kv_factors(self, items: dict[str, jax.Array], key_rope: Rope, batch: int, length: int,
                   keep_int8: bool = False) -> dict[str, jax.Array]:
        """Full K/V factors over ``length`` key positions from cached items: a_k [B, S, R, H],
        b_k [B, S, R, D] (rotated), a_v [B, S, U, H], b_v [B, S, U, E].  Items of an int8 cache are
        dequantised, except with ``keep_int8`` the factors read from the cache as they are (contextual
        A; contextual, unshared second-order B), which stay int8 beside their scale ``<factor>_scale``
        [B, S, rank] for FlashTPA to dequantise block by block."""
        cfg = self.cfg
        f = {}
        if is_quantized(items):
            keep = {"a_k", "a_v"} if keep_int8 and cfg.contextual_a else set()
            if keep_int8 and cfg.contextual_b and not cfg.shared_kv_b and cfg.tpa_order == 2:
                keep |= {"b_k", "b_v"}
            f = {scale_name(name): items[scale_name(name)] for name in keep}
            items = {name: x if name in keep else dequantize(x, items[scale_name(name)], cfg.compute_dtype)
                     for name, x in items.items() if not name.endswith(SCALE_SUFFIX)}
        for n in ("k", "v"):
            if cfg.contextual_a:
                f[f"a_{n}"] = items[f"a_{n}"]
            else:
                w = self._act(cast(varying(self.a_w[n]), cfg))  # varying: see context.varying
                f[f"a_{n}"] = jnp.broadcast_to(w[None, None], (batch, length) + w.shape)
            if not cfg.contextual_b:  # learned constant (one shared by K and V with shared_kv_b)
                w = cast(varying(self.b_w["k" if cfg.shared_kv_b else n]), cfg)
                b = jnp.broadcast_to(w[None, None], (batch, length) + w.shape)
            else:
                b = items["b_kv"] if cfg.shared_kv_b else items[f"b_{n}"]
            if n == "k" and (cfg.shared_kv_b or not cfg.contextual_b):
                b = apply_rope(b, *key_rope)  # these are not stored pre-rotated
            if cfg.tpa_order == 3:
                b = self.vec_bc(n, b, items[f"c_{n}"])
            f[f"b_{n}"] = b
        return f

    def factors(self, x_BTM: jax.Array, rope: Rope) -> dict[str, jax.Array]:
        """All factors of one layer for T tokens: a_q, b_q (TPA only), a_k, b_k (rotated), a_v, b_v."""
        cfg = self.cfg
        x_BTM = cast(x_BTM, cfg)
        f = self.kv_factors(self.kv_items(x_BTM, rope), rope, x_BTM.shape[0], x_BTM.shape[1])
        if cfg.attention == "tpa":
            f["a_q"], f["b_q"] = self._a(x_BTM, "q"), self._b(x_BTM, "q", rope)
        return f

    def query(self, x_BTM: jax.Array, rope: Rope) -> jax.Array:
        """The RoPE'd query [B, T, H, D]: contracted factors (TPA) or the plain projection (KVonly)."""
        cfg = self.cfg
        x_BTM = cast(x_BTM, cfg)
        if cfg.attention == "tpa":
            return contract("q", self._a(x_BTM, "q"), self._b(x_BTM, "q", rope), cfg.q_rank)
        return apply_rope(jnp.einsum("btm,mhd->bthd", x_BTM, cast(self.w_q, cfg)), *rope)

    # ---------------------------------------------------------------- attention
    def flash_attention(self, x_BTM: jax.Array, rope: Rope, key_rope: Rope, cache: dict[str, jax.Array],
                        start_B: jax.Array, new_items: Optional[dict[str, jax.Array]] = None,
                        page_table: Optional[jax.Array] = None) -> jax.Array:
        """Cached attention straight from the factor cache (FlashTPA): K and V are never formed.  The
        T new tokens (already written at rows ``start_B``) sit at positions ``start_B + 0..T-1`` and
        see the cache rows ``< start_B + T``.  One token: decoding (paper Alg. 2, or its Pallas
        kernel); several: the causal prefill of Alg. 1 over query tiles and key blocks.  ``new_items``
        (one-token FlashTPA decoding): the cache holds the rows before the token, whose own items
        come separately (``core.LayerCache``: the cache is written after it is read).  ``page_table``
        (one-token decoding of a paged cache whose factors are stored as they are used, see
        :meth:`reads_pages`): ``cache`` is the layer's page pool, read page by page."""
        cfg = self.cfg
        x_BTM = cast(x_BTM, cfg)
        batch, t = x_BTM.shape[:2]
        s = jax.tree_util.tree_leaves(cache)[0].shape[1]
        f = self.kv_factors(cache, key_rope, batch, s, keep_int8=context_size() == 1)
        kv = (f["a_k"], f["b_k"], f["a_v"], f["b_v"])
        kw = dict(k_rank=cfg.k_rank, v_rank=cfg.v_rank, scale=cfg.attn_scale, block_size=cfg.decode_block_size)
        scales = tuple(f.get(scale_name(n)) for n in ("a_k", "b_k", "a_v", "b_v"))
        if any(x is not None for x in scales):  # an int8 cache: its blocks dequantised as they are read
            kw["scales"] = scales
        plain_q = cfg.attention == "tpa_kvonly"
        if context_size() > 1:  # the cache's length axis is split over devices: merge per-shard partials
            if plain_q:
                queries = {"b_q": self.query(x_BTM, rope)}
            else:
                a_q_BTPH = self._a(x_BTM, "q")
                queries = {"a_q": jnp.broadcast_to(a_q_BTPH, (batch, t) + a_q_BTPH.shape[2:]),
                           "b_q": self._b(x_BTM, "q", rope)}

            def partial(q, it, q_pos_BT, kv_len_B):
                return flashtpa.flashtpa_partial(q.get("a_q"), q["b_q"], it["a_k"], it["b_k"], it["a_v"], it["b_v"],
                                                 q_pos_BT, kv_len_B, q_rank=cfg.q_rank, **kw)
            o_BTHE = sharded_cache_attention(queries, f, start_B, partial)
            return project_out(cfg, o_BTHE.astype(x_BTM.dtype), self.w_o, self.out_norm)
        if t > 1:
            span = dict(q_positions_BT=start_B[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :],
                        kv_lengths_B=start_B + t, q_block_size=cfg.prefill_q_block_size)
            if plain_q:
                o_BTHE = flashtpa.flashtpa_prefill_plain_q(self.query(x_BTM, rope), *kv, **kw, **span)
            else:
                a_q_BTPH = self._a(x_BTM, "q")  # [1, 1, P, H] when non-contextual
                a_q_BTPH = jnp.broadcast_to(a_q_BTPH, (batch, t) + a_q_BTPH.shape[2:])
                o_BTHE = flashtpa.flashtpa_prefill(a_q_BTPH, self._b(x_BTM, "q", rope), *kv, q_rank=cfg.q_rank,
                                                   **kw, **span)
            return project_out(cfg, o_BTHE.astype(x_BTM.dtype), self.w_o, self.out_norm)
        lengths_B = start_B + 1
        if new_items is not None:  # the token's own factors, RoPE'd at its position
            f_new = self.kv_factors(new_items, rope, batch, 1)
            kw["new_kv"] = tuple(f_new[n][:, 0] for n in ("a_k", "b_k", "a_v", "b_v"))
            kw["finite_rows"] = True  # the model's caches: zero-initialised, written only with its own factors
        if page_table is not None:
            a_q_BPH = None if plain_q else self._a(x_BTM, "q")[:, 0]
            b_q_BPD = self.query(x_BTM, rope)[:, 0] if plain_q else self._b(x_BTM, "q", rope)[:, 0]
            paged = (flashtpa_decode_paged_pallas if cfg.decode_impl == "pallas" and not plain_q
                     else flashtpa_decode_paged)  # Pallas: the page table scalar-prefetched
            o_BHE = paged(a_q_BPH, b_q_BPD, *kv, page_table, lengths_B, q_rank=cfg.q_rank, k_rank=cfg.k_rank,
                          v_rank=cfg.v_rank, scale=cfg.attn_scale, new_kv=kw.get("new_kv"), scales=kw.get("scales"))
        elif plain_q:
            o_BHE = flashtpa.flashtpa_decode_plain_q(self.query(x_BTM, rope)[:, 0], *kv, lengths_B, **kw)
        else:
            a_q_BPH, b_q_BPD = self._a(x_BTM, "q")[:, 0], self._b(x_BTM, "q", rope)[:, 0]
            if cfg.decode_impl == "pallas":  # Mosaic on TPU, the interpreter on CPU, jnp FlashTPA elsewhere
                kw.pop("finite_rows", None)  # the kernel masks every row past a length itself
                o_BHE = flashtpa_decode_pallas(a_q_BPH, b_q_BPD, *kv, lengths_B, q_rank=cfg.q_rank, **kw)
            else:
                o_BHE = flashtpa.flashtpa_decode(a_q_BPH, b_q_BPD, *kv, lengths_B, q_rank=cfg.q_rank, **kw)
        return project_out(cfg, o_BHE[:, None].astype(x_BTM.dtype), self.w_o, self.out_norm)

    def __call__(self, x_BTM: jax.Array, rope: Rope, mask: AttentionMask, cache: Optional[dict[str, jax.Array]] = None,
                 key_rope: Optional[Rope] = None, start_B: Optional[jax.Array] = None,
                 ) -> tuple[jax.Array, Optional[dict[str, jax.Array]]]:
        """Full attention (cache None) or cached prefill/decode: the new tokens' items are written
        into ``cache`` at rows ``start_B`` and attention reads the whole cache -- from the factors
        (:meth:`flash_attention`) unless ``decode_impl="materialize"``, which rebuilds K and V.
        Returns (out [B, T, M], cache)."""
        cfg = self.cfg
        items = self.kv_items(x_BTM, rope)
        one_token = x_BTM.shape[1] == 1 and cfg.decode_impl in ("flash", "pallas") and context_size() == 1
        if cache is not None and one_token:  # Alg. 2: read the rows, then write the token (in place)
            paged = is_paged(cache) and self.reads_pages(cfg)
            rows, pages = cache.pages() if paged else (read_cache(cache), None)
            new = as_stored(items, rows, cfg.compute_dtype)  # as the cache will hold them
            o_BTM = self.flash_attention(x_BTM, rope, key_rope, rows, start_B, new_items=new, page_table=pages)
            return o_BTM, write_cache(cache, items, start_B)
        if cache is not None:
            cache = write_cache(cache, items, start_B)
            items = read_cache(cache)
            if cfg.decode_impl != "materialize":  # decode (Alg. 2) or prefill (Alg. 1) from the factors
                return self.flash_attention(x_BTM, rope, key_rope, items, start_B), cache
        else:
            key_rope = rope
        o_BTHE = attention_items(cfg, self.query(x_BTM, rope), items, self.keys_values, key_rope, mask,
                                 key_rope_travels=cfg.shared_kv_b or not cfg.contextual_b)
        return project_out(cfg, o_BTHE, self.w_o, self.out_norm), cache

    def keys_values(self, items: dict[str, jax.Array], key_rope: Rope, batch: int, length: int
                    ) -> tuple[jax.Array, jax.Array]:
        """K [B, S, H, D] and V [B, S, H, E] of ``length`` keys rebuilt from their cached items (eq. 3.1)."""
        cfg = self.cfg
        f = self.kv_factors(items, key_rope, batch, length)
        return contract("k", f["a_k"], f["b_k"], cfg.k_rank), contract("v", f["a_v"], f["b_v"], cfg.v_rank)
