"""FlashTPA: TPA attention computed from the factors, never forming Q, K or V (paper App. A, B):
decoding (Alg. 2) and causal prefill (Alg. 1) with a blocked float32 online softmax.

Factor layout (as ``tpa_jax.model.attention.tpa`` produces them; B_Q and B_K already RoPE-rotated):

    a_q [B, T, P, H]  b_q [B, T, P, D]     Q[t, h, :] = (1/R_Q) sum_p a_q[t, p, h] b_q[t, p, :]
    a_k [B, S, R, H]  b_k [B, S, R, D]     K likewise with 1/R_K
    a_v [B, S, U, H]  b_v [B, S, U, E]     V likewise with 1/R_V

Masking is the model's one rule (``core.attention_mask``): key position ``s`` is visible to a query
at position ``p`` of sequence ``b`` iff ``s <= p and s < kv_lengths[b]`` (eq. A.2's ``mask``).

Two entry points:

* :func:`flashtpa_decode` -- Algorithm 2 (FlashTPA decoding, general ranks, masked, online LSE)
  for one query token per sequence against a factor cache (:func:`flashtpa_decode_plain_q`: the
  same for TPA-KVonly's plain query).
* :func:`flashtpa_prefill` -- Algorithm 1 (specialised TPA, causal) for T query tokens, blocked
  over key positions (and over query tiles) with the same online softmax.  It accepts a cache
  that already holds earlier positions (chunked prefill): pass ``q_positions_BT`` and ``kv_lengths_B``
  (:func:`flashtpa_prefill_plain_q`: the same for TPA-KVonly's plain query).

Per block of key positions both algorithms do (paper Alg. 2, steps 1-5):

1. head-shared feature dots   F[t, s, p, r] = <b_q[t, p, :], b_k[s, r, :]>           (over D)
2. per-head rank mixing       L[h, t, s]    = c * sum_{p,r} a_q[t, p, h] a_k[s, r, h] F[t, s, p, r]
                              with c = scale / (R_Q R_K) folded into a_q once (App. A: the rank
                              scalings may be absorbed into the factors)
3. mask, online softmax       running max m, running sum l, float32
4. value aggregation          w[h, t, s, u] = prob[h, t, s] a_v[s, u, h]   (Alg. 3 step 25: p (.) a_V)
                              y[h, t, :]   += sum_{s,u} w[h, t, s, u] b_v[s, u, :]  (Alg. 3 step 26)
5. at the end                 o = (1/R_V) y / l   (Alg. 2 step 17)

The online update is written FlashAttention-2 style (block probabilities taken relative to the
new running max); Alg. 2 steps 10-15 take them relative to the block max and rescale the block
term instead -- the same numbers.

Blocks are fixed-size slices of the cache read with ``dynamic_slice``; the last block's start is
clamped to ``S - block`` and the positions it shares with the previous block are masked, so a cache
length that is not a multiple of the block size needs no padded copy of the cache.  Loops run only
over the blocks that some sequence can see (``ceil(max visible length / block)``), so a cache
allocated for ``max_len`` costs only what is filled.  Cache rows past a sequence's length may hold
anything (even NaN): their logits are masked and their value factors zeroed before use.

An int8 factor cache (``tpa_jax.model.attention.quant``) comes as int8 factors plus ``scales``
(a float32 [B, S, rank] per factor, None for a float one): the block loop dequantises each block
it reads, and the one-pass decode runs piece by piece (:func:`_one_pass_pieces`), so no float copy
of the whole cache is made.

All statistics (logits, max, sum, accumulator) are float32; inputs may be bfloat16.  The output
has the dtype the value factors promote to.  The functions are jitted with their keyword sizes
static; calling them inside another ``jit`` inlines them.
"""
from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax

from .blocked import varying_like
from .core import attention_mask, block_rows, filled_BS, merge_parts, row_softmax
from .quant import dequantize

