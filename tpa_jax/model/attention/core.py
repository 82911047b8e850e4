"""What every attention family shares: the mask rule, scaled dot-product attention (eq. 3.2,
GQA-aware, float32 softmax), the output projection W_O with its optional per-head norm (eq. 3.3),
the decode-cache leaf description and the write of new tokens into a cache."""
from __future__ import annotations

from typing import NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from ...config import ModelConfig
from ..layers import RMSNorm, cast, param
from .quant import dequantize_rows, store


class CacheLeaf(NamedTuple):
    """One leaf of a layer's decode cache: its shape per token and the logical axes of that shape."""

    shape: tuple[int, ...]
    axes: tuple[str, ...]


# ----------------------------------------------------------------------------------------- the mask
def filled_BS(kv_lengths_B: jax.Array, key_positions_S: jax.Array) -> jax.Array:
    """Boolean [B, S]: key position s holds a token of sequence b iff ``s < kv_lengths[b]``."""
    return key_positions_S[None, :] < kv_lengths_B[:, None]


def attention_mask(q_positions_BT: jax.Array, kv_lengths_B: jax.Array, key_positions_S: jax.Array) -> jax.Array:
    """The one mask rule of the model, boolean [B, T, S]: key position s is visible to a query at
    position p of sequence b iff ``s <= p and s < kv_lengths[b]`` (causal and padding).

    A batch of 1 (``q_positions`` [1, T], ``kv_lengths`` [1]) gives a mask that broadcasts."""
    causal_BTS = key_positions_S[None, None, :] <= q_positions_BT[:, :, None]
    return causal_BTS & filled_BS(kv_lengths_B, key_positions_S)[:, None, :]


class AttentionMask(NamedTuple):
    """What attention is told about the mask: the arguments of :func:`attention_mask` without the
    dense [B, T, S] array, keys sitting at positions 0..S-1.  Only ``attention_impl="xla"`` (and
    one-token decoding) densify it; the blocked and kernel paths evaluate the rule per key block.

    Both fields None (``AttentionMask()``) is the full causal forward: queries at 0..T-1 over the
    same T keys, all filled -- known at trace time, so kernels can use their plain causal mask.
    Otherwise ``q_positions_BT`` int32 [B or 1, T] (consecutive within a row in the model: a
    cached prefill's queries follow the cache) and ``kv_lengths_B`` int32 [B or 1]."""

    q_positions_BT: Optional[jax.Array] = None
    kv_lengths_B: Optional[jax.Array] = None

    @property
    def is_causal(self) -> bool:
        return self.q_positions_BT is None

    def arrays(self, batch: int, t: int, s: int) -> tuple[jax.Array, jax.Array]:
        """``(q_positions int32 [batch, t], kv_lengths int32 [batch])``, the full forward's filled in."""
        q_pos = jnp.arange(t, dtype=jnp.int32)[None] if self.is_causal else self.q_positions_BT
        kv_len = jnp.full((1,), s, jnp.int32) if self.kv_lengths_B is None else self.kv_lengths_B
        return (jnp.broadcast_to(jnp.asarray(q_pos, jnp.int32), (batch, t)),
                jnp.broadcast_to(jnp.asarray(kv_len, jnp.int32), (batch,)))

    def dense(self, t: int, s: int) -> jax.Array:
        """The boolean mask [B or 1, T, S] (:func:`attention_mask`) over keys 0..S-1."""
        q_pos = jnp.arange(t, dtype=jnp.int32)[None] if self.is_causal else self.q_positions_BT
        kv_len = jnp.full((1,), s, jnp.int32) if self.kv_lengths_B is None else self.kv_lengths_B
        return attention_mask(q_pos, kv_len, jnp.arange(s, dtype=jnp.int32))


