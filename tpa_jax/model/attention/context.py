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
  log-sum-exps.  The backward pass sends the items round again with float32 gradient
  accumulators beside them (a custom VJP), so a device keeps only its own queries, items, output
  and log-sum-exp; an expansion that closes over weights is differentiated by JAX instead.
  Decoding over a cache split on the same axis merges per-device partials the same way
  (:func:`sharded_cache_attention`).
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
from .blocked import blocked_attention_lse, blocked_block_grads
from .core import merge_parts

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

    # The ring's steps run one at a time (a scan), so memory holds one step's keys and values.  When
    # ``expand`` uses only the items (TPA, MHA/GQA/MQA), the ring has its own backward pass
    # (``_ring_vjp``): it keeps only this shard's queries, items, output and log-sum-exp, and sends
    # the items round again with their gradients travelling beside them.  An expansion that closes
    # over weights (MLA's up-projections, TPA's constant factors) is differentiated by JAX through
    # rematerialised steps instead, unrolled: a scan's transpose cannot yet take weights closed over
    # from outside the shard_map.
    example = jax.tree.map(lambda x: jax.ShapeDtypeStruct((x.shape[0], tc) + x.shape[2:], x.dtype), items)
    closes_over_weights = bool(jax.make_jaxpr(expand)(example).consts)
    pass_on = lambda x: jax.lax.ppermute(x, AXIS, [(j, (j + 1) % c) for j in range(c)])

    def ring_forward(q_BTHD, items, step):
        """(o [B, T/C, H, E] float32, lse): attend to the items of shard me - s at step s while they
        travel on to shard me + 1."""
        me = jax.lax.axis_index(AXIS)
        q_pos_T = _positions(layout, me, tc, c)[1]

        def body(carry, s):
            o_BTHE, lse_BTH, items = carry
            ahead = pass_on(items)
            o_s, lse_s = step(q_BTHD, items, q_pos_T, (me - s) % c)
            return (*merge_parts(o_BTHE, lse_BTH, o_s, lse_s), ahead), None

        carry = (*step(q_BTHD, items, q_pos_T, me), pass_on(items))  # step 0: this shard's own items
        if closes_over_weights:
            for s in range(1, c - 1):
                carry = jax.lax.optimization_barrier(body(carry, s)[0])
        elif c > 2:
            carry, _ = jax.lax.scan(body, carry, jnp.arange(1, c - 1))
        o_BTHE, lse_BTH, ahead = carry
        o_s, lse_s = step(q_BTHD, ahead, q_pos_T, (me + 1) % c)  # step C - 1: nothing left to pass on
        return merge_parts(o_BTHE, lse_BTH, o_s, lse_s)

    def ring_backward(q_BTHD, items, o_BTHE, lse_BTH, do_BTHE):
        """(dq, d items): the items go round again; each device adds its queries' gradient with
        respect to the block it holds to the accumulator travelling with the block, and a last
        pass brings every accumulator home."""
        me = jax.lax.axis_index(AXIS)
        q_pos_T = _positions(layout, me, tc, c)[1]
        zeros = lambda x: jax.lax.pcast(jnp.zeros(x.shape, jnp.float32), (AXIS,), to="varying")

        def block(items, s):
            base, _, stride = _positions(layout, (me - s) % c, tc, c)
            (k_BSKD, v_BSKE), pullback = jax.vjp(expand, items)
            local_q_T = jnp.floor_divide(q_pos_T - base, stride)
            dq, dk, dv = blocked_block_grads(q_BTHD, k_BSKD, v_BSKE, local_q_T[None], jnp.full((1,), tc, jnp.int32),
                                             o_BTHE, lse_BTH, do_BTHE, **kw)
            return dq.astype(jnp.float32), pullback((dk.astype(k_BSKD.dtype), dv.astype(v_BSKE.dtype)))[0]

        def body(carry, s):
            dq_BTHD, items, acc = carry
            dq_s, d_items = block(items, s)
            acc = jax.tree.map(lambda a, d: a + d.astype(jnp.float32), acc, d_items)
            return (dq_BTHD + dq_s, *pass_on((items, acc))), None

        carry = (zeros(q_BTHD), items, jax.tree.map(zeros, items))
        carry, _ = jax.lax.scan(body, carry, jnp.arange(c - 1))
        dq_BTHD, items, acc = carry
        dq_s, d_items = block(items, c - 1)
        acc = pass_on(jax.tree.map(lambda a, d: a + d.astype(jnp.float32), acc, d_items))  # home
        return dq_BTHD + dq_s, acc

    @jax.custom_vjp
    def ring_vjp(q_BTHD, items):
        return ring_forward(q_BTHD, items, attend_block)[0].astype(q_BTHD.dtype)

    def ring_vjp_fwd(q_BTHD, items):
        o_BTHE, lse_BTH = ring_forward(q_BTHD, items, attend_block)
        return o_BTHE.astype(q_BTHD.dtype), (q_BTHD, items, o_BTHE, lse_BTH)

    def ring_vjp_bwd(res, do_BTHE):
        q_BTHD, items = res[0], res[1]
        dq_BTHD, d_items = ring_backward(*res, do_BTHE)
        return dq_BTHD.astype(q_BTHD.dtype), jax.tree.map(lambda d, x: d.astype(x.dtype), d_items, items)

    ring_vjp.defvjp(ring_vjp_fwd, ring_vjp_bwd)

    def ring(q_BTHD, items):
        if closes_over_weights or c == 1:
            return ring_forward(q_BTHD, items, jax.checkpoint(attend_block))[0].astype(q_BTHD.dtype)
        return ring_vjp(q_BTHD, items)

    def gathered(q_BTHD, items):
        me = jax.lax.axis_index(AXIS)
        q_pos_T = _positions(layout, me, tc, c)[1]
        every = jax.tree.map(_gather, items)  # [B, T, ...] in shard order
        if layout == "striped":  # back to position order
            every = jax.tree.map(lambda x: unstripe(x, c), every)
        k_BSKD, v_BSKE = expand(every)
        o_BTHE, _ = blocked_attention_lse(q_BTHD, k_BSKD, v_BSKE, q_pos_T[None], jnp.full((1,), t, jnp.int32), **kw)
        return o_BTHE.astype(q_BTHD.dtype)

    body = ring if impl == "ring" else gathered
    spec = P(None, AXIS)
    return jax.shard_map(body, mesh=mesh, in_specs=(spec, jax.tree.map(lambda _: spec, items)), out_specs=spec,
                         axis_names={AXIS})(q_BTHD, items)