__all__ = ["flashtpa_decode", "flashtpa_decode_plain_q", "flashtpa_prefill", "flashtpa_prefill_plain_q"]

_F32 = jnp.float32
_STATIC = ("q_rank", "k_rank", "v_rank", "scale")


def _cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def _out_dtype(a_v: jax.Array, b_v: jax.Array) -> jnp.dtype:
    """The output's dtype: what the value factors promote to (float32 for an int8 cache's)."""
    dtype = jnp.result_type(a_v, b_v)
    return dtype if jnp.issubdtype(dtype, jnp.floating) else jnp.dtype(_F32)


def _positions_and_lengths(q_positions_BT: Optional[jax.Array], kv_lengths_B: Optional[jax.Array], batch: int,
                           t: int, s: int) -> tuple[jax.Array, jax.Array]:
    """Defaults: queries at 0..T-1, every cache row filled.  Returns int32 [B, T] and [B]."""
    if q_positions_BT is None:
        q_positions_BT = jnp.arange(t, dtype=jnp.int32)
    q_positions_BT = jnp.broadcast_to(jnp.asarray(q_positions_BT, jnp.int32), (batch, t))
    if kv_lengths_B is None:
        kv_lengths_B = jnp.full((batch,), s, jnp.int32)
    kv_lengths_B = jnp.broadcast_to(jnp.asarray(kv_lengths_B, jnp.int32), (batch,))
    return q_positions_BT, kv_lengths_B


