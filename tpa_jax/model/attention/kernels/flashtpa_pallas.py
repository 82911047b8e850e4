"""FlashTPA decoding as a Pallas kernel (paper Algorithm 3, generalised to any R_K, R_V).

Same signature and semantics as :func:`tpa_jax.model.attention.flashtpa.flashtpa_decode`.

Grid: ``(B, H // head_block)``; one program owns one sequence and a block of heads, holds its
query factors, and walks that sequence's cache in blocks of ``block_size`` rows (only the blocks
below its length) with a float32 online softmax.  Per cache block, following Alg. 3 with the
rank-1 vector products replaced by small GEMMs over the ranks (as App. B.1 says):

    for each key rank k:   S1 = b_K[:, k, :] B_Q^T        [blk, Rq]   (head-shared feature dots)
                           S2 = S1 A_Q                    [blk, hb]
                           L += S2 (.) a_K[:, k, :]       [blk, hb]   (A_Q carries scale/(Rq Rk))
    online softmax on L (masked rows -> -inf)
    for each value rank u: acc += (p (.) a_V[:, u, :])^T b_V[:, u, :]   [hb, E]
    o = acc / (Rv l)

The last block's start is clamped to ``S - blk`` and rows it shares with the previous block are
masked, so S need not be a multiple of the block size.  Cache rows at or past ``lengths[b]`` are
masked in the logits and zeroed in the value factors (they may hold anything).

This is written for clarity and for interpret mode; compiled TPU/GPU runs would additionally need
tile-aligned block shapes (multiples of 8/128) and the lengths in SMEM via scalar prefetch.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

__all__ = ["flashtpa_decode_pallas"]

_F32 = jnp.float32


def _kernel(len_ref, aq_ref, bq_ref, ak_ref, bk_ref, av_ref, bv_ref, o_ref, *,
            block: int, k_rank: int, v_rank: int, coef: float):
    s_len = ak_ref.shape[0]
    length = len_ref[0]
    aq = aq_ref[...].astype(_F32) * coef  # [Rq, hb]
    bq = bq_ref[...].astype(_F32)  # [Rq, D]
    hb, e = o_ref.shape
    offsets = lax.broadcasted_iota(jnp.int32, (block, 1), 0)

    def body(i, carry):
        m, l, acc = carry  # [1, hb], [1, hb], [hb, E]
        nominal = i * block
        start = jnp.minimum(nominal, s_len - block)
        pos = start + offsets  # [blk, 1]
        valid = (pos >= nominal) & (pos < length)  # [blk, 1]
        rows = pl.ds(start, block)

        logits = jnp.zeros((block, hb), _F32)
        for k in range(k_rank):
            s1 = jnp.dot(bk_ref[rows, k, :].astype(_F32), bq.T, preferred_element_type=_F32)  # [blk, Rq]
            s2 = jnp.dot(s1, aq, preferred_element_type=_F32)  # [blk, hb]
            logits = logits + s2 * ak_ref[rows, k, :].astype(_F32)
        logits = jnp.where(valid, logits, -jnp.inf)

        m_new = jnp.maximum(m, logits.max(axis=0, keepdims=True))
        m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
        p = jnp.exp(logits - m_safe)  # [blk, hb], masked rows -> 0
        alpha = jnp.exp(m - m_safe)
        l = alpha * l + p.sum(axis=0, keepdims=True)
        acc = acc * alpha.T
        for u in range(v_rank):
            av = jnp.where(valid, av_ref[rows, u, :].astype(_F32), 0.0)  # [blk, hb]
            bv = jnp.where(valid, bv_ref[rows, u, :].astype(_F32), 0.0)  # [blk, E]
            acc = acc + jnp.dot((p * av).T, bv, preferred_element_type=_F32)  # [hb, E]
        return m_new, l, acc

    init = (jnp.full((1, hb), -jnp.inf, _F32), jnp.zeros((1, hb), _F32), jnp.zeros((hb, e), _F32))
    n_blocks = (jnp.clip(length, 0, s_len) + block - 1) // block
    _, l, acc = lax.fori_loop(0, n_blocks, body, init)
    l = l.T  # [hb, 1]
    o = jnp.where(l > 0, acc / jnp.where(l > 0, l, 1.0), 0.0) / v_rank
    o_ref[...] = o.astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("q_rank", "k_rank", "v_rank", "scale", "block_size",
                                             "head_block", "interpret"))
def flashtpa_decode_pallas(a_q, b_q, a_k, b_k, a_v, b_v, lengths, *, q_rank: int, k_rank: int, v_rank: int,
                           scale: float, block_size: int = 256, head_block: int | None = None,
                           interpret: bool = False):
    """Pallas FlashTPA decode: a_q [B, Rq, H], b_q [B, Rq, D], cache factors [B, S, R, *],
    lengths int [B] -> o [B, H, E].  ``head_block`` (default H) must divide H.
    ``interpret=True`` runs the kernel with the Pallas interpreter (CPU)."""
    batch, rq, h = a_q.shape
    d = b_q.shape[-1]
    s_len, rk = a_k.shape[1], a_k.shape[2]
    rv, e = a_v.shape[2], b_v.shape[-1]
    if rq != q_rank or rk != k_rank or rv != v_rank:
        raise ValueError(f"factor ranks {(rq, rk, rv)} do not match q_rank/k_rank/v_rank {(q_rank, k_rank, v_rank)}")
    hb = h if head_block is None else head_block
    if h % hb:
        raise ValueError(f"head_block={hb} must divide the number of heads {h}")
    block = max(1, min(block_size, s_len))
    lengths = jnp.asarray(lengths, jnp.int32).reshape(batch)
    sq = pl.squeezed
    kernel = functools.partial(_kernel, block=block, k_rank=k_rank, v_rank=v_rank, coef=scale / (q_rank * k_rank))
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((batch, h, e), jnp.result_type(a_v, b_v)),
        grid=(batch, h // hb),
        in_specs=[
            pl.BlockSpec((1,), lambda b, j: (b,)),  # lengths
            pl.BlockSpec((sq, rq, hb), lambda b, j: (b, 0, j)),  # a_q
            pl.BlockSpec((sq, rq, d), lambda b, j: (b, 0, 0)),  # b_q
            pl.BlockSpec((sq, s_len, rk, hb), lambda b, j: (b, 0, 0, j)),  # a_k
            pl.BlockSpec((sq, s_len, rk, d), lambda b, j: (b, 0, 0, 0)),  # b_k
            pl.BlockSpec((sq, s_len, rv, hb), lambda b, j: (b, 0, 0, j)),  # a_v
            pl.BlockSpec((sq, s_len, rv, e), lambda b, j: (b, 0, 0, 0)),  # b_v
        ],
        out_specs=pl.BlockSpec((sq, hb, e), lambda b, j: (b, j, 0)),
        interpret=interpret,
        name="flashtpa_decode",
    )(lengths, a_q, b_q, a_k, b_k, a_v, b_v)
