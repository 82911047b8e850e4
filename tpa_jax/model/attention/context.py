"""Context-parallel attention: the sequence is split over the mesh's ``context`` axis and the
devices exchange what each mechanism caches per token -- TPA's factors (A_K, B~_K, A_V, B_V),
MHA/GQA's K and V, MLA's c_KV and k_R -- never a K or V built from factors.

Under a mesh whose ``context`` axis has C > 1 devices, the full forward (training, evaluation) of
every mechanism calls :func:`context_attention` with its queries, its *items* (the per-token
tensors its decode cache would hold, computed under the ordinary sharding) and an ``expand``
function that turns a block of items into keys and values.  Inside ``jax.shard_map`` over
``context`` alone (data, fsdp and tensor stay automatic) each device holds T / C queries and items:

* ``context_impl="ring"``: C steps; at step s device i attends to the items of device i - s
  (a ``ppermute`` passes them on while the block is computed) with the blocked online softmax
  (``blocked.blocked_attention_lse``), and the partial results are merged exactly by their
  log-sum-exps.  Each step is rematerialised in the backward pass, so a device keeps the
  items it received, not the keys and values expanded from them.
* ``context_impl="allgather"``: one ``all_gather`` of the items, then blocked attention over all
  keys.

Which tokens a device holds (``context_layout``): ``"contiguous"``: device i holds positions
i T/C .. (i + 1) T/C - 1, so under the causal mask device C - 1 works C times as much as device 0;
``"striped"`` (the default): device i holds i, i + C, i + 2C, ..., so every device sees the same
amount of work.  The model lays a striped sequence out by permuting the tokens once at the input
and the hidden states back once before the output head (:func:`stripe` / :func:`unstripe`).

The one mask rule (key at position k visible to a query at p iff k <= p) is evaluated on each
block by mapping positions into the block's own index: the keys of device j sit at positions
``base_j + stride * 0..T/C-1`` (contiguous: base j T/C, stride 1; striped: base j, stride C), and
``k <= p`` iff ``index <= floor((p - base_j) / stride)``, so the blocked kernel's causal block
skipping applies unchanged (a contiguous block entirely in a query's future costs nothing).
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from ...config import ModelConfig
from .blocked import blocked_attention_lse

AXIS = "context"
Items = dict[str, jax.Array]
# items [B, S, ...] of S keys -> (k [B, S, K, D], v [B, S, K, E])
Expand = Callable[[Items], tuple[jax.Array, jax.Array]]


def context_size() -> int:
    """Devices on the ambient mesh's ``context`` axis (1 without a mesh or without the axis)."""
    mesh = jax.sharding.get_abstract_mesh()
    return 1 if mesh.empty else dict(mesh.shape).get(AXIS, 1)


def varying(x: jax.Array) -> jax.Array:
    """``x`` (a weight closed over by an ``expand`` function) marked as varying over the manual mesh
    axes when called inside the context-parallel ``shard_map``; unchanged elsewhere.  Call it on the
    float32 parameter *before* casting it to the compute dtype: the gradient's sum over the context
    axis then runs in float32, as the rest of the gradient reduction does (and XLA's CPU backend
    cannot promote a bfloat16 sum whose reducer carries a sharding annotation)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    manual = tuple(a for a, kind in zip(mesh.axis_names, mesh.axis_types) if kind == jax.sharding.AxisType.Manual)
    return jax.lax.pcast(x, manual, to="varying") if manual else x


def check_divides(length: int, context: int, what: str = "sequence length") -> None:
    """A one-line error unless ``context`` divides ``length``."""
    if length % context:
        raise ValueError(f"context parallelism: the {what} {length} is not divisible by the mesh's "
                         f"context axis {context}")


def stripe(x: jax.Array, c: int, axis: int = 1) -> jax.Array:
    """Lay ``x`` out striped along ``axis`` (length T = C T/C): entry i T/C + n holds position i + C n,
    so that shard i of a contiguous split holds positions i, i + C, i + 2C, ... (one reshape and
    transpose: an all-to-all when the axis is sharded)."""
    shape = x.shape
    x = x.reshape(shape[:axis] + (shape[axis] // c, c) + shape[axis + 1:])
    return jnp.swapaxes(x, axis, axis + 1).reshape(shape)


def unstripe(x: jax.Array, c: int, axis: int = 1) -> jax.Array:
    """Inverse of :func:`stripe`: back to position order."""
    shape = x.shape
    x = x.reshape(shape[:axis] + (c, shape[axis] // c) + shape[axis + 1:])
    return jnp.swapaxes(x, axis, axis + 1).reshape(shape)


def _positions(layout: str, shard: jax.Array, tc: int, c: int) -> tuple[jax.Array, jax.Array, int]:
    """(base, positions int32 [tc], stride) of the tokens shard ``shard`` holds."""
    base, stride = (shard * tc, 1) if layout == "contiguous" else (shard, c)
    return base, base + stride * jnp.arange(tc, dtype=jnp.int32), stride


def _merge(o_BTHE: jax.Array, lse_BTH: jax.Array, o2_BTHE: jax.Array, lse2_BTH: jax.Array):
    """Attention over the union of two disjoint key sets from each one's (o, lse); -inf: no key."""
    m = jnp.maximum(lse_BTH, lse2_BTH)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    w1, w2 = jnp.exp(lse_BTH - m), jnp.exp(lse2_BTH - m)
    total = w1 + w2
    seen = total > 0
    total = jnp.where(seen, total, 1.0)
    o = (w1[..., None] * o_BTHE + w2[..., None] * o2_BTHE) / total[..., None]
    return o, jnp.where(seen, m + jnp.log(total), -jnp.inf)


