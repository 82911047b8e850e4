"""FlashTPA decoding as a Pallas kernel (paper Algorithm 3, generalised to any R_K, R_V).

Same signature and semantics as :func:`tpa_jax.model.attention.flashtpa.flashtpa_decode`.

Grid: ``(B, H // head_block)``; one program owns one sequence and a block of heads, holds its
query factors, and walks that sequence's cache in blocks of ``block_size`` rows (only the blocks
below its length) with a float32 online softmax.  Per cache block of S rows, following Alg. 3 with
the rank-1 vector products replaced by small GEMMs over the ranks (as App. B.1 says):

    for each key rank r:   S1 = b_K[:, r, :] B_Q^T        [S, P]    (head-shared feature dots)
                           S2 = S1 A_Q                    [S, H]
                           L += S2 (.) a_K[:, r, :]       [S, H]   (A_Q carries scale/(R_Q R_K))
    online softmax on L (masked rows -> -inf)
    for each value rank u: acc += (p (.) a_V[:, u, :])^T b_V[:, u, :]   [H, E]
    o = acc / (R_V l)

(here S is one block of cache rows and H the program's block of heads.)

The mask is the model's one rule (``core.attention_mask``) computed inline: the query sits at
position ``lengths[b] - 1``, so a key row s is visible iff ``s < lengths[b]``.  The last block's
start is clamped to ``S - block`` and rows it shares with the previous block are masked, so S
need not be a multiple of the block size.  Rows at or past ``lengths[b]`` are masked in the logits
and zeroed in the value factors (they may hold anything).

This is written for clarity and for interpret mode; compiled TPU/GPU runs would additionally need
tile-aligned block shapes (multiples of 8/128) and the lengths in SMEM via scalar prefetch.
"""
from __future__ import annotations

import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

__all__ = ["flashtpa_decode_pallas"]

_F32 = jnp.float32
Ref = Any  # a Pallas memory reference: indexed like an array, written with ``ref[...] = value``


def _kernel(length_ref: Ref, a_q_ref: Ref, b_q_ref: Ref, a_k_ref: Ref, b_k_ref: Ref, a_v_ref: Ref, b_v_ref: Ref,
            o_ref: Ref, *, block: int, k_rank: int, v_rank: int, coef: float) -> None:
    """One program: refs a_q [P, H], b_q [P, D], a_k [S, R, H], b_k [S, R, D], a_v [S, U, H],
    b_v [S, U, E] of one sequence (S: the whole cache; H: this program's heads); writes o [H, E]."""
    s_len = a_k_ref.shape[0]
    length = length_ref[0]
    a_q_PH = a_q_ref[...].astype(_F32) * coef
    b_q_PD = b_q_ref[...].astype(_F32)
    hb, e = o_ref.shape
    offsets_S1 = lax.broadcasted_iota(jnp.int32, (block, 1), 0)

    def body(i: jax.Array, carry: tuple[jax.Array, jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array, jax.Array]:
        m_1H, l_1H, acc_HE = carry
        nominal = i * block
        start = jnp.minimum(nominal, s_len - block)
        key_positions_S1 = start + offsets_S1
        valid_S1 = (key_positions_S1 >= nominal) & (key_positions_S1 < length)
        rows = pl.ds(start, block)

        logits_SH = jnp.zeros((block, hb), _F32)
        for r in range(k_rank):
            s1_SP = jnp.dot(b_k_ref[rows, r, :].astype(_F32), b_q_PD.T, preferred_element_type=_F32)
            s2_SH = jnp.dot(s1_SP, a_q_PH, preferred_element_type=_F32)
            logits_SH = logits_SH + s2_SH * a_k_ref[rows, r, :].astype(_F32)
        logits_SH = jnp.where(valid_S1, logits_SH, -jnp.inf)

        m_new = jnp.maximum(m_1H, logits_SH.max(axis=0, keepdims=True))
        m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
        p_SH = jnp.exp(logits_SH - m_safe)  # masked rows -> 0
        alpha_1H = jnp.exp(m_1H - m_safe)
        l_1H = alpha_1H * l_1H + p_SH.sum(axis=0, keepdims=True)
        acc_HE = acc_HE * alpha_1H.T
        for u in range(v_rank):
            a_v_SH = jnp.where(valid_S1, a_v_ref[rows, u, :].astype(_F32), 0.0)
            b_v_SE = jnp.where(valid_S1, b_v_ref[rows, u, :].astype(_F32), 0.0)
            acc_HE = acc_HE + jnp.dot((p_SH * a_v_SH).T, b_v_SE, preferred_element_type=_F32)
        return m_new, l_1H, acc_HE

    init = (jnp.full((1, hb), -jnp.inf, _F32), jnp.zeros((1, hb), _F32), jnp.zeros((hb, e), _F32))
    n_blocks = (jnp.clip(length, 0, s_len) + block - 1) // block
    _, l_1H, acc_HE = lax.fori_loop(0, n_blocks, body, init)
    l_H1 = l_1H.T
    o_HE = jnp.where(l_H1 > 0, acc_HE / jnp.where(l_H1 > 0, l_H1, 1.0), 0.0) / v_rank
    o_ref[...] = o_HE.astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("q_rank", "k_rank", "v_rank", "scale", "block_size",
                                             "head_block", "interpret"))
