"""FlashTPA decoding through a page table, as a Pallas TPU kernel (paper Algorithm 3 over a paged cache).

A paged factor cache keeps one pool of fixed-size pages per layer, shared by all sequences:

    a_k [N, page_size, R, H]   b_k [N, page_size, R, D]   a_v [N, page_size, U, H]   b_v [N, page_size, U, E]

and an int32 page table [B, J]: cache row s of sequence b lives in page ``page_table[b, s // page_size]``
at offset ``s % page_size``.  Entries for pages a sequence does not hold are N (``NO_PAGE``
-- one past the pool); rows below a sequence's length always lie in real pages.  Rows past the
length inside a page may hold anything, NaN included.  ``lengths``, ``new_kv`` and ``scales`` (an
int8 pool's float32 [N, page_size, rank] per factor) follow ``flashtpa_pallas.flashtpa_decode_pallas``.

Grid ``(B, J)``: one grid step is one page of one sequence.  The lengths and the (flattened) page
table are scalar-prefetched into SMEM (``PrefetchScalarGridSpec``), and the cache index maps read
``page_table[b, j]`` to pick the pool page that step j of sequence b works on -- the gather
happens in the DMA engine, never as a contiguous copy of a sequence's pages.  Page steps at or
past a sequence's length are skipped (``pl.when``), and their page index is clamped to the
sequence's last filled page (:func:`pool_page_index`), so a skipped step asks for the page already
in VMEM: no DMA is issued, and no out-of-range page (a NO_PAGE entry) is ever read.  An empty
sequence reads page ``page_table[b, 0]`` clipped into the pool, whose rows it masks.

Everything else -- the kernel body, the query weights, the online softmax and its masking of rows
at or past the length, the ``new_kv`` seed, int8 dequantisation -- is the contiguous kernel's
(``flashtpa_pallas.decode_call``): a page is that kernel's cache block, row t of step j being cache
row ``j * page_size + t``.  The pool is viewed (a free reshape) with (rank, head|feature) in lanes,
so a page block is [page_size, rank * n]: TPU tiling asks ``page_size`` to be a multiple of 8.

``interpret`` as the contiguous kernel: None picks by the platform lowered for (Mosaic on TPU, the
Pallas interpreter on CPU, elsewhere the jnp ``flashtpa.flashtpa_decode`` on each sequence's pages
gathered into a contiguous view); False forces the compiled kernel; True or ``pltpu.InterpretParams``
an interpreter.  The compiled kernel needs ``page_size`` a multiple of 8 (a one-line error for
interpret False or None, since None may lower for TPU); an interpreter takes any page size.
"""
from __future__ import annotations

import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp
from jax import lax

from .. import flashtpa
from ..flashtpa_paged import flashtpa_decode_paged
from .flashtpa_pallas import _SUBLANES, by_platform, check_factors, decode_call, float_scales, lane_view

__all__ = ["flashtpa_decode_paged_pallas", "pool_page_index"]


def pool_page_index(b: jax.Array, j: jax.Array, length: jax.Array, table: Any, *, pages_per_row: int,
                    page_size: int, n_pages: int) -> jax.Array:
    """The pool page that grid step (b, j) reads: ``table[b * J + j']`` (``table`` the flattened page
    table, J = ``pages_per_row``) with j' = j clamped to the sequence's last filled page (page 0 when
    it is empty), the entry clipped into the pool [0, N).  Skipped steps thus repeat the last page's
    index (no DMA), and a NO_PAGE entry is never fetched.  Integer scalar arithmetic only."""
    last = jnp.maximum(lax.div(length + (page_size - 1), page_size) - 1, 0)
    entry = table[b * pages_per_row + jnp.minimum(j, last)]
    return jnp.clip(entry, 0, n_pages - 1)