def context_attention(cfg: ModelConfig, q_BTHD: jax.Array, items: Items, expand: Expand) -> jax.Array:
    """Causal softmax(scale q k^T) v of the full forward, [B, T, H, E], with the length axis split over
    the ambient mesh's ``context`` axis: devices exchange ``items`` and expand them to keys and
    values block by block (module doc).  ``q`` and ``items`` are laid out by ``cfg.context_layout``
    (the model stripes its sequence); query and key positions are the layout's."""
    c = context_size()
    t = q_BTHD.shape[1]
    check_divides(t, c)
    tc = t // c
    layout, impl = cfg.context_layout, cfg.context_impl
    kw = dict(scale=cfg.attn_scale, block_size=cfg.attention_block_size)
    mesh = jax.sharding.get_abstract_mesh()

    def attend_block(q_BTHD, items, q_pos_T, src):
        """(o, lse) of this shard's queries against the items of shard ``src``."""
        base, _, stride = _positions(layout, src, tc, c)
        k_BSKD, v_BSKE = expand(items)
        local_q_T = jnp.floor_divide(q_pos_T - base, stride)  # key index i visible iff i <= this
        return blocked_attention_lse(q_BTHD, k_BSKD, v_BSKE, local_q_T[None], jnp.full((1,), tc, jnp.int32), **kw)

    def ring(q_BTHD, items):
        me = jax.lax.axis_index(AXIS)
        q_pos_T = _positions(layout, me, tc, c)[1]
        step = jax.checkpoint(attend_block)
        # Unrolled (C steps): the collective-permutes stay visible to XLA's scheduler, which can
        # overlap each transfer with the previous block's compute.  (A lax.scan here would compile
        # faster, but its transpose cannot yet handle closed-over weights inside shard_map.)
        o_BTHE = lse_BTH = None
        for s in range(c):  # attend to the items of shard me - s while they travel on to me + 1
            ahead = jax.lax.ppermute(items, AXIS, [(j, (j + 1) % c) for j in range(c)]) if s < c - 1 else None
            o_s, lse_s = step(q_BTHD, items, q_pos_T, (me - s) % c)
            o_BTHE, lse_BTH = (o_s, lse_s) if s == 0 else _merge(o_BTHE, lse_BTH, o_s, lse_s)
            items = ahead
        return o_BTHE.astype(q_BTHD.dtype)

    def gathered(q_BTHD, items):
        me = jax.lax.axis_index(AXIS)
        q_pos_T = _positions(layout, me, tc, c)[1]
        every = jax.lax.all_gather(items, AXIS, axis=1, tiled=True)  # [B, T, ...] in shard order
        if layout == "striped":  # back to position order
            every = jax.tree.map(lambda x: unstripe(x, c), every)
        k_BSKD, v_BSKE = expand(every)
        o_BTHE, _ = blocked_attention_lse(q_BTHD, k_BSKD, v_BSKE, q_pos_T[None], jnp.full((1,), t, jnp.int32), **kw)
        return o_BTHE.astype(q_BTHD.dtype)

    body = ring if impl == "ring" else gathered
    spec = P(None, AXIS)
    return jax.shard_map(body, mesh=mesh, in_specs=(spec, jax.tree.map(lambda _: spec, items)), out_specs=spec,
                         axis_names={AXIS})(q_BTHD, items)
