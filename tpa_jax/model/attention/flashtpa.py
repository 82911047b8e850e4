"""FlashTPA: TPA attention computed from the factors, never forming Q, K or V (paper App. A, B).

Factor layout (as ``tpa_jax.model.attention.tpa`` produces them; B_Q and B_K already RoPE-rotated):

    a_q [B, T, Rq, H]  b_q [B, T, Rq, D]     Q[t, h, :] = (1/Rq) sum_r a_q[t, r, h] b_q[t, r, :]
    a_k [B, S, Rk, H]  b_k [B, S, Rk, D]     K likewise with 1/Rk
    a_v [B, S, Rv, H]  b_v [B, S, Rv, E]     V likewise with 1/Rv

Key position ``s`` is visible to a query at position ``p`` of batch row ``b`` iff
``s <= p and s < kv_lengths[b]`` (causal + padding mask, eq. A.2's ``mask``).

Three entry points:

* :func:`materialized_attention` -- the reference: rebuild Q, K, V, masked softmax attention.
* :func:`flashtpa_decode` -- Algorithm 2 (FlashTPA decoding, general ranks, masked, online LSE)
  for one query token per sequence against a factor cache.
* :func:`flashtpa_prefill` -- Algorithm 1 (specialised TPA, causal) for T query tokens, blocked
  over key positions (and over query tiles) with the same online softmax.  It accepts a cache
  that already holds earlier positions (chunked prefill): pass ``q_positions`` and ``kv_lengths``.

Per block of key positions both algorithms do (paper Alg. 2, steps 1-5):

1. head-shared feature dots   P[t, s, r, k] = <b_q[t, r, :], b_k[s, k, :]>           (over D)
2. per-head rank mixing       L[h, t, s]    = c * sum_{r,k} a_q[t, r, h] a_k[s, k, h] P[t, s, r, k]
                              with c = scale / (Rq Rk) folded into a_q once (App. A: the rank
                              scalings may be absorbed into the factors)
3. mask, online softmax       running max m, running sum l, float32
4. value aggregation          w[h, t, s, u] = p[h, t, s] a_v[s, u, h]   (Alg. 3 step 25: p (.) a_V)
                              y[h, t, :]   += sum_{s,u} w[h, t, s, u] b_v[s, u, :]  (Alg. 3 step 26)
5. at the end                 o = (1/Rv) y / l   (Alg. 2 step 17)

The online update is written FlashAttention-2 style (block probabilities taken relative to the
new running max); Alg. 2 steps 10-15 take them relative to the block max and rescale the block
term instead -- the same numbers.  Einsum letters: b batch, t query, s key position, h head,
d head dim, e value dim, r query rank, k key rank, u value rank.

Blocks are fixed-size slices of the cache read with ``dynamic_slice``; the last block's start is
clamped to ``S - block`` and the positions it shares with the previous block are masked, so a cache
length that is not a multiple of the block size needs no padded copy of the cache.  Loops run only
over the blocks that some sequence can see (``ceil(max visible length / block)``), so a cache
allocated for ``max_len`` costs only what is filled.  Cache rows past a sequence's length may hold
anything (even NaN): their logits are masked and their value factors zeroed before use.

All statistics (logits, max, sum, accumulator) are float32; inputs may be bfloat16.  The output
has the dtype the value factors promote to.  The functions are jitted with their keyword sizes
static; calling them inside another ``jit`` inlines them.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["materialized_attention", "flashtpa_decode", "flashtpa_decode_plain_q", "flashtpa_prefill"]

_F32 = jnp.float32
_STATIC = ("q_rank", "k_rank", "v_rank", "scale")


def _cdiv(a, b):
    return (a + b - 1) // b


def _positions_and_lengths(q_positions, kv_lengths, batch: int, t: int, s: int):
    """Defaults: queries at 0..T-1, every cache row full.  Returns int32 [B, T] and [B]."""
    if q_positions is None:
        q_positions = jnp.arange(t, dtype=jnp.int32)
    q_positions = jnp.broadcast_to(jnp.asarray(q_positions, jnp.int32), (batch, t))
    if kv_lengths is None:
        kv_lengths = jnp.full((batch,), s, jnp.int32)
    kv_lengths = jnp.broadcast_to(jnp.asarray(kv_lengths, jnp.int32), (batch,))
    return q_positions, kv_lengths


def _out_dtype(*xs):
    return jnp.result_type(*xs)


# ----------------------------------------------------------------------------- reference
@functools.partial(jax.jit, static_argnames=_STATIC)
def materialized_attention(a_q, b_q, a_k, b_k, a_v, b_v, *, q_rank: int, k_rank: int, v_rank: int,
                           scale: float, q_positions=None, kv_lengths=None):
    """Reference TPA attention: build Q, K, V from the factors, masked softmax, o [B, T, H, E].

    ``q_positions`` int [B, T] or [T] (default ``arange(T)``), ``kv_lengths`` int [B] (default S).
    Rows that see no key at all return zeros.
    """
    batch, t = a_q.shape[:2]
    s = a_k.shape[1]
    q_pos, kv_len = _positions_and_lengths(q_positions, kv_lengths, batch, t, s)
    hp = lax.Precision.HIGHEST
    q = jnp.einsum("btrh,btrd->bthd", a_q.astype(_F32), b_q.astype(_F32), precision=hp) / q_rank
    k = jnp.einsum("bskh,bskd->bshd", a_k.astype(_F32), b_k.astype(_F32), precision=hp) / k_rank
    v = jnp.einsum("bsuh,bsue->bshe", a_v.astype(_F32), b_v.astype(_F32), precision=hp) / v_rank
    logits = jnp.einsum("bthd,bshd->bhts", q, k, precision=hp) * scale
    key = jnp.arange(s, dtype=jnp.int32)
    mask = (key[None, None, :] <= q_pos[:, :, None]) & (key[None, None, :] < kv_len[:, None, None])  # [B,T,S]
    logits = jnp.where(mask[:, None], logits, -jnp.inf)
    any_visible = mask.any(-1)[:, None, :, None]  # [B,1,T,1]
    probs = jax.nn.softmax(jnp.where(any_visible, logits, 0.0), axis=-1)
    probs = jnp.where(any_visible, probs, 0.0)
    v = jnp.where((key[None, :] < kv_len[:, None])[:, :, None, None], v, 0.0)  # garbage rows never leak
    o = jnp.einsum("bhts,bshe->bthe", probs, v, precision=hp)
    return o.astype(_out_dtype(a_v, b_v))


# ----------------------------------------------------------------------------- blocked core
def _blocked_attention(a_q, b_q, a_k, b_k, a_v, b_v, q_pos, kv_len, *, coef, v_rank: int, block: int):
    """Algorithms 1/2 for one query tile: a_q [B, N, Rq, H], b_q [B, N, Rq, D], q_pos [B, N].

    ``coef`` = scale / (Rq Rk).  Returns o [B, N, H, E] float32.
    """
    plain_q = a_q is None  # TPA-KVonly: b_q is the plain query [B, N, H, D], coef = scale / Rk
    batch, n = b_q.shape[:2]
    h = a_k.shape[-1]
    s_len = a_k.shape[1]
    e = b_v.shape[-1]
    if plain_q:
        qs = b_q.astype(_F32) * coef
    else:
        aq = a_q.astype(_F32) * coef  # rank and softmax scales absorbed into A_Q (App. A.3)

    # keys any query of this tile may see: s <= max position and s < max length
    visible = jnp.minimum(jnp.max(q_pos) + 1, jnp.max(kv_len))
    n_blocks = _cdiv(jnp.clip(visible, 0, s_len), block)
    offsets = jnp.arange(block, dtype=jnp.int32)

    def body(i, carry):
        m, l, acc = carry  # [B,H,N], [B,H,N], [B,H,N,E]
        nominal = i * block
        start = jnp.minimum(nominal, s_len - block)  # clamped last block: no padded copy
        take = lambda x: lax.dynamic_slice_in_dim(x, start, block, axis=1)
        ak, bk, av, bv = take(a_k), take(b_k), take(a_v), take(b_v)
        pos = start + offsets  # [blk]
        valid = ((pos >= nominal)[None, None, :]  # not already covered by the previous block
                 & (pos[None, None, :] <= q_pos[:, :, None])  # causal
                 & (pos[None, None, :] < kv_len[:, None, None]))  # padding  -> [B, N, blk]
        row_ok = (pos[None, :] >= nominal) & (pos[None, :] < kv_len[:, None])  # [B, blk]

        # (1) head-shared feature dots, (2) per-head rank mixing (Alg. 2 steps 5-7; the
        # contraction order is Alg. 3's S1 = b_K B_Q, S2 = S1 A_Q, S3 = S2 (.) a_K)
        if plain_q:  # per-head query against the key factors: q_h . b_k[s, k], mixed by a_k[s, k, h]
            mixed = jnp.einsum("bnhd,bskd->bnskh", qs, bk.astype(_F32))
        else:
            p_feat = jnp.einsum("bnrd,bskd->bnsrk", b_q, bk, preferred_element_type=_F32)
            mixed = jnp.einsum("bnsrk,bnrh->bnskh", p_feat, aq)
        logits = jnp.einsum("bnskh,bskh->bhns", mixed, ak.astype(_F32))
        logits = jnp.where(valid[:, None], logits, -jnp.inf)

        # (3) online softmax
        m_new = jnp.maximum(m, logits.max(-1))
        m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)  # rows with nothing visible yet
        p = jnp.exp(logits - m_safe[..., None])  # masked -> 0
        alpha = jnp.exp(m - m_safe)
        l = alpha * l + p.sum(-1)

        # (4) value aggregation from the factors: p (.) a_V, then contract (s, u) with b_V
        av = jnp.where(row_ok[:, :, None, None], av, 0).astype(_F32)
        bv = jnp.where(row_ok[:, :, None, None], bv, 0).astype(_F32)
        w = jnp.einsum("bhns,bsuh->bhnsu", p, av)
        acc = alpha[..., None] * acc + jnp.einsum("bhnsu,bsue->bhne", w, bv)
        return m_new, l, acc

    init = (jnp.full((batch, h, n), -jnp.inf, _F32), jnp.zeros((batch, h, n), _F32),
            jnp.zeros((batch, h, n, e), _F32))
    _, l, acc = lax.fori_loop(0, n_blocks, body, init)
    # (5) o = s_V * y / l; rows that saw nothing (l == 0) give 0
    o = jnp.where(l[..., None] > 0, acc / jnp.where(l > 0, l, 1.0)[..., None], 0.0) / v_rank
    return o.transpose(0, 2, 1, 3)  # [B, N, H, E]


# ----------------------------------------------------------------------------- decode (Alg. 2)
@functools.partial(jax.jit, static_argnames=_STATIC + ("block_size",))
def flashtpa_decode(a_q, b_q, a_k, b_k, a_v, b_v, lengths, *, q_rank: int, k_rank: int, v_rank: int,
                    scale: float, block_size: int = 256):
    """FlashTPA decoding (paper Algorithm 2): one query token per sequence against a factor cache.

    a_q [B, Rq, H], b_q [B, Rq, D] (RoPE'd), a_k [B, S, Rk, H], b_k [B, S, Rk, D] (pre-rotated),
    a_v [B, S, Rv, H], b_v [B, S, Rv, E], lengths int [B]: cache rows ``< lengths[b]`` are valid
    (the current token's own K/V included).  Returns o [B, H, E].
    """
    s_len = a_k.shape[1]
    block = max(1, min(block_size, s_len))
    lengths = jnp.asarray(lengths, jnp.int32).reshape(-1)
    q_pos = (lengths - 1)[:, None]  # the query is the newest token: causal == padding mask here
    o = _blocked_attention(a_q[:, None], b_q[:, None], a_k, b_k, a_v, b_v, q_pos, lengths,
                           coef=scale / (q_rank * k_rank), v_rank=v_rank, block=block)
    return o[:, 0].astype(_out_dtype(a_v, b_v))


@functools.partial(jax.jit, static_argnames=("k_rank", "v_rank", "scale", "block_size"))
def flashtpa_decode_plain_q(q, a_k, b_k, a_v, b_v, lengths, *, k_rank: int, v_rank: int, scale: float,
                            block_size: int = 256):
    """Algorithm 2 for TPA-KVonly: a plain (RoPE'd) query q [B, H, D] against factorised K/V.

    Logits are ``sum_k a_k[s, k, h] <q_h, b_k[s, k]> / Rk``: K is never formed.  Same cache layout,
    masking and online softmax as :func:`flashtpa_decode`; returns o [B, H, E].
    """
    s_len = a_k.shape[1]
    block = max(1, min(block_size, s_len))
    lengths = jnp.asarray(lengths, jnp.int32).reshape(-1)
    o = _blocked_attention(None, q[:, None], a_k, b_k, a_v, b_v, (lengths - 1)[:, None], lengths,
                           coef=scale / k_rank, v_rank=v_rank, block=block)
    return o[:, 0].astype(_out_dtype(a_v, b_v))


# ----------------------------------------------------------------------------- prefill (Alg. 1)
@functools.partial(jax.jit, static_argnames=_STATIC + ("block_size", "q_block_size"))
def flashtpa_prefill(a_q, b_q, a_k, b_k, a_v, b_v, *, q_rank: int, k_rank: int, v_rank: int, scale: float,
                     q_positions=None, kv_lengths=None, block_size: int = 128, q_block_size: int = 128):
    """Specialised causal TPA (paper Algorithm 1) with blocked online softmax, o [B, T, H, E].

    a_q [B, T, Rq, H], b_q [B, T, Rq, D]; key/value factors [B, S, R, *].  Plain prefill: S == T,
    defaults ``q_positions = arange(T)``, ``kv_lengths = S``.  Chunked prefill against a cache that
    already holds earlier tokens: pass the whole cache (new chunk written in), ``q_positions`` the
    chunk's absolute positions [B, T] (or [T]) and ``kv_lengths`` the filled length [B].

    Queries are processed in tiles of ``q_block_size`` (``lax.map``); each tile loops only over the
    key blocks its causal window reaches, so fully masked blocks above the diagonal are skipped.
    """
    batch, t = a_q.shape[:2]
    s_len = a_k.shape[1]
    q_pos, kv_len = _positions_and_lengths(q_positions, kv_lengths, batch, t, s_len)
    block = max(1, min(block_size, s_len))
    tq = max(1, min(q_block_size, t))
    n_tiles = _cdiv(t, tq)
    pad = n_tiles * tq - t
    if pad:  # padded queries sit at position -1: they see nothing and are sliced off
        a_q = jnp.pad(a_q, ((0, 0), (0, pad), (0, 0), (0, 0)))
        b_q = jnp.pad(b_q, ((0, 0), (0, pad), (0, 0), (0, 0)))
        q_pos = jnp.pad(q_pos, ((0, 0), (0, pad)), constant_values=-1)
    tiles = lambda x: x.reshape(batch, n_tiles, tq, *x.shape[2:]).swapaxes(0, 1)
    coef = scale / (q_rank * k_rank)

    def tile(args):
        aq, bq, pos = args
        return _blocked_attention(aq, bq, a_k, b_k, a_v, b_v, pos, kv_len, coef=coef, v_rank=v_rank, block=block)

    o = lax.map(tile, (tiles(a_q), tiles(b_q), tiles(q_pos)))  # [n_tiles, B, tq, H, E]
    o = o.swapaxes(0, 1).reshape(batch, n_tiles * tq, *o.shape[3:])[:, :t]
    return o.astype(_out_dtype(a_v, b_v))
