"""Attention through JAX's Pallas TPU splash-attention kernel (``attention_impl="splash"``).

The kernel (``jax.experimental.pallas.ops.tpu.splash_attention``) works per sequence on
q [H, T, D], k [K, S, D], v [K, S, E] with a static block mask and optional segment ids; it takes
grouped heads (H a multiple of K, MQA included) and a value head dim E != D (MLA) as they are, and
supplies its own backward kernels.  It does not scale q, so q is scaled here.  This wrapper maps
the model's mask onto it:

* Lengths are padded: T to a multiple of the query block, keys to a multiple of the key block
  (blocks are multiples of 128).  Padded queries are cut off; padded keys are masked.
* Full causal forward (``AttentionMask()``): the kernel's own ``CausalMask`` (whose fully masked
  blocks it skips), no segment ids.
* Cached prefill (queries at ``q0[b] .. q0[b] + T - 1`` over a cache of S keys, the first
  ``kv_lengths[b]`` filled): the mask differs per row but the kernel's is static, so each row's
  keys are rotated right by ``off[b] = C - q0[b]`` (C = padded S - padded T), which puts every
  row's queries at the same offset C: then "key s <= query position p" is the static
  ``CausalMask(offset=C)``, and "s < kv_lengths[b]" plus the rotated-in junk are segment ids
  (q: 0; k: 0 where ``0 <= s' - off[b] < kv_lengths[b]``, else 1).  Needs q0[b] + T <= S, which
  any cache write already does.
* ``interpret``: the TPU lowering runs where the program is lowered for a TPU (``jax.export`` to
  TPU from a CPU host included) and the Pallas interpreter elsewhere (``lax.platform_dependent``).
* Under a multi-device mesh (``jax.set_mesh``) the kernel runs per shard in ``jax.shard_map``: the
  batch over (data, fsdp) and the heads over tensor where they divide (else those are replicated),
  because Mosaic kernels cannot be partitioned automatically.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental.pallas.ops.tpu import splash_attention as sa
from jax.sharding import PartitionSpec as P

from ..core import AttentionMask, filled_BS

__all__ = ["splash_attention", "splash_refusal", "LANES"]

LANES = 128  # the kernel's blocks are multiples of this


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def splash_refusal(t: int, s: int) -> str | None:
    """Why the kernel cannot take T queries over S keys here, or None."""
    if s < t:
        return f"it needs at least as many keys as queries (causal self-attention), got T={t} queries, S={s} keys"
    return None


def _blocks(t: int, s: int, block_size: int) -> tuple[int, int, int, int]:
    """(query block, key block, padded T, padded S)."""
    blk = max(LANES, block_size // LANES * LANES)
    bq = min(blk, _round_up(t, LANES))
    tp = _round_up(t, bq)
    bkv = min(blk, _round_up(s + tp - t, LANES))
    return bq, bkv, tp, _round_up(s + tp - t, bkv)


def _run(q_BHTD, k_BKSD, v_BKSE, seg_q_BT=None, seg_kv_BS=None, *, offset: int, blocks: tuple, interpret: bool):
    """The kernel on per-shard arrays (local head count), vmapped over the batch."""
    bq, bkv = blocks
    h, tp = q_BHTD.shape[1:3]
    sp = k_BKSD.shape[2]
    sizes = sa.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv, block_q_dkv=bq, block_kv_dkv=bkv,
                          block_kv_dkv_compute=bkv, block_q_dq=bq, block_kv_dq=bkv)
    mask = sa.MultiHeadMask([sa.CausalMask((tp, sp), offset=offset)] * h)
    kernel = sa.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)
    if seg_q_BT is None:
        return jax.vmap(kernel)(q_BHTD, k_BKSD, v_BKSE)
    return jax.vmap(lambda q, k, v, sq, skv: kernel(q, k, v, segment_ids=sa.SegmentIds(sq, skv)))(
        q_BHTD, k_BKSD, v_BKSE, seg_q_BT, seg_kv_BS)


def _mesh_specs(b: int, h: int, kv: int):
    """(mesh, batch axes, head axis, kv-head axis) for running under the ambient mesh, or None."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or math.prod(mesh.shape.values()) == 1:
        return None
    batch = tuple(a for a in ("data", "fsdp") if mesh.shape.get(a, 1) > 1)
    batch = batch if batch and b % math.prod(mesh.shape[a] for a in batch) == 0 else None
    n = mesh.shape.get("tensor", 1)
    head = "tensor" if n > 1 and h % n == 0 and (kv % n == 0 or kv == 1) else None
    return mesh, batch, head, (head if head and kv % n == 0 else None)


def splash_attention(q_BTHD: jax.Array, k_BSKD: jax.Array, v_BSKE: jax.Array, mask: AttentionMask, *,
                     scale: float, block_size: int = 512) -> jax.Array:
    """softmax(scale q k^T, masked) v -> [B, T, H, E] (the :func:`core.attend` contract) by the splash kernel."""
    b, t, h, _ = q_BTHD.shape
    s, kv = k_BSKD.shape[1:3]
    bq, bkv, tp, sp = _blocks(t, s, block_size)
    pad = lambda x, n: jnp.pad(x, ((0, 0), (0, n - x.shape[1])) + ((0, 0),) * (x.ndim - 2))
    q_BTHD = pad((q_BTHD * scale).astype(q_BTHD.dtype), tp)
    k_BSKD, v_BSKE = pad(k_BSKD, sp), pad(v_BSKE, sp)
    offset = sp - tp  # the full forward has S == T: offset 0, padded keys come after every real query
    args = [q_BTHD.transpose(0, 2, 1, 3)]
    if not mask.is_causal:
        q_pos_BT, kv_len_B = mask.arrays(b, t, s)
        shift_B = offset - q_pos_BT[:, 0]  # row b's keys move right by this
        source_BS = jnp.arange(sp, dtype=jnp.int32)[None, :] - shift_B[:, None]  # the key a slot holds
        rotate = jax.vmap(lambda x, i: jnp.take(x, i, axis=0))
        k_BSKD, v_BSKE = rotate(k_BSKD, source_BS % sp), rotate(v_BSKE, source_BS % sp)
        filled = jax.vmap(lambda n, pos: filled_BS(n[None], pos)[0])(kv_len_B, source_BS) & (source_BS >= 0)
        segments = (jnp.zeros((b, tp), jnp.int32), jnp.where(filled, 0, 1).astype(jnp.int32))
    args += [k_BSKD.transpose(0, 2, 1, 3), v_BSKE.transpose(0, 2, 1, 3)]
    if not mask.is_causal:
        args += list(segments)
    run = functools.partial(_run, offset=offset, blocks=(bq, bkv))

    def call(*xs):
        return lax.platform_dependent(*xs, tpu=functools.partial(run, interpret=False),
                                      default=functools.partial(run, interpret=True))

    specs = _mesh_specs(b, h, kv)
    if specs is not None:
        mesh, batch, head, kv_head = specs
        in_specs = (P(batch, head), P(batch, kv_head), P(batch, kv_head), P(batch), P(batch))[:len(args)]
        call = jax.shard_map(call, mesh=mesh, in_specs=in_specs, out_specs=P(batch, head), check_vma=False)
    o_BHTE = call(*args)
    return o_BHTE.transpose(0, 2, 1, 3)[:, :t]