# ----------------------------------------------------------------------------------------- attention
def attend(q_BTHD: jax.Array, k_BSKD: jax.Array, v_BSKE: jax.Array, *, scale: float,
           mask_BTS: jax.Array) -> jax.Array:
    """softmax(scale * q k^T, masked) v -> [B, T, H, E], with H = K G query heads: head h reads kv head h // G.

    Computed head-major: the G query heads that share a kv head are folded into that head's query
    rows (``q_BKTD`` below holds G T rows, ordered (g, t)), so both contractions are plain batched
    matmuls over [B, K] (10-20% faster on CPU than a [B, T, K, G] layout).  Logits and softmax
    statistics are float32; the value contraction runs in v's dtype.
    """
    b, t, h, d = q_BTHD.shape
    s, kv, e = k_BSKD.shape[1], k_BSKD.shape[2], v_BSKE.shape[-1]
    g = h // kv
    q_BKTD = q_BTHD.reshape(b, t, kv, g, d).transpose(0, 2, 3, 1, 4).reshape(b, kv, g * t, d)
    k_BKSD = k_BSKD.transpose(0, 2, 1, 3)
    v_BKSE = v_BSKE.transpose(0, 2, 1, 3)
    logits_BKTS = jnp.einsum("bktd,bksd->bkts", q_BKTD, k_BKSD, preferred_element_type=jnp.float32) * scale
    # [B, 1, G T, S]: each query row's mask, broadcast over the kv heads
    row_mask = jnp.broadcast_to(mask_BTS[:, None, None], (mask_BTS.shape[0], 1, g, t, s)).reshape(-1, 1, g * t, s)
    logits_BKTS = jnp.where(row_mask, logits_BKTS, jnp.finfo(jnp.float32).min)
    probs_BKTS = jax.nn.softmax(logits_BKTS, axis=-1)
    o_BKTE = jnp.einsum("bkts,bkse->bkte", probs_BKTS.astype(v_BKSE.dtype), v_BKSE)
    return o_BKTE.reshape(b, kv, g, t, e).transpose(0, 3, 1, 2, 4).reshape(b, t, h, e)