@jax.custom_vjp
def _gather(x: jax.Array) -> jax.Array:
    """All-gather along the length axis (tiled); the gradient is reduce-scattered in float32."""
    return jax.lax.all_gather(x, AXIS, axis=1, tiled=True)


def _gather_fwd(x):
    return _gather(x), None


def _gather_bwd(_, g):
    return (jax.lax.psum_scatter(g.astype(jnp.float32), AXIS, scatter_dimension=1, tiled=True).astype(g.dtype),)


_gather.defvjp(_gather_fwd, _gather_bwd)


# ------------------------------------------------------------------- decoding over a sharded cache
Partial = Callable[[Items, Items, jax.Array, jax.Array], tuple[jax.Array, jax.Array]]


def expanded_partial(cfg: ModelConfig, expand: Expand) -> Partial:
    """A :data:`Partial` that expands a shard's items to keys and values and runs the blocked kernel
    (queries ``{"q": [B, T, H, D]}``)."""
    def partial(queries: Items, items: Items, q_pos_BT: jax.Array, kv_len_B: jax.Array):
        k_BSKD, v_BSKE = expand(items)
        return blocked_attention_lse(queries["q"], k_BSKD, v_BSKE, q_pos_BT, kv_len_B, scale=cfg.attn_scale,
                                     block_size=cfg.attention_block_size)
    return partial


def sharded_cache_attention(queries: Items, items: Items, start_B: jax.Array, partial: Partial) -> jax.Array:
    """Cached attention of T new tokens (positions ``start_B + 0..T-1``, already written into the
    cache) against a cache whose length axis is split over the ambient mesh's ``context`` axis.

    Each device attends only to its own S / C rows -- key i of shard j is cache row j S / C + i --
    through ``partial(queries, items, q_positions, kv_lengths) -> (o [B, T, H, E], lse [B, T, H])``
    in the shard's own row coordinates (a row past the shard's filled part, or a shard holding no
    visible row, gives lse = -inf).  The partial results are merged exactly: with m the largest
    lse over shards, o = sum_j e^(lse_j - m) o_j / sum_j e^(lse_j - m) (two sums and a max over the
    axis; only [B, T, H, E] numbers cross, never a cache row).  Returns o [B, T, H, E] float32."""
    c = context_size()
    s = jax.tree_util.tree_leaves(items)[0].shape[1]
    check_divides(s, c, "cache length")
    sc = s // c
    t = jax.tree_util.tree_leaves(queries)[0].shape[1]
    q_pos_BT = start_B[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
    kv_len_B = start_B + t

    def body(queries, items, q_pos_BT, kv_len_B):
        base = jax.lax.axis_index(AXIS) * sc
        o_BTHE, lse_BTH = partial(queries, items, q_pos_BT - base, jnp.clip(kv_len_B - base, 0, sc))
        m_BTH = jax.lax.pmax(lse_BTH, AXIS)
        m_BTH = jnp.where(jnp.isfinite(m_BTH), m_BTH, 0.0)
        w_BTH = jnp.exp(lse_BTH - m_BTH)  # 0 for a shard that saw nothing
        num_BTHE = jax.lax.psum(w_BTH[..., None] * o_BTHE.astype(jnp.float32), AXIS)
        den_BTH = jax.lax.psum(w_BTH, AXIS)
        return num_BTHE / jnp.where(den_BTH > 0, den_BTH, 1.0)[..., None]

    rep, split = P(), P(None, AXIS)
    mesh = jax.sharding.get_abstract_mesh()
    return jax.shard_map(body, mesh=mesh, axis_names={AXIS},
                         in_specs=(jax.tree.map(lambda _: rep, queries), jax.tree.map(lambda _: split, items), rep, rep),
                         out_specs=rep)(queries, items, q_pos_BT, kv_len_B)
