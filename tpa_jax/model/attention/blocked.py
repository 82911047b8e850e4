"""Memory-efficient causal attention in plain JAX (``attention_impl="blocked"``): the same function
as :func:`core.attend`, computed over key blocks with a float32 online softmax and a hand-written
backward pass, so neither pass holds more than one [query tile, key block] block of scores.

Forward (per query tile of ``tq`` positions; ``lax.map`` over the tiles):

    for each key block j that some query of the tile can see:    (a dynamic-bound loop)
        z = scale q k_j^T, masked by the one rule (core.attention_mask) -> -inf
        m' = max(m, rowmax z);  p = exp(z - m');  l = e^{m - m'} l + rowsum p
        acc = e^{m - m'} acc + p v_j
    o = acc / l,  lse = m + log l   (rows that see no key: o = 0, lse = -inf)

Backward (FlashAttention-2 style, from the saved ``lse``; scores are recomputed, never stored):

    delta = rowsum(dO * o)
    for each key block j:  for each query tile i that can see block j:
        p = exp(z_ij - lse_i);  dv_j += p^T dO_i;  dp = dO_i v_j^T;  ds = p (dp - delta_i)
        dk_j += scale ds^T q_i;  dq_i += scale ds k_j

Causal block skipping: tile i only visits key blocks below ``min(max position in the tile + 1,
max kv length)``, and block j only the tiles whose largest position reaches it, so a causal
forward over n tiles computes n (n + 1) / 2 blocks instead of n^2, and keys past every length are
never touched.  The loops have data-dependent bounds (``while`` loops), which is why the gradient
comes from ``jax.custom_vjp`` and not from differentiating the loops.

Grouped heads are folded as in :func:`core.attend`: the G query heads of a kv head are rows of
that kv head's tile (ordered (t, g)), so every contraction is a batched matmul over [B, K].  The
last key block's start is clamped to ``S - block`` and the keys it shares with the previous block
are masked (no padded copy of K and V); T is padded to a tile multiple with positions -1, which see
nothing and are sliced off.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from .core import attention_mask

__all__ = ["blocked_attention", "blocked_attention_lse", "blocked_block_grads", "block_counts"]

_F32 = jnp.float32


def _cdiv(a, b):
    return (a + b - 1) // b


class _Tiled(NamedTuple):
    """The loops' layout: queries [Q, B, K, tq G, D] (tile index first, rows ordered (t, g)), keys
    [B, K, S, D], values [B, K, S, E], query positions [Q, B, tq] and kv lengths [B]."""

    q_QBKTD: jax.Array
    k_BKSD: jax.Array
    v_BKSE: jax.Array
    pos_QBT: jax.Array
    kv_len_B: jax.Array


def _tile_rows(x_BTHY: jax.Array, kv: int, tq: int) -> jax.Array:
    """[B, T, H, Y] (T a multiple of tq) -> [Q, B, K, tq G, Y]: query head h = k G + g reads kv head k."""
    b, t, h, y = x_BTHY.shape
    x = x_BTHY.reshape(b, t // tq, tq, kv, h // kv, y).transpose(1, 0, 3, 2, 4, 5)
    return x.reshape(t // tq, b, kv, tq * (h // kv), y)


def _untile_rows(x_QBKTY: jax.Array, g: int, t: int) -> jax.Array:
    """Inverse of :func:`_tile_rows`, cut back to the first t positions: [B, t, H, Y]."""
    n_q, b, kv, rows, y = x_QBKTY.shape
    x = x_QBKTY.reshape(n_q, b, kv, rows // g, g, y).transpose(1, 0, 3, 2, 4, 5)
    return x.reshape(b, n_q * (rows // g), kv * g, y)[:, :t]


def _to_tiles(q_BTHD, k_BSKD, v_BSKE, q_pos_BT, kv_len_B, tq: int) -> _Tiled:
    b, t = q_BTHD.shape[:2]
    pad = _cdiv(t, tq) * tq - t
    if pad:  # padded queries sit at position -1: they see nothing and are cut off
        q_BTHD = jnp.pad(q_BTHD, ((0, 0), (0, pad), (0, 0), (0, 0)))
        q_pos_BT = jnp.pad(q_pos_BT, ((0, 0), (0, pad)), constant_values=-1)
    return _Tiled(_tile_rows(q_BTHD, k_BSKD.shape[2], tq), k_BSKD.transpose(0, 2, 1, 3),
                  v_BSKE.transpose(0, 2, 1, 3), q_pos_BT.reshape(b, -1, tq).swapaxes(0, 1), kv_len_B)


def _varying_axes(a: jax.Array) -> frozenset:
    """The manual mesh axes ``a`` varies over inside ``shard_map`` (empty outside)."""
    aval = jax.typeof(a)
    manual = getattr(aval, "manual_axis_type", None)  # jax >= 0.10; earlier releases: aval.vma
    return frozenset(manual.varying) if manual is not None else frozenset(getattr(aval, "vma", ()))


def varying_like(arrays, *inits: jax.Array) -> tuple[jax.Array, ...]:
    """``inits`` (a loop's initial carry) marked as varying over the manual mesh axes any of
    ``arrays`` varies over, so that loops type-check inside ``shard_map`` (context parallelism);
    unchanged elsewhere."""
    vma = frozenset().union(*(_varying_axes(a) for a in arrays))
    return tuple(lax.pcast(a, tuple(sorted(vma)), to="varying") for a in inits) if vma else inits


def _reach(pos_BT: jax.Array, kv_len_B: jax.Array, s: int) -> jax.Array:
    """Number of leading keys any of these queries can see: min(max position + 1, max length), in [0, S]."""
    return jnp.clip(jnp.minimum(jnp.max(pos_BT) + 1, jnp.max(kv_len_B)), 0, s)


def _key_block(x: _Tiled, j: jax.Array, pos_BT: jax.Array, g: int, bk: int):
    """Key block j: (k [B, K, bk, D], v [B, K, bk, E], visible [B, 1, tq G, bk]) for queries at
    ``pos_BT``.  The last block starts at S - bk; keys it shares with block j - 1 are masked."""
    s = x.k_BKSD.shape[2]
    nominal = j * bk
    start = jnp.minimum(nominal, s - bk)
    k_BKSD = lax.dynamic_slice_in_dim(x.k_BKSD, start, bk, axis=2)
    v_BKSE = lax.dynamic_slice_in_dim(x.v_BKSE, start, bk, axis=2)
    key_positions_S = start + jnp.arange(bk, dtype=jnp.int32)
    visible_BTS = attention_mask(pos_BT, x.kv_len_B, key_positions_S) & (key_positions_S >= nominal)[None, None]
    b, tq = pos_BT.shape
    visible = jnp.broadcast_to(visible_BTS[:, None, :, None], (b, 1, tq, g, bk)).reshape(b, 1, tq * g, bk)
    return k_BKSD, v_BKSE, visible, start


def _logits(q_BKTD: jax.Array, k_BKSD: jax.Array, visible: jax.Array, scale: float) -> jax.Array:
    z_BKTS = jnp.einsum("bktd,bksd->bkts", q_BKTD, k_BKSD, preferred_element_type=_F32) * scale
    return jnp.where(visible, z_BKTS, -jnp.inf)


def _forward(x: _Tiled, g: int, scale: float, bk: int):
    """o [Q, B, K, tq G, E] float32, lse [Q, B, K, tq G] float32 and the key blocks each tile computed [Q]."""
    s = x.k_BKSD.shape[2]
    e = x.v_BKSE.shape[-1]

    def tile(args):
        q_BKTD, pos_BT = args
        b, kv, rows = q_BKTD.shape[:3]

        def body(j, carry):
            m_BKT, l_BKT, acc_BKTE = carry
            k_BKSD, v_BKSE, visible, _ = _key_block(x, j, pos_BT, g, bk)
            z_BKTS = _logits(q_BKTD, k_BKSD, visible, scale)
            m_new = jnp.maximum(m_BKT, z_BKTS.max(-1))
            m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)  # rows with nothing visible yet
            p_BKTS = jnp.exp(z_BKTS - m_safe[..., None])
            alpha_BKT = jnp.exp(m_BKT - m_safe)
            pv_BKTE = jnp.einsum("bkts,bkse->bkte", p_BKTS.astype(v_BKSE.dtype), v_BKSE, preferred_element_type=_F32)
            return m_new, alpha_BKT * l_BKT + p_BKTS.sum(-1), alpha_BKT[..., None] * acc_BKTE + pv_BKTE

        n_blocks = _cdiv(_reach(pos_BT, x.kv_len_B, s), bk)
        init = varying_like(x, jnp.full((b, kv, rows), -jnp.inf, _F32), jnp.zeros((b, kv, rows), _F32),
                            jnp.zeros((b, kv, rows, e), _F32))
        m_BKT, l_BKT, acc_BKTE = lax.fori_loop(0, n_blocks, body, init)
        seen = l_BKT > 0
        o_BKTE = jnp.where(seen[..., None], acc_BKTE / jnp.where(seen, l_BKT, 1.0)[..., None], 0.0)
        lse_BKT = jnp.where(seen, m_BKT + jnp.log(jnp.where(seen, l_BKT, 1.0)), -jnp.inf)
        return o_BKTE, lse_BKT, n_blocks

    return lax.map(tile, (x.q_QBKTD, x.pos_QBT))


def _backward(x: _Tiled, o_QBKTE: jax.Array, lse_QBKT: jax.Array, do_QBKTE: jax.Array, g: int, scale: float,
              bk: int, dlse_QBKT=None):
    """(dq [Q, B, K, tq G, D], dk [B, K, S, D], dv [B, K, S, E], all float32; [query tile, key block]
    pairs computed).  ``dlse_QBKT``: the cotangent of the log-sum-exp output, when it has one
    (d lse / d z = p, so it enters as ``delta - dlse``)."""
    s = x.k_BKSD.shape[2]
    n_q = x.q_QBKTD.shape[0]
    delta_QBKT = jnp.sum(do_QBKTE.astype(_F32) * o_QBKTE, axis=-1)
    if dlse_QBKT is not None:
        delta_QBKT = delta_QBKT - jnp.where(jnp.isfinite(lse_QBKT), dlse_QBKT.astype(_F32), 0.0)
    lse_QBKT = jnp.where(jnp.isfinite(lse_QBKT), lse_QBKT, 0.0)  # rows that saw nothing: every p is 0
    tile_reach_Q = jnp.max(x.pos_QBT, axis=(1, 2)) + 1  # keys below this may be visible to tile i

    def key_block(j, carry):
        dq_QBKTD, dk_BKSD, dv_BKSE, count = carry
        b, kv = x.k_BKSD.shape[:2]

        def query_tile(i, inner):
            dq_QBKTD, dk_BKSD_j, dv_BKSE_j = inner
            q_BKTD, do_BKTE, pos_BT = x.q_QBKTD[i], do_QBKTE[i], x.pos_QBT[i]
            k_BKSD, v_BKSE, visible, _ = _key_block(x, j, pos_BT, g, bk)
            z_BKTS = _logits(q_BKTD, k_BKSD, visible, scale)
            p_BKTS = jnp.where(visible, jnp.exp(z_BKTS - lse_QBKT[i][..., None]), 0.0)
            dv_BKSE_j += jnp.einsum("bkts,bkte->bkse", p_BKTS.astype(do_BKTE.dtype), do_BKTE,
                                    preferred_element_type=_F32)
            dp_BKTS = jnp.einsum("bkte,bkse->bkts", do_BKTE, v_BKSE, preferred_element_type=_F32)
            ds_BKTS = (p_BKTS * (dp_BKTS - delta_QBKT[i][..., None]) * scale).astype(q_BKTD.dtype)
            dk_BKSD_j += jnp.einsum("bkts,bktd->bksd", ds_BKTS, q_BKTD, preferred_element_type=_F32)
            dq_BKTD = jnp.einsum("bkts,bksd->bktd", ds_BKTS, k_BKSD, preferred_element_type=_F32)
            return dq_QBKTD.at[i].add(dq_BKTD), dk_BKSD_j, dv_BKSE_j

        first = jnp.sum(tile_reach_Q <= j * bk)  # tiles before this one see no key of block j
        zeros = varying_like(x, jnp.zeros((b, kv, bk, x.k_BKSD.shape[-1]), _F32),
                             jnp.zeros((b, kv, bk, x.v_BKSE.shape[-1]), _F32))
        dq_QBKTD, dk_j, dv_j = lax.fori_loop(first, n_q, query_tile, (dq_QBKTD, *zeros))
        start = jnp.minimum(j * bk, s - bk)  # the clamped last block: shared keys got exact zeros
        add = lambda buf, new: lax.dynamic_update_slice_in_dim(
            buf, lax.dynamic_slice_in_dim(buf, start, bk, axis=2) + new, start, axis=2)
        return dq_QBKTD, add(dk_BKSD, dk_j), add(dv_BKSE, dv_j), count + n_q - first

    n_blocks = _cdiv(_reach(x.pos_QBT, x.kv_len_B, s), bk)
    init = varying_like(x, jnp.zeros(x.q_QBKTD.shape, _F32), jnp.zeros(x.k_BKSD.shape, _F32),
                        jnp.zeros(x.v_BKSE.shape, _F32), jnp.zeros((), jnp.int32))
    return lax.fori_loop(0, n_blocks, key_block, init)


def _sizes(q_BTHD: jax.Array, k_BSKD: jax.Array, block_size: int) -> tuple[int, int, int]:
    """(G, query tile, key block) for these shapes."""
    return q_BTHD.shape[2] // k_BSKD.shape[2], max(1, min(block_size, q_BTHD.shape[1])), \
        max(1, min(block_size, k_BSKD.shape[1]))


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _blocked(q_BTHD, k_BSKD, v_BSKE, q_pos_BT, kv_len_B, scale: float, block_size: int):
    return _blocked_fwd(q_BTHD, k_BSKD, v_BSKE, q_pos_BT, kv_len_B, scale, block_size)[0]


def _tiled_forward(q_BTHD, k_BSKD, v_BSKE, q_pos_BT, kv_len_B, scale, block_size):
    """(G, o [Q, B, K, tq G, E], lse [Q, B, K, tq G], the backward's residuals)."""
    g, tq, bk = _sizes(q_BTHD, k_BSKD, block_size)
    x = _to_tiles(q_BTHD, k_BSKD, v_BSKE, q_pos_BT, kv_len_B, tq)
    o_QBKTE, lse_QBKT, _ = _forward(x, g, scale, bk)
    return g, o_QBKTE, lse_QBKT, (q_BTHD, k_BSKD, v_BSKE, q_pos_BT, kv_len_B, o_QBKTE, lse_QBKT)


def _blocked_fwd(q_BTHD, k_BSKD, v_BSKE, q_pos_BT, kv_len_B, scale, block_size):
    g, o_QBKTE, _, res = _tiled_forward(q_BTHD, k_BSKD, v_BSKE, q_pos_BT, kv_len_B, scale, block_size)
    return _untile_rows(o_QBKTE, g, q_BTHD.shape[1]).astype(jnp.result_type(v_BSKE)), res


def _blocked_bwd(scale, block_size, res, do_BTHE, dlse_QBKT=None):
    q_BTHD, k_BSKD, v_BSKE, q_pos_BT, kv_len_B, o_QBKTE, lse_QBKT = res
    g, tq, bk = _sizes(q_BTHD, k_BSKD, block_size)
    x = _to_tiles(q_BTHD, k_BSKD, v_BSKE, q_pos_BT, kv_len_B, tq)
    t_pad = x.pos_QBT.shape[0] * tq - q_BTHD.shape[1]
    do_QBKTE = _tile_rows(jnp.pad(do_BTHE, ((0, 0), (0, t_pad), (0, 0), (0, 0))), k_BSKD.shape[2], tq)
    dq_QBKTD, dk_BKSD, dv_BKSE, _ = _backward(x, o_QBKTE, lse_QBKT, do_QBKTE, g, scale, bk, dlse_QBKT)
    dq_BTHD = _untile_rows(dq_QBKTD, g, q_BTHD.shape[1]).astype(q_BTHD.dtype)
    return (dq_BTHD, dk_BKSD.transpose(0, 2, 1, 3).astype(k_BSKD.dtype),
            dv_BKSE.transpose(0, 2, 1, 3).astype(v_BSKE.dtype), None, None)


_blocked.defvjp(_blocked_fwd, _blocked_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _blocked_lse(q_BTHD, k_BSKD, v_BSKE, q_pos_BT, kv_len_B, scale: float, block_size: int):
    return _blocked_lse_fwd(q_BTHD, k_BSKD, v_BSKE, q_pos_BT, kv_len_B, scale, block_size)[0]


def _blocked_lse_fwd(q_BTHD, k_BSKD, v_BSKE, q_pos_BT, kv_len_B, scale, block_size):
    g, o_QBKTE, lse_QBKT, res = _tiled_forward(q_BTHD, k_BSKD, v_BSKE, q_pos_BT, kv_len_B, scale, block_size)
    t = q_BTHD.shape[1]
    return (_untile_rows(o_QBKTE, g, t), _untile_rows(lse_QBKT[..., None], g, t)[..., 0]), res


def _blocked_lse_bwd(scale, block_size, res, cotangents):
    do_BTHE, dlse_BTH = cotangents
    q_BTHD, k_BSKD, lse_QBKT = res[0], res[1], res[6]
    tq = _sizes(q_BTHD, k_BSKD, block_size)[1]
    pad = lse_QBKT.shape[0] * tq - q_BTHD.shape[1]
    dlse_QBKT = _tile_rows(jnp.pad(dlse_BTH, ((0, 0), (0, pad), (0, 0)))[..., None], k_BSKD.shape[2], tq)[..., 0]
    return _blocked_bwd(scale, block_size, res, do_BTHE, dlse_QBKT)


_blocked_lse.defvjp(_blocked_lse_fwd, _blocked_lse_bwd)


def blocked_block_grads(q_BTHD: jax.Array, k_BSKD: jax.Array, v_BSKE: jax.Array, q_positions_BT: jax.Array,
                        kv_lengths_B: jax.Array, o_BTHE: jax.Array, lse_BTH: jax.Array, do_BTHE: jax.Array, *,
                        scale: float, block_size: int = 512) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(dq, dk, dv), float32, of one block of keys when the softmax runs over more keys than these:
    ``o`` and ``lse`` are the attention output and log-sum-exp over *all* keys, so the block's
    probabilities are exp(scale q k^T - lse) and dS = P (dP - rowsum(do o)) as in any blocked
    backward pass.  Summing the blocks' dq, and taking each block's dk and dv, gives the gradients
    of the whole attention (the ring's backward pass, ``context.py``)."""
    q_pos_BT, kv_len_B = _mask_args(q_BTHD, q_positions_BT, kv_lengths_B)
    tq, kv = _sizes(q_BTHD, k_BSKD, block_size)[1], k_BSKD.shape[2]
    pad = -q_BTHD.shape[1] % tq
    o_QBKTE = _tile_rows(jnp.pad(o_BTHE.astype(_F32), ((0, 0), (0, pad), (0, 0), (0, 0))), kv, tq)
    lse_QBKT = _tile_rows(jnp.pad(lse_BTH, ((0, 0), (0, pad), (0, 0)))[..., None], kv, tq)[..., 0]
    res = (q_BTHD, k_BSKD, v_BSKE, q_pos_BT, kv_len_B, o_QBKTE, lse_QBKT)
    return _blocked_bwd(float(scale), int(block_size), res, do_BTHE)[:3]


def _mask_args(q_BTHD: jax.Array, q_positions_BT: jax.Array, kv_lengths_B: jax.Array) -> tuple[jax.Array, jax.Array]:
    b, t = q_BTHD.shape[:2]
    return (jnp.broadcast_to(jnp.asarray(q_positions_BT, jnp.int32), (b, t)),
            jnp.broadcast_to(jnp.asarray(kv_lengths_B, jnp.int32), (b,)))


def blocked_attention(q_BTHD: jax.Array, k_BSKD: jax.Array, v_BSKE: jax.Array, q_positions_BT: jax.Array,
                      kv_lengths_B: jax.Array, *, scale: float, block_size: int = 512) -> jax.Array:
    """softmax(scale q k^T, masked) v -> [B, T, H, E] like :func:`core.attend`, with the mask given
    compactly (``q_positions_BT`` int [B, T], ``kv_lengths_B`` int [B], keys at 0..S-1) and
    ``block_size`` queries per tile and keys per block.  A query that sees no key gives 0."""
    q_pos_BT, kv_len_B = _mask_args(q_BTHD, q_positions_BT, kv_lengths_B)
    return _blocked(q_BTHD, k_BSKD, v_BSKE, q_pos_BT, kv_len_B, float(scale), int(block_size))


def blocked_attention_lse(q_BTHD: jax.Array, k_BSKD: jax.Array, v_BSKE: jax.Array, q_positions_BT: jax.Array,
                          kv_lengths_B: jax.Array, *, scale: float, block_size: int = 512
                          ) -> tuple[jax.Array, jax.Array]:
    """:func:`blocked_attention` that also returns each query row's log-sum-exp of its visible
    logits: (o [B, T, H, E] float32, lse [B, T, H] float32; -inf and o = 0 for a row that sees no
    key), both differentiable -- what merging attention over disjoint key sets needs
    (context-parallel rings: o = sum_i exp(lse_i - lse) o_i with lse = logsumexp_i lse_i)."""
    q_pos_BT, kv_len_B = _mask_args(q_BTHD, q_positions_BT, kv_lengths_B)
    return _blocked_lse(q_BTHD, k_BSKD, v_BSKE, q_pos_BT, kv_len_B, float(scale), int(block_size))


def block_counts(q_BTHD: jax.Array, k_BSKD: jax.Array, v_BSKE: jax.Array, q_positions_BT: jax.Array,
                 kv_lengths_B: jax.Array, *, block_size: int) -> tuple[int, int]:
    """How many [query tile, key block] pairs the forward and the backward pass compute for these
    shapes and mask (the loops' own counters; for tests of the block skipping)."""
    q_pos_BT, kv_len_B = _mask_args(q_BTHD, q_positions_BT, kv_lengths_B)
    g, tq, bk = _sizes(q_BTHD, k_BSKD, block_size)
    x = _to_tiles(q_BTHD, k_BSKD, v_BSKE, q_pos_BT, kv_len_B, tq)
    o_QBKTE, lse_QBKT, fwd_Q = _forward(x, g, 1.0, bk)
    bwd = _backward(x, o_QBKTE, lse_QBKT, jnp.zeros_like(o_QBKTE), g, 1.0, bk)[-1]
    return int(jnp.sum(fwd_Q)), int(bwd)
