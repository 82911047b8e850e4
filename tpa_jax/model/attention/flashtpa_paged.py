"""FlashTPA decoding through a page table (paper Alg. 2 over a paged factor cache).

A paged cache (``tpa_jax.inference.paged``) keeps each layer's factors in a pool of pages,
a_k [N, page_size, R, H], b_k [N, page_size, R, D] (pre-rotated), a_v [N, page_size, U, H] and
b_v [N, page_size, U, E], shared by every sequence; ``page_table`` [B, J] says which pages hold a
sequence's rows (row s: page ``page_table[b, s // page_size]``, offset ``s % page_size``).  Decoding
runs Alg. 2's block loop over blocks of whole pages (``core.pages_per_block``: about
``core.PAGED_BLOCK_ROWS`` rows): block i of sequence b is a gather of its pages ``i k .. i k + k - 1``,
so the cache is never copied into per-sequence rows, and only the blocks below the longest length
are read.  An int8 pool's blocks are dequantised as they are read.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from .core import pages_per_block, table_blocks
from .flashtpa import _decode, _out_dtype

__all__ = ["flashtpa_decode_paged"]


def flashtpa_decode_paged(a_q_BPH: Optional[jax.Array], b_q_BPD: jax.Array, a_k_NPRH: jax.Array, b_k_NPRD: jax.Array,
                          a_v_NPUH: jax.Array, b_v_NPUE: jax.Array, page_table_BJ: jax.Array, lengths_B: jax.Array, *,
                          q_rank: int, k_rank: int, v_rank: int, scale: float, new_kv: Optional[tuple] = None,
                          scales: Optional[tuple] = None) -> jax.Array:
    """One query token per sequence against a paged factor cache -> o [B, H, E].

    Conventions as ``flashtpa.flashtpa_decode``: rows ``< lengths[b]`` are valid and the query sits
    at ``lengths[b] - 1``; with ``new_kv`` (the token's own factors) the pool holds the rows before
    it.  ``a_q_BPH=None``: TPA-KVonly's plain query [B, H, D] as ``b_q_BPD``.  ``scales``: an int8
    pool's (a_k, b_k, a_v, b_v) scales [N, page_size, rank], or None each."""
    page_size = a_k_NPRH.shape[1]
    per = pages_per_block(page_size, page_table_BJ.shape[1])
    coef = scale / (k_rank if a_q_BPH is None else q_rank * k_rank)
    lengths_B = jnp.asarray(lengths_B, jnp.int32).reshape(-1)
    o_BHE = _decode(a_q_BPH, b_q_BPD, (a_k_NPRH, b_k_NPRD, a_v_NPUH, b_v_NPUE), lengths_B, new_kv, coef=coef,
                    v_rank=v_rank, block_size=per * page_size, finite_rows=False, one_pass=False, scales=scales,
                    pages=table_blocks(jnp.asarray(page_table_BJ, jnp.int32), per))
    return o_BHE.astype(_out_dtype(a_v_NPUH, b_v_NPUE))