def row_softmax(logits_BSH: jax.Array, filled_BS: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Softmax statistics over the rows (axis 1) of float32 logits [B, S, H], rows where ``filled_BS``
    is False left out: (p [B, S, H], exactly 0 at those rows; l [B, H], the sum, 1 where no row is
    filled; lse [B, H], -inf there).  The output is ``sum_s p v / l`` (0 where nothing is filled)."""
    logits_BSH = jnp.where(filled_BS[:, :, None], logits_BSH, -jnp.inf)
    m_BH = logits_BSH.max(axis=1)
    m_safe = jnp.where(jnp.isfinite(m_BH), m_BH, 0.0)
    p_BSH = jnp.exp(logits_BSH - m_safe[:, None])
    l_BH = p_BSH.sum(axis=1)
    seen = l_BH > 0
    l_BH = jnp.where(seen, l_BH, 1.0)
    return p_BSH, l_BH, jnp.where(seen, m_safe + jnp.log(l_BH), -jnp.inf)


def merge_parts(o_BTHE: jax.Array, lse_BTH: jax.Array, o2_BTHE: jax.Array, lse2_BTH: jax.Array):
    """Attention over the union of two disjoint key sets from each one's (o, lse); lse -inf: no key.
    Returns (o, lse) of the union, float32 statistics."""
    m = jnp.maximum(lse_BTH, lse2_BTH)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    w1, w2 = jnp.exp(lse_BTH - m), jnp.exp(lse2_BTH - m)
    total = w1 + w2
    seen = total > 0
    total = jnp.where(seen, total, 1.0)
    o = (w1[..., None] * o_BTHE + w2[..., None] * o2_BTHE) / total[..., None]
    return o, jnp.where(seen, m + jnp.log(total), -jnp.inf)


# ----------------------------------------------------------------------------------------- output
def output_params(module: nn.Module) -> tuple[jax.Array, Optional[RMSNorm]]:
    """Create W_O [H, E, M] (zero-initialised) and the optional per-head output RMSNorm of ``module``.

    Called from ``setup``; the parameter tree is ``w_o`` and ``out_norm/scale``.
    """
    cfg: ModelConfig = module.cfg
    h, e, m = cfg.n_head, cfg.value_dim, cfg.d_model
    norm = (RMSNorm(cfg, e, cfg.attn_out_norm_eps, True, "value_dim", name="out_norm")
            if cfg.attn_out_norm else None)
    w_o_HEM = param(module, "w_o", nn.initializers.zeros, (h, e, m), ("heads", "value_dim", "embed"))
    return w_o_HEM, norm


def project_out(cfg: ModelConfig, o_BTHE: jax.Array, w_o_HEM: jax.Array, norm: Optional[RMSNorm] = None) -> jax.Array:
    """[per-head RMSNorm] then concatenate the heads and apply W_O (eq. 3.3): [B, T, M].  One
    contraction over the flattened (head, feature) axis, so a decode step reads W_O once as a
    plain matrix (contracting two axes made XLA's CPU backend copy it transposed every step)."""
    if norm is not None:
        o_BTHE = norm(o_BTHE)
    b, t, h, e = o_BTHE.shape
    return jnp.einsum("btc,cm->btm", cast(o_BTHE, cfg).reshape(b, t, h * e), cast(w_o_HEM, cfg).reshape(h * e, -1))


# ----------------------------------------------------------------------------------------- caches
class LayerCache(NamedTuple):
    """Layer ``index`` of the model's stacked decode cache, ``layers`` {name: [L, B, S, ...]}: what
    the layer loop hands each layer, so that a layer reads its rows straight from the stack (no
    per-layer slice is copied out and stacked back).

    Prefill writes its new tokens into the stack as it goes (``write_cache``; later reads see them).
    One-token decoding (``deferred``) leaves the stack untouched inside the loop: ``write_cache``
    only records the token's items in ``pending``, which the loop hands out per layer and the model
    writes into every layer at once after it (:func:`write_stack`).  The loop then only reads the
    donated stack, so XLA neither copies nor rewrites it.  The decode paths read the old rows
    (``read_cache`` before ``write_cache``) and take the new token's items separately; a path that
    reads after writing gets the rows with the pending token put in (a copy of the layer's rows).

    A paged cache (``page_table`` int32 [B, J], ``tpa_jax.inference.paged``) holds a pool of pages
    {name: [L, N, page_size, ...]} instead: row s of sequence b is row ``s % page_size`` of page
    ``page_table[b, s // page_size]``, writes to pages past the pool (``N``, no page) are dropped, and
    a read gathers each sequence's pages into rows [B, J page_size, ...] (:func:`paged_rows`; one-token
    decoding reads the pool in blocks of pages instead, :meth:`pages`, :func:`paged_parts`)."""

    layers: dict[str, jax.Array]
    index: jax.Array
    deferred: bool = False
    pending: Optional[dict[str, jax.Array]] = None
    start_B: Optional[jax.Array] = None
    page_table: Optional[jax.Array] = None

    def layer_rows(self) -> dict[str, jax.Array]:
        """This layer's leaves of the stack, [B, S, ...]."""
        return {name: jax.lax.dynamic_index_in_dim(buf, self.index, 0, keepdims=False)
                for name, buf in self.layers.items()}

    def pages(self) -> tuple[dict[str, jax.Array], jax.Array]:
        """A paged cache seen from this layer: every layer's pages as one pool [L N, page_size, ...] (a
        free reshape) and the page table shifted to this layer's pages.  Reads go straight into the
        stack: slicing the layer's pool out first would copy all of it every step.  Entries past the
        pool land on another layer's pages, which only rows past a length ever read (masked)."""
        pool = {name: _unbits(_bits(buf).reshape(-1, *buf.shape[2:]), buf.dtype) for name, buf in self.layers.items()}
        n = next(iter(self.layers.values())).shape[1]
        return pool, self.page_table + self.index.astype(jnp.int32) * n


def _bits(x: jax.Array) -> jax.Array:
    """A 16-bit float array viewed as uint16 (other dtypes as they are).  Cache writes update the
    bits: XLA's CPU backend widens a bfloat16 update of a whole buffer to float32 and back,
    rewriting every row instead of updating one in place."""
    return jax.lax.bitcast_convert_type(x, jnp.uint16) if x.dtype in (jnp.bfloat16, jnp.float16) else x


def _unbits(x: jax.Array, dtype) -> jax.Array:
    return x if x.dtype == dtype else jax.lax.bitcast_convert_type(x, dtype)


def _put_rows(buf_BS: jax.Array, new_BT: jax.Array, start_B: jax.Array) -> jax.Array:
    """Rows ``start_B[b] .. + T`` of each sequence of ``buf_BS`` [B, S, ...] set to ``new_BT`` [B, T, ...]."""
    def put(buf_S: jax.Array, new_T: jax.Array, start: jax.Array) -> jax.Array:
        bits = jax.lax.dynamic_update_slice_in_dim(_bits(buf_S), _bits(new_T.astype(buf_S.dtype)), start, 0)
        return _unbits(bits, buf_S.dtype)

    return jax.vmap(put)(buf_BS, new_BT, start_B)


def _set_rows(buf: jax.Array, index: tuple, new: jax.Array, mode: str = "promise_in_bounds") -> jax.Array:
    """``buf.at[index].set(new)`` (in bounds, or ``mode="drop"``), a 16-bit buffer through its bits."""
    bits = _bits(buf).at[index].set(_bits(new.astype(buf.dtype)), mode=mode)
    return _unbits(bits, buf.dtype)


def page_slots(page_table_BJ: jax.Array, rows_BT: jax.Array, page_size: int) -> tuple[jax.Array, jax.Array]:
    """(page, offset) int32 [B, T] of rows ``rows_BT`` of each sequence in a paged cache.  A row past
    the table's J pages gets a page past any pool, so that, like the table's own "no page" entries,
    a write there is dropped."""
    no_page = jnp.iinfo(jnp.int32).max
    page_BT = jnp.take_along_axis(page_table_BJ, rows_BT // page_size, axis=1, mode="fill", fill_value=no_page)
    return page_BT, rows_BT % page_size


def page_rows(pool: jax.Array, pages: jax.Array) -> jax.Array:
    """``pool[pages]`` for a pool [N, page_size, ...] and page ids of any shape (a page past the pool
    reads the last page: rows past a length are masked by every reader).  A 16-bit pool is gathered
    through its bits: XLA's CPU backend gathers 16-bit floats by converting the whole pool to float32
    first, every step."""
    return _unbits(jnp.take(_bits(pool), pages, axis=0, mode="clip"), pool.dtype)


def paged_rows(pool: jax.Array, page_table_BJ: jax.Array) -> jax.Array:
    """A pool [N, page_size, ...] read as each sequence's rows [B, J page_size, ...] (:func:`page_rows`)."""
    return block_rows(pool, page_table_BJ, jnp.int32(0), page_table_BJ.shape[1])


PAGED_BLOCK_ROWS = 64  # about this many rows (whole pages) per block of a paged decode's loop


def pages_per_block(page_size: int, table_pages: int) -> int:
    """Pages a paged decode reads per block: about :data:`PAGED_BLOCK_ROWS` rows, at least one page."""
    return max(1, min(table_pages, PAGED_BLOCK_ROWS // page_size))


def table_blocks(page_table_BJ: jax.Array, per: int) -> jax.Array:
    """The page table widened to a multiple of ``per`` columns (the new ones read page 0; every reader
    masks rows past a length), so that block i is columns ``i per .. i per + per - 1``."""
    extra = -page_table_BJ.shape[1] % per
    return jnp.pad(page_table_BJ, ((0, 0), (0, extra))) if extra else page_table_BJ


def block_rows(pool: jax.Array, table_BJ: jax.Array, i: jax.Array, per: int) -> jax.Array:
    """Rows [B, per page_size, ...] of block ``i`` of each sequence: its pages ``i per ..`` gathered."""
    pages_BP = jax.lax.dynamic_slice_in_dim(table_BJ, i * per, per, axis=1)
    return page_rows(pool, pages_BP).reshape(table_BJ.shape[0], per * pool.shape[1], *pool.shape[2:])


def is_paged(cache) -> bool:
    """Whether ``cache`` is a layer of a paged cache (a :class:`LayerCache` with a page table)."""
    return isinstance(cache, LayerCache) and cache.page_table is not None


def paged_parts(cache: LayerCache, kv_len_B: jax.Array, attend_rows, dtype) -> tuple[jax.Array, jax.Array]:
    """(o, lse) of one query per sequence over the rows ``s < kv_len_B[b]`` of a paged cache's layer,
    read block by block up to the longest length (blocks of :func:`pages_per_block` pages): each
    block's rows are gathered from the pool, an int8 block dequantised to ``dtype``, and handed to
    ``attend_rows(rows, n_B)`` -> (o, lse) over the block's first ``n_B[b]`` rows; the blocks' parts
    are merged by log-sum-exp.  No sequence's rows are gathered past its pages' blocks, and the
    layer's rows are never dequantised whole."""
    pool, table_BJ = cache.pages()
    page_size = next(iter(pool.values())).shape[1]
    per = pages_per_block(page_size, table_BJ.shape[1])
    table_BJ, rows_per = table_blocks(table_BJ, per), per * page_size

    def part(i: jax.Array) -> tuple[jax.Array, jax.Array]:
        rows = dequantize_rows({name: block_rows(buf, table_BJ, i, per) for name, buf in pool.items()}, dtype)
        return attend_rows(rows, jnp.clip(kv_len_B - i * rows_per, 0, rows_per))

    n_blocks = (jnp.max(kv_len_B) + rows_per - 1) // rows_per
    return jax.lax.fori_loop(1, n_blocks, lambda i, acc: merge_parts(*acc, *part(i)), part(jnp.int32(0)))


def attend_cache(cache, kv_len_B: jax.Array, attend_rows, dtype) -> tuple[jax.Array, jax.Array]:
    """(o, lse) of one query per sequence over the rows ``s < kv_len_B[b]`` of a layer's cache, by
    ``attend_rows(rows, n_B)`` (see :func:`paged_parts`): a paged cache block by block, otherwise the
    layer's rows at once (an int8 cache's dequantised to ``dtype``)."""
    if is_paged(cache):
        return paged_parts(cache, kv_len_B, attend_rows, dtype)
    return attend_rows(dequantize_rows(read_cache(cache), dtype), kv_len_B)


def stored_leaves(cache) -> dict[str, jax.Array]:
    """The leaves a cache stores, for their names and dtypes (a :class:`LayerCache`'s stack or pool)."""
    return cache.layers if isinstance(cache, LayerCache) else cache


def write_stack(layers: dict[str, jax.Array], new: dict[str, jax.Array], start_B: jax.Array,
                page_table: Optional[jax.Array] = None) -> dict[str, jax.Array]:
    """Write every layer's new token at once: ``new[name]`` [L, B, 1, ...] at row ``start_B[b]`` of
    sequence b of ``layers[name]`` [L, B, S, ...] (in place when the stack is donated), or through
    ``page_table`` into a paged pool [L, N, page_size, ...]."""
    def put(buf: jax.Array, new_LB1: jax.Array) -> jax.Array:
        if page_table is not None:
            page_B1, off_B1 = page_slots(page_table, start_B[:, None], buf.shape[2])
            return _set_rows(buf, (slice(None), page_B1[:, 0], off_B1[:, 0]), new_LB1[:, :, 0], mode="drop")
        b, s = buf.shape[1], buf.shape[2]
        return _set_rows(buf, (slice(None), jnp.arange(b), jnp.clip(start_B, 0, s - 1)), new_LB1[:, :, 0])

    return {name: put(buf, new[name]) for name, buf in layers.items()}


def write_cache(cache: dict[str, jax.Array] | LayerCache, items: dict[str, jax.Array],
                start_B: jax.Array) -> dict[str, jax.Array] | LayerCache:
    """Write each new item [B, T, ...] at row ``start_B[b]`` of sequence b: into its cache leaf
    [B, S, ...], or into layer ``index`` of a :class:`LayerCache` stack (in place), or for a
    deferred one record them, to be written after the layer loop.  An int8 cache stores the items
    quantised, each beside its scale leaf (``quant.store``)."""
    items = store(items, cache.layers if isinstance(cache, LayerCache) else cache)
    if isinstance(cache, LayerCache) and cache.deferred:
        return cache._replace(pending=items, start_B=start_B)
    if isinstance(cache, LayerCache) and cache.page_table is not None:
        t = next(iter(items.values())).shape[1]
        page_size = next(iter(cache.layers.values())).shape[2]
        page_BT, off_BT = page_slots(cache.page_table, start_B[:, None] + jnp.arange(t, dtype=jnp.int32), page_size)
        return cache._replace(layers={name: _set_rows(buf, (cache.index, page_BT, off_BT), items[name], mode="drop")
                                      for name, buf in cache.layers.items()})
    if isinstance(cache, LayerCache):
        b, t = next(iter(items.values())).shape[:2]
        s = next(iter(cache.layers.values())).shape[2]
        start_B = jnp.clip(start_B, 0, s - t)  # as dynamic_update_slice clamps the start
        rows_BT = start_B[:, None] + jnp.arange(t, dtype=start_B.dtype)[None, :]
        batch_BT = jnp.broadcast_to(jnp.arange(b)[:, None], (b, t))
        return cache._replace(layers={name: _set_rows(buf, (cache.index, batch_BT, rows_BT), items[name])
                                      for name, buf in cache.layers.items()})
    return {name: _put_rows(cache[name], items[name], start_B) for name in cache}


def read_cache(cache: dict[str, jax.Array] | LayerCache) -> dict[str, jax.Array]:
    """The layer's cache leaves [B, S, ...] (of a :class:`LayerCache`: its layer of the stack, or of a
    paged pool each sequence's pages, with a deferred write's pending token put in)."""
    if isinstance(cache, LayerCache):
        if cache.page_table is not None:
            pool, table = cache.pages()
            rows = {name: paged_rows(buf, table) for name, buf in pool.items()}
        else:
            rows = cache.layer_rows()
        if cache.pending is not None:
            rows = {name: _put_rows(buf, cache.pending[name], cache.start_B) for name, buf in rows.items()}
        return rows
    return cache
