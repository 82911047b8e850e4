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


def attend_one(q_B1HD: jax.Array, k_BSKD: jax.Array, v_BSKE: jax.Array, *, scale: float, visible_BS: jax.Array,
               streaming: bool) -> jax.Array:
    """One query token per sequence against the cache rows ``visible_BS``: o [B, 1, H, E], float32 softmax.

    ``streaming`` (used on a CPU) reads the cache in its own [B, S, K, D] order: each contraction
    is one plain matmul over its contiguous rows -- the logits [S, K D] x [K D, H] against
    block-diagonal queries (query head h meets only kv head h // G's features), the output
    [H, S] x [S, K E] of which each head keeps its own kv head's block.  The K-fold extra flops are
    cheap next to streaming the cache, and no transposed copy of it is made, as :func:`attend`'s
    head-major einsums make on a CPU (which this falls back to otherwise).
    """
    if not streaming:
        return attend(q_B1HD, k_BSKD, v_BSKE, scale=scale, mask_BTS=visible_BS[:, None])
    b, _, h, d = q_B1HD.shape
    s, kv, e = k_BSKD.shape[1], k_BSKD.shape[2], v_BSKE.shape[-1]
    g = h // kv
    eye_KJ = jnp.eye(kv, dtype=q_B1HD.dtype)
    q_bd_BCN = jnp.einsum("bkgd,kj->bkdjg", q_B1HD.reshape(b, kv, g, d), eye_KJ).reshape(b, kv * d, h)
    logits_BSH = jnp.einsum("bsc,bcn->bsn", k_BSKD.reshape(b, s, kv * d), q_bd_BCN.astype(k_BSKD.dtype),
                            preferred_element_type=jnp.float32) * scale
    logits_BSH = jnp.where(visible_BS[:, :, None], logits_BSH, jnp.finfo(jnp.float32).min)
    probs_BSH = jax.nn.softmax(logits_BSH, axis=1)
    o_BHJE = jnp.einsum("bsn,bsc->bnc", probs_BSH.astype(v_BSKE.dtype), v_BSKE.reshape(b, s, kv * e))
    o_BHE = jnp.einsum("bkgje,kj->bkge", o_BHJE.reshape(b, kv, g, kv, e), eye_KJ.astype(o_BHJE.dtype))
    return o_BHE.reshape(b, 1, h, e)


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
    """[per-head RMSNorm] then concatenate the heads and apply W_O (eq. 3.3): [B, T, M]."""
    if norm is not None:
        o_BTHE = norm(o_BTHE)
    return jnp.einsum("bthe,hem->btm", cast(o_BTHE, cfg), cast(w_o_HEM, cfg))


# ----------------------------------------------------------------------------------------- caches
class LayerCache(NamedTuple):
    """Layer ``index`` of the model's stacked decode cache, ``layers`` {name: [L, B, S, ...]}: what
    the layer loop hands each layer, so that a layer writes its new tokens into the stack in place
    and reads its rows straight from it (no per-layer slice is copied out and stacked back)."""

    layers: dict[str, jax.Array]
    index: jax.Array


def write_cache(cache: dict[str, jax.Array] | LayerCache, items: dict[str, jax.Array],
                start_B: jax.Array) -> dict[str, jax.Array] | LayerCache:
    """Write each new item [B, T, ...] at row ``start_B[b]`` of sequence b: into its cache leaf
    [B, S, ...], or into layer ``index`` of a :class:`LayerCache` stack (in place: read the rows
    after writing, from the returned cache)."""
    if isinstance(cache, LayerCache):
        b, t = next(iter(items.values())).shape[:2]
        s = next(iter(cache.layers.values())).shape[2]
        start_B = jnp.clip(start_B, 0, s - t)  # as dynamic_update_slice clamps the start
        rows_BT = start_B[:, None] + jnp.arange(t, dtype=start_B.dtype)[None, :]
        batch_BT = jnp.broadcast_to(jnp.arange(b)[:, None], (b, t))
        return LayerCache({name: buf.at[cache.index, batch_BT, rows_BT].set(items[name].astype(buf.dtype),
                                                                           mode="promise_in_bounds")
                           for name, buf in cache.layers.items()}, cache.index)

    def put(buf_S: jax.Array, new_T: jax.Array, start: jax.Array) -> jax.Array:
        return jax.lax.dynamic_update_slice_in_dim(buf_S, new_T.astype(buf_S.dtype), start, 0)

    return {name: jax.vmap(put)(cache[name], items[name], start_B) for name in cache}


def read_cache(cache: dict[str, jax.Array] | LayerCache) -> dict[str, jax.Array]:
    """The layer's cache leaves [B, S, ...] (of a :class:`LayerCache`: its layer of the stack)."""
    if isinstance(cache, LayerCache):
        return {name: jax.lax.dynamic_index_in_dim(buf, cache.index, 0, keepdims=False)
                for name, buf in cache.layers.items()}
    return cache