def _check_pool(kv: tuple, scales: Optional[tuple], table_BJ: jax.Array, batch: int) -> None:
    """One-line errors for pool factors (or scales) with different page counts or sizes, or a page
    table that is not int [B, J]."""
    pages = {x.shape[:2] for x in kv} | {sc.shape[:2] for sc in scales or () if sc is not None}
    if len(pages) != 1:
        raise ValueError(f"pool factors and scales must share (pages, page_size), got {sorted(pages)}")
    if table_BJ.ndim != 2 or table_BJ.shape[0] != batch or not jnp.issubdtype(table_BJ.dtype, jnp.integer):
        raise ValueError(f"page_table must be an int array [B={batch}, J], got {table_BJ.dtype} {table_BJ.shape}")


@functools.partial(jax.jit, static_argnames=("q_rank", "k_rank", "v_rank", "scale", "interpret"))
def flashtpa_decode_paged_pallas(a_q_BPH: jax.Array, b_q_BPD: jax.Array, a_k_NPRH: jax.Array, b_k_NPRD: jax.Array,
                                 a_v_NPUH: jax.Array, b_v_NPUE: jax.Array, page_table_BJ: jax.Array,
                                 lengths_B: jax.Array, *, q_rank: int, k_rank: int, v_rank: int, scale: float,
                                 new_kv: Optional[tuple] = None, scales: Optional[tuple] = None,
                                 interpret: Optional[Any] = None) -> jax.Array:
    """Pallas FlashTPA decode over a paged factor cache -> o [B, H, E] (see the module docstring).

    ``page_table_BJ``: int32 [B, J], pool page of each sequence's j-th page (N for none);
    ``lengths_B``: rows < lengths[b] are valid, the query at position lengths[b] - 1 (with ``new_kv``,
    the current token's (a_k [B, R, H], b_k [B, R, D], a_v [B, U, H], b_v [B, U, E]), the pool holds
    only the rows before it).  ``scales``: an int8 pool's (a_k, b_k, a_v, b_v scales
    [N, page_size, rank], None for a float factor).  ``interpret``: as ``flashtpa_decode_pallas``.
    """
    kv = (a_k_NPRH, b_k_NPRD, a_v_NPUH, b_v_NPUE)
    batch = a_q_BPH.shape[0]
    check_factors(a_q_BPH, kv, new_kv, q_rank, k_rank, v_rank)
    _check_pool(kv, scales, page_table_BJ, batch)
    n_pages, page_size = a_k_NPRH.shape[:2]
    pages_per_row = page_table_BJ.shape[1]
    if page_size % _SUBLANES and (interpret is None or interpret is False):
        raise ValueError(f"page_size={page_size} must be a multiple of {_SUBLANES} for the compiled TPU kernel "
                         "(an interpreter, interpret=True, takes any page size)")
    seeded = new_kv is not None
    lengths_B = jnp.clip(jnp.asarray(lengths_B, jnp.int32).reshape(batch), 0, pages_per_row * page_size + seeded)
    table_BJ = jnp.asarray(page_table_BJ, jnp.int32)
    scales = float_scales(kv, scales)

    def call(a_q_BPH: jax.Array, b_q_BPD: jax.Array, *args: jax.Array, interpret: Any) -> jax.Array:
        *kv, table_BJ, lengths = args
        page = functools.partial(pool_page_index, pages_per_row=pages_per_row, page_size=page_size,
                                 n_pages=n_pages)
        # a 1-D table: SMEM pads a 2-D array's last dim to 128 words
        return decode_call(
            (jnp.maximum(lengths - seeded, 0), table_BJ.reshape(-1)), a_q_BPH, b_q_BPD,
            [lane_view(x) for x in (*kv, *(scales or ()))], coef=scale / (q_rank * k_rank), k_rank=k_rank,
            v_rank=v_rank, block=page_size, steps=pages_per_row,
            cache_index=lambda b_, j_, lens, table: (page(b_, j_, lens[b_], table), 0), new_kv=new_kv,
            quantized=scales is not None, out_dtype=flashtpa._out_dtype(a_v_NPUH, b_v_NPUE), interpret=interpret,
            name="flashtpa_decode_paged")

    fallback = functools.partial(flashtpa_decode_paged, q_rank=q_rank, k_rank=k_rank, v_rank=v_rank,
                                 scale=scale, new_kv=new_kv, scales=scales)
    return by_platform(call, fallback, (a_q_BPH, b_q_BPD, *kv, table_BJ, lengths_B), interpret)