# ----------------------------------------------------------------------------- blocked core
def _blocked_attention(a_q_BTPH: Optional[jax.Array], b_q_BTPD: jax.Array, a_k_BSRH: jax.Array, b_k_BSRD: jax.Array,
                       a_v_BSUH: jax.Array, b_v_BSUE: jax.Array, q_positions_BT: jax.Array, kv_lengths_B: jax.Array,
                       *, coef: float, v_rank: int, block: int, with_lse: bool = False,
                       scales: Optional[tuple] = None, pages: Optional[jax.Array] = None):
    """Algorithms 1/2 for one tile of T queries; ``coef`` = scale / (R_Q R_K).  Returns o [B, T, H, E] float32
    (and with ``with_lse`` the log-sum-exp of the logits, [B, T, H], -inf for a row that sees nothing).

    TPA-KVonly passes ``a_q_BTPH=None`` and its plain query [B, T, H, D] as ``b_q_BTPD``, with
    ``coef`` = scale / R_K.  ``scales``: an int8 cache's (see the module docstring), each block dequantised.
    ``pages``: the factors are a paged pool [N, page_size, ...], ``block`` a multiple of page_size, and block i of
    row b its pages ``pages[b, i k .. i k + k - 1]`` (k = block / page_size; J a multiple of k).
    """
    plain_q = a_q_BTPH is None
    batch, t = b_q_BTPD.shape[:2]
    h = a_k_BSRH.shape[-1]
    s_len = a_k_BSRH.shape[1] * (1 if pages is None else pages.shape[1])
    e = b_v_BSUE.shape[-1]
    if plain_q:
        q_BTHD = b_q_BTPD.astype(_F32) * coef
    else:
        a_q_BTPH = a_q_BTPH.astype(_F32) * coef  # rank and softmax scales absorbed into A_Q (App. A.3)

    # keys any query of this tile may see: s <= max position and s < max length
    visible = jnp.minimum(jnp.max(q_positions_BT) + 1, jnp.max(kv_lengths_B))
    n_blocks = _cdiv(jnp.clip(visible, 0, s_len), block)
    offsets_S = jnp.arange(block, dtype=jnp.int32)

    def body(i: jax.Array, carry: tuple[jax.Array, jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array, jax.Array]:
        m_BHT, l_BHT, acc_BHTE = carry
        nominal = i * block
        start = jnp.minimum(nominal, s_len - block)  # clamped last block: no padded copy
        take = ((lambda x: lax.dynamic_slice_in_dim(x, start, block, axis=1)) if pages is None
                else (lambda x: block_rows(x, pages, i, block // x.shape[1])))
        a_k, b_k, a_v, b_v = _dequantized(take, (a_k_BSRH, b_k_BSRD, a_v_BSUH, b_v_BSUE), scales)
        key_positions_S = start + offsets_S
        new_S = key_positions_S >= nominal  # not already covered by the previous block
        valid_BTS = attention_mask(q_positions_BT, kv_lengths_B, key_positions_S) & new_S[None, None, :]
        rows_BS = filled_BS(kv_lengths_B, key_positions_S) & new_S[None, :]

        # (1) head-shared feature dots, (2) per-head rank mixing (Alg. 2 steps 5-7; the
        # contraction order is Alg. 3's S1 = b_K B_Q, S2 = S1 A_Q, S3 = S2 (.) a_K)
        if plain_q:  # per-head query against the key factors: q_h . b_k[s, r], mixed by a_k[s, r, h]
            mixed_BTSRH = jnp.einsum("bthd,bsrd->btsrh", q_BTHD, b_k.astype(_F32))
        else:
            feat_BTSPR = jnp.einsum("btpd,bsrd->btspr", b_q_BTPD, b_k, preferred_element_type=_F32)
            mixed_BTSRH = jnp.einsum("btspr,btph->btsrh", feat_BTSPR, a_q_BTPH)
        logits_BHTS = jnp.einsum("btsrh,bsrh->bhts", mixed_BTSRH, a_k.astype(_F32))
        logits_BHTS = jnp.where(valid_BTS[:, None], logits_BHTS, -jnp.inf)

        # (3) online softmax
        m_new = jnp.maximum(m_BHT, logits_BHTS.max(-1))
        m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)  # rows with nothing visible yet
        prob_BHTS = jnp.exp(logits_BHTS - m_safe[..., None])  # masked -> 0
        alpha_BHT = jnp.exp(m_BHT - m_safe)
        l_BHT = alpha_BHT * l_BHT + prob_BHTS.sum(-1)

        # (4) value aggregation from the factors: p (.) a_V, then contract (s, u) with b_V
        a_v = jnp.where(rows_BS[:, :, None, None], a_v, 0).astype(_F32)
        b_v = jnp.where(rows_BS[:, :, None, None], b_v, 0).astype(_F32)
        w_BHTSU = jnp.einsum("bhts,bsuh->bhtsu", prob_BHTS, a_v)
        acc_BHTE = alpha_BHT[..., None] * acc_BHTE + jnp.einsum("bhtsu,bsue->bhte", w_BHTSU, b_v)
        return m_new, l_BHT, acc_BHTE

    init = (jnp.full((batch, h, t), -jnp.inf, _F32), jnp.zeros((batch, h, t), _F32),
            jnp.zeros((batch, h, t, e), _F32))
    m_BHT, l_BHT, acc_BHTE = lax.fori_loop(0, n_blocks, body, varying_like((a_k_BSRH,), *init))
    # (5) o = s_V * y / l; rows that saw nothing (l == 0) give 0
    o_BHTE = jnp.where(l_BHT[..., None] > 0, acc_BHTE / jnp.where(l_BHT > 0, l_BHT, 1.0)[..., None], 0.0) / v_rank
    if with_lse:
        lse_BHT = jnp.where(l_BHT > 0, m_BHT + jnp.log(jnp.where(l_BHT > 0, l_BHT, 1.0)), -jnp.inf)
        return o_BHTE.transpose(0, 2, 1, 3), lse_BHT.transpose(0, 2, 1)
    return o_BHTE.transpose(0, 2, 1, 3)


def _dequantized(take, kv: tuple, scales: Optional[tuple]) -> tuple:
    """``take`` (a slice along the rows) of each factor, dequantised where it has a scale."""
    if scales is None:
        return tuple(take(x) for x in kv)
    return tuple(take(x) if sc is None else dequantize(take(x), take(sc)) for x, sc in zip(kv, scales))


def flashtpa_partial(a_q_BTPH: Optional[jax.Array], b_q_BTPD: jax.Array, a_k_BSRH: jax.Array, b_k_BSRD: jax.Array,
                     a_v_BSUH: jax.Array, b_v_BSUE: jax.Array, q_positions_BT: jax.Array, kv_lengths_B: jax.Array,
                     *, q_rank: int, k_rank: int, v_rank: int, scale: float, block_size: int):
    """(o [B, T, H, E] float32, lse [B, T, H]) of T queries against one part of a factor cache (keys at
    rows 0..S-1 of the part; ``q_positions_BT`` and ``kv_lengths_B`` in those rows' coordinates):
    the partial result a cache split over devices merges (``context.sharded_cache_attention``).
    ``a_q_BTPH=None``: TPA-KVonly's plain query [B, T, H, D] as ``b_q_BTPD``."""
    s_len = a_k_BSRH.shape[1]
    coef = scale / (k_rank if a_q_BTPH is None else q_rank * k_rank)
    return _blocked_attention(a_q_BTPH, b_q_BTPD, a_k_BSRH, b_k_BSRD, a_v_BSUH, b_v_BSUE, q_positions_BT,
                              kv_lengths_B, coef=coef, v_rank=v_rank, block=max(1, min(block_size, s_len)),
                              with_lse=True)


ONE_PASS_MAX_ROWS = 2 ** 17  # on a CPU, decode reads up to this many cache rows in one pass
ONE_PASS_PIECES = 8


def _one_pass(a_q_BPH: Optional[jax.Array], b_q_BPD: jax.Array, a_k_BSRH: jax.Array, b_k_BSRD: jax.Array,
              a_v_BSUH: jax.Array, b_v_BSUE: jax.Array, kv_len_B: jax.Array, *, coef: float, v_rank: int,
              finite_rows: bool = False) -> tuple[jax.Array, jax.Array]:
    """Alg. 2 for one query per sequence in one pass over the rows ``s < kv_len_B[b]``: (o [B, H, E]
    float32, lse [B, H]).  The same steps as :func:`_blocked_attention` with the whole cache as one
    block, written so that every contraction streams the rows in their stored [B, S, ...] order
    (GEMMs over S R rows, a fused reduction over R): on a CPU this runs near memory speed where
    the block loop pays per-block overhead and transposes.  ``a_q_BPH=None``: TPA-KVonly's plain
    query [B, H, D] as ``b_q_BPD``.  ``finite_rows``: rows past a length hold finite numbers, so
    their zero probabilities suffice and the value factors need no masked copy."""
    batch, s_len = a_k_BSRH.shape[:2]
    rows_BS = filled_BS(kv_len_B, jnp.arange(s_len, dtype=jnp.int32))
    # the rows split into ONE_PASS_PIECES pieces, a batch axis of every GEMM: XLA's CPU backend runs
    # one long contraction on one thread, independent pieces on all of them
    c = ONE_PASS_PIECES if s_len % ONE_PASS_PIECES == 0 else 1
    split = lambda x: x.reshape(batch, c, s_len // c, *x.shape[2:])
    if a_q_BPH is None:
        mixed_BCSRH = jnp.einsum("bcsrd,bhd->bcsrh", split(b_k_BSRD), b_q_BPD, preferred_element_type=_F32) * coef
    else:  # (1) head-shared feature dots, (2) rank mixing: GEMMs over the S R rows
        feat_BCSRP = jnp.einsum("bcsrd,bpd->bcsrp", split(b_k_BSRD), b_q_BPD, preferred_element_type=_F32)
        mixed_BCSRH = jnp.einsum("bcsrp,bph->bcsrh", feat_BCSRP, a_q_BPH.astype(_F32) * coef)
    logits_BSH = jnp.sum(mixed_BCSRH * split(a_k_BSRH).astype(_F32), axis=3).reshape(batch, s_len, -1)
    p_BSH, l_BH, lse_BH = row_softmax(logits_BSH, rows_BS)  # (3) softmax statistics
    if not finite_rows:  # (4) p (.) a_V, then contract (s, u) with b_V
        keep = rows_BS[:, :, None, None]
        a_v_BSUH, b_v_BSUE = jnp.where(keep, a_v_BSUH, 0), jnp.where(keep, b_v_BSUE, 0)
    w_BSUH = p_BSH[:, :, None, :] * a_v_BSUH.astype(_F32)
    y_BHE = jnp.einsum("bcsuh,bcsue->bhe", split(w_BSUH), split(b_v_BSUE).astype(_F32))
    return y_BHE / (l_BH[..., None] * v_rank), lse_BH  # (5) o = y / (l R_V)


def _one_pass_pieces(a_q_BPH: Optional[jax.Array], b_q_BPD: jax.Array, kv: tuple, scales: tuple,
                     kv_len_B: jax.Array, **kw) -> tuple[jax.Array, jax.Array]:
    """:func:`_one_pass` over an int8 cache: a loop over pieces of the rows (the smallest divisor of S
    that is at least ``min(ONE_PASS_PIECES, S)`` of them), each piece dequantised on its own, the
    pieces' (o, lse) merged by log-sum-exp.  Returns (o [B, H, E], lse [B, H])."""
    s_len = kv[0].shape[1]
    c = next(n for n in range(min(ONE_PASS_PIECES, s_len), s_len + 1) if s_len % n == 0)
    size = s_len // c

    def piece(i: jax.Array) -> tuple[jax.Array, jax.Array]:
        take = lambda x: lax.dynamic_slice_in_dim(x, i * size, size, axis=1)
        return _one_pass(a_q_BPH, b_q_BPD, *_dequantized(take, kv, scales), jnp.clip(kv_len_B - i * size, 0, size),
                         **kw)

    o_CBHE, lse_CBH = lax.map(piece, jnp.arange(c, dtype=jnp.int32))
    m_BH = lse_CBH.max(axis=0)
    w_CBH = jnp.exp(lse_CBH - jnp.where(jnp.isfinite(m_BH), m_BH, 0.0))
    total_BH = w_CBH.sum(axis=0)
    seen = total_BH > 0
    total_BH = jnp.where(seen, total_BH, 1.0)
    o_BHE = jnp.einsum("cbh,cbhe->bhe", w_CBH, o_CBHE) / total_BH[..., None]
    return o_BHE, jnp.where(seen, jnp.where(jnp.isfinite(m_BH), m_BH, 0.0) + jnp.log(total_BH), -jnp.inf)


def _new_token_part(a_q_BPH: Optional[jax.Array], b_q_BPD: jax.Array, new_kv: tuple, *, coef: float, v_rank: int
                    ) -> tuple[jax.Array, jax.Array]:
    """(o, lse) of each query against its own token alone (factors [B, R|U, H|D|E]): o = its V, lse = its logit."""
    a_k, b_k, a_v, b_v = (x.astype(_F32) for x in new_kv)
    if a_q_BPH is None:
        logit_BH = jnp.einsum("brh,brd,bhd->bh", a_k, b_k, b_q_BPD.astype(_F32)) * coef
    else:
        feat_BPR = jnp.einsum("bpd,brd->bpr", b_q_BPD.astype(_F32), b_k)
        logit_BH = jnp.einsum("bpr,bph,brh->bh", feat_BPR, a_q_BPH.astype(_F32) * coef, a_k)
    return jnp.einsum("buh,bue->bhe", a_v, b_v) / v_rank, logit_BH


def _decode(a_q_BPH: Optional[jax.Array], b_q_BPD: jax.Array, kv: tuple, lengths_B: jax.Array,
            new_kv: Optional[tuple], *, coef: float, v_rank: int, block_size: int, finite_rows: bool,
            one_pass: Optional[bool], scales: Optional[tuple] = None, pages: Optional[jax.Array] = None
            ) -> jax.Array:
    """The two decode forms (query at ``lengths - 1``): o [B, H, E] float32.  With ``new_kv`` the cache
    holds the rows before the query's own token, whose factors come separately and join by
    log-sum-exp.  ``one_pass`` None: one pass on a CPU up to :data:`ONE_PASS_MAX_ROWS` rows, otherwise
    the block loop.  ``pages``: ``kv`` is a paged pool read by the block loop, ``block_size`` rows (whole pages)
    per block."""
    s_len = kv[0].shape[1]
    kv_len_B = lengths_B - 1 if new_kv is not None else lengths_B
    if one_pass is None:
        one_pass = jax.default_backend() == "cpu" and s_len <= ONE_PASS_MAX_ROWS
    if one_pass and scales is not None:
        o_BHE, lse_BH = _one_pass_pieces(a_q_BPH, b_q_BPD, kv, scales, kv_len_B, coef=coef, v_rank=v_rank,
                                         finite_rows=finite_rows)
    elif one_pass:
        o_BHE, lse_BH = _one_pass(a_q_BPH, b_q_BPD, *kv, kv_len_B, coef=coef, v_rank=v_rank, finite_rows=finite_rows)
    else:
        a_q = None if a_q_BPH is None else a_q_BPH[:, None]
        o_BTHE, lse_BTH = _blocked_attention(a_q, b_q_BPD[:, None], *kv, (lengths_B - 1)[:, None], kv_len_B,
                                             coef=coef, v_rank=v_rank, block=max(1, min(block_size, s_len)),
                                             with_lse=True, scales=scales, pages=pages)
        o_BHE, lse_BH = o_BTHE[:, 0], lse_BTH[:, 0]
    if new_kv is None:
        return o_BHE
    return merge_parts(o_BHE, lse_BH, *_new_token_part(a_q_BPH, b_q_BPD, new_kv, coef=coef, v_rank=v_rank))[0]


# ----------------------------------------------------------------------------- decode (Alg. 2)
@functools.partial(jax.jit, static_argnames=_STATIC + ("block_size", "finite_rows", "one_pass"))
def flashtpa_decode(a_q_BPH: jax.Array, b_q_BPD: jax.Array, a_k_BSRH: jax.Array, b_k_BSRD: jax.Array,
                    a_v_BSUH: jax.Array, b_v_BSUE: jax.Array, lengths_B: jax.Array, *, q_rank: int, k_rank: int,
                    v_rank: int, scale: float, block_size: int = 256, new_kv: Optional[tuple] = None,
                    finite_rows: bool = False, one_pass: Optional[bool] = None,
                    scales: Optional[tuple] = None) -> jax.Array:
    """FlashTPA decoding (paper Algorithm 2): one query token per sequence against a factor cache.

    b_q (RoPE'd) and b_k (pre-rotated) as in the module docstring; ``lengths_B``: cache rows
    ``< lengths[b]`` are valid (the current token's own K/V included), and the query sits at
    position ``lengths[b] - 1``.  With ``new_kv`` = the current token's (a_k [B, R, H], b_k [B, R, D],
    a_v [B, U, H], b_v [B, U, E]) the cache holds only the rows before it (a decode step that writes
    the token after reading).  ``finite_rows``: the caller promises finite numbers in the rows past a
    length (the model's zero-initialised caches), which lets a CPU skip masking the value factors.
    ``one_pass``: True reads the cache in one pass, False in blocks of ``block_size`` rows, None
    picks (one pass on a CPU up to :data:`ONE_PASS_MAX_ROWS` rows).  ``scales``: an int8 cache's
    (a_k, b_k, a_v, b_v scales [B, S, rank] or None each).  Returns o [B, H, E].
    """
    lengths_B = jnp.asarray(lengths_B, jnp.int32).reshape(-1)
    o_BHE = _decode(a_q_BPH, b_q_BPD, (a_k_BSRH, b_k_BSRD, a_v_BSUH, b_v_BSUE), lengths_B, new_kv,
                    coef=scale / (q_rank * k_rank), v_rank=v_rank, block_size=block_size, finite_rows=finite_rows,
                    one_pass=one_pass, scales=scales)
    return o_BHE.astype(_out_dtype(a_v_BSUH, b_v_BSUE))


@functools.partial(jax.jit, static_argnames=("k_rank", "v_rank", "scale", "block_size", "finite_rows", "one_pass"))
def flashtpa_decode_plain_q(q_BHD: jax.Array, a_k_BSRH: jax.Array, b_k_BSRD: jax.Array, a_v_BSUH: jax.Array,
                            b_v_BSUE: jax.Array, lengths_B: jax.Array, *, k_rank: int, v_rank: int, scale: float,
                            block_size: int = 256, new_kv: Optional[tuple] = None, finite_rows: bool = False,
                            one_pass: Optional[bool] = None, scales: Optional[tuple] = None) -> jax.Array:
    """Algorithm 2 for TPA-KVonly: a plain (RoPE'd) query [B, H, D] against factorised K/V.

    Logits are ``sum_r a_k[s, r, h] <q_h, b_k[s, r]> / R_K``: K is never formed.  Same cache layout,
    masking, online softmax, ``new_kv``, ``finite_rows``, ``one_pass`` and ``scales`` as :func:`flashtpa_decode`;
    returns o [B, H, E].
    """
    lengths_B = jnp.asarray(lengths_B, jnp.int32).reshape(-1)
    o_BHE = _decode(None, q_BHD, (a_k_BSRH, b_k_BSRD, a_v_BSUH, b_v_BSUE), lengths_B, new_kv,
                    coef=scale / k_rank, v_rank=v_rank, block_size=block_size, finite_rows=finite_rows,
                    one_pass=one_pass, scales=scales)
    return o_BHE.astype(_out_dtype(a_v_BSUH, b_v_BSUE))


# ----------------------------------------------------------------------------- prefill (Alg. 1)
@functools.partial(jax.jit, static_argnames=_STATIC + ("block_size", "q_block_size"))
def flashtpa_prefill(a_q_BTPH: jax.Array, b_q_BTPD: jax.Array, a_k_BSRH: jax.Array, b_k_BSRD: jax.Array,
                     a_v_BSUH: jax.Array, b_v_BSUE: jax.Array, *, q_rank: int, k_rank: int, v_rank: int, scale: float,
                     q_positions_BT: Optional[jax.Array] = None, kv_lengths_B: Optional[jax.Array] = None,
                     block_size: int = 128, q_block_size: int = 128, scales: Optional[tuple] = None) -> jax.Array:
    """Specialised causal TPA (paper Algorithm 1) with blocked online softmax, o [B, T, H, E].

    Plain prefill: S == T, defaults ``q_positions_BT = arange(T)``, ``kv_lengths_B = S``.  Chunked
    prefill against a cache that already holds earlier tokens: pass the whole cache (new chunk
    written in), ``q_positions_BT`` the chunk's absolute positions [B, T] (or [T]) and
    ``kv_lengths_B`` the filled length [B].  Rows that see no key at all return zeros.

    Queries are processed in tiles of ``q_block_size`` (``lax.map`` over the Q tiles); each tile
    loops only over the key blocks its causal window reaches, so fully masked blocks above the
    diagonal are skipped.  ``scales``: an int8 cache's, as in :func:`flashtpa_decode`.
    """
    return _prefill_tiles(a_q_BTPH, b_q_BTPD, (a_k_BSRH, b_k_BSRD, a_v_BSUH, b_v_BSUE), q_positions_BT, kv_lengths_B,
                          coef=scale / (q_rank * k_rank), v_rank=v_rank, block_size=block_size,
                          q_block_size=q_block_size, scales=scales)


@functools.partial(jax.jit, static_argnames=("k_rank", "v_rank", "scale", "block_size", "q_block_size"))
def flashtpa_prefill_plain_q(q_BTHD: jax.Array, a_k_BSRH: jax.Array, b_k_BSRD: jax.Array, a_v_BSUH: jax.Array,
                             b_v_BSUE: jax.Array, *, k_rank: int, v_rank: int, scale: float,
                             q_positions_BT: Optional[jax.Array] = None, kv_lengths_B: Optional[jax.Array] = None,
                             block_size: int = 128, q_block_size: int = 128,
                             scales: Optional[tuple] = None) -> jax.Array:
    """Algorithm 1 for TPA-KVonly: a plain (RoPE'd) query [B, T, H, D] against factorised K/V.

    Logits are ``sum_r a_k[s, r, h] <q_h, b_k[s, r]> / R_K`` (K never formed); positions, lengths,
    tiling, the online softmax and ``scales`` as in :func:`flashtpa_prefill`.  Returns o [B, T, H, E].
    """
    return _prefill_tiles(None, q_BTHD, (a_k_BSRH, b_k_BSRD, a_v_BSUH, b_v_BSUE), q_positions_BT, kv_lengths_B,
                          coef=scale / k_rank, v_rank=v_rank, block_size=block_size, q_block_size=q_block_size,
                          scales=scales)


def _prefill_tiles(a_q_BTPH: Optional[jax.Array], b_q_BTPD: jax.Array, kv: tuple, q_positions_BT: Optional[jax.Array],
                   kv_lengths_B: Optional[jax.Array], *, coef: float, v_rank: int, block_size: int,
                   q_block_size: int, scales: Optional[tuple] = None) -> jax.Array:
    """The query-tiled loop of both prefill forms (``a_q_BTPH`` None: ``b_q_BTPD`` is a plain query)."""
    batch, t = b_q_BTPD.shape[:2]
    s_len = kv[0].shape[1]
    q_pos_BT, kv_len_B = _positions_and_lengths(q_positions_BT, kv_lengths_B, batch, t, s_len)
    block = max(1, min(block_size, s_len))
    tq = max(1, min(q_block_size, t))
    n_tiles = _cdiv(t, tq)
    pad = n_tiles * tq - t
    pad_t = lambda x: jnp.pad(x, ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2))
    if pad:  # padded queries sit at position -1: they see nothing and are sliced off
        b_q_BTPD = pad_t(b_q_BTPD)
        a_q_BTPH = None if a_q_BTPH is None else pad_t(a_q_BTPH)
        q_pos_BT = jnp.pad(q_pos_BT, ((0, 0), (0, pad)), constant_values=-1)
    tiles = lambda x: x.reshape(batch, n_tiles, tq, *x.shape[2:]).swapaxes(0, 1)  # [Q, B, T/Q, ...]

    def tile(args: tuple) -> jax.Array:
        b_q, pos = args[:2]
        a_q = args[2] if len(args) > 2 else None
        return _blocked_attention(a_q, b_q, *kv, pos, kv_len_B, coef=coef, v_rank=v_rank, block=block, scales=scales)

    xs = (tiles(b_q_BTPD), tiles(q_pos_BT)) + (() if a_q_BTPH is None else (tiles(a_q_BTPH),))
    o_QBTHE = lax.map(tile, xs)
    o_BTHE = o_QBTHE.swapaxes(0, 1).reshape(batch, n_tiles * tq, *o_QBTHE.shape[3:])[:, :t]
    return o_BTHE.astype(_out_dtype(kv[2], kv[3]))