def flashtpa_decode_pallas(a_q_BPH: jax.Array, b_q_BPD: jax.Array, a_k_BSRH: jax.Array, b_k_BSRD: jax.Array,
                           a_v_BSUH: jax.Array, b_v_BSUE: jax.Array, lengths_B: jax.Array, *, q_rank: int,
                           k_rank: int, v_rank: int, scale: float, block_size: int = 256,
                           head_block: Optional[int] = None, interpret: bool = False) -> jax.Array:
    """Pallas FlashTPA decode -> o [B, H, E].  ``head_block`` (default H) must divide H.
    ``interpret=True`` runs the kernel with the Pallas interpreter (CPU)."""
    batch, p, h = a_q_BPH.shape
    d = b_q_BPD.shape[-1]
    s_len, r = a_k_BSRH.shape[1], a_k_BSRH.shape[2]
    u, e = a_v_BSUH.shape[2], b_v_BSUE.shape[-1]
    if p != q_rank or r != k_rank or u != v_rank:
        raise ValueError(f"factor ranks {(p, r, u)} do not match q_rank/k_rank/v_rank {(q_rank, k_rank, v_rank)}")
    hb = h if head_block is None else head_block
    if h % hb:
        raise ValueError(f"head_block={hb} must divide the number of heads {h}")
    block = max(1, min(block_size, s_len))
    lengths_B = jnp.asarray(lengths_B, jnp.int32).reshape(batch)
    sq = pl.squeezed
    kernel = functools.partial(_kernel, block=block, k_rank=k_rank, v_rank=v_rank, coef=scale / (q_rank * k_rank))
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((batch, h, e), jnp.result_type(a_v_BSUH, b_v_BSUE)),
        grid=(batch, h // hb),
        in_specs=[
            pl.BlockSpec((1,), lambda b, j: (b,)),  # lengths
            pl.BlockSpec((sq, p, hb), lambda b, j: (b, 0, j)),  # a_q
            pl.BlockSpec((sq, p, d), lambda b, j: (b, 0, 0)),  # b_q
            pl.BlockSpec((sq, s_len, r, hb), lambda b, j: (b, 0, 0, j)),  # a_k
            pl.BlockSpec((sq, s_len, r, d), lambda b, j: (b, 0, 0, 0)),  # b_k
            pl.BlockSpec((sq, s_len, u, hb), lambda b, j: (b, 0, 0, j)),  # a_v
            pl.BlockSpec((sq, s_len, u, e), lambda b, j: (b, 0, 0, 0)),  # b_v
        ],
        out_specs=pl.BlockSpec((sq, hb, e), lambda b, j: (b, j, 0)),
        interpret=interpret,
        name="flashtpa_decode",
    )(lengths_B, a_q_BPH, b_q_BPD, a_k_BSRH, b_k_BSRD, a_v_BSUH, b_v_BSUE)
