"""tpa_jax.model.attention.blocked against explicit float64 NumPy loops: the forward (masked softmax
per query row) and the backward (the softmax gradient written out), with grouped heads, ragged
positions and lengths, E != D and T, S not multiples of the block; the causal block skipping (the
loops' own counters against a count of the blocks that hold a visible key); and no O(T S) array
anywhere in the traced forward + backward."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tpa_jax.model.attention.blocked import block_counts, blocked_attention
from tpa_jax.model.attention.core import attend, attention_mask

SCALE = 0.37


def visible(q_pos, kv_len, s):
    """[B, T, S]: key s visible to query (b, t) iff s <= q_pos[b, t] and s < kv_len[b]."""
    keys = np.arange(s)
    return (keys[None, None] <= q_pos[:, :, None]) & (keys[None, None] < kv_len[:, None, None])


def slow_attention_and_grads(q, k, v, do, q_pos, kv_len, scale):
    """Loop over (b, t, h): p = softmax(scale q.k over visible keys); o = p v; and the gradients
    dv += p dO, dp = dO.v, ds = p (dp - sum(p dp)), dq = scale ds k, dk += scale ds q."""
    b, t, h, _ = q.shape
    s, kv = k.shape[1], k.shape[2]
    g = h // kv
    vis = visible(q_pos, kv_len, s)
    o = np.zeros(q.shape[:3] + v.shape[-1:])
    dq, dk, dv = np.zeros_like(q), np.zeros_like(k), np.zeros_like(v)
    for bi in range(b):
        for ti in range(t):
            keys = np.flatnonzero(vis[bi, ti])
            if not len(keys):
                continue
            for hi in range(h):
                j = hi // g
                z = scale * k[bi, keys, j] @ q[bi, ti, hi]
                p = np.exp(z - z.max())
                p /= p.sum()
                o[bi, ti, hi] = p @ v[bi, keys, j]
                dv[bi, keys, j] += p[:, None] * do[bi, ti, hi][None, :]
                dp = v[bi, keys, j] @ do[bi, ti, hi]
                ds = p * (dp - (p * dp).sum())
                dq[bi, ti, hi] = scale * ds @ k[bi, keys, j]
                dk[bi, keys, j] += scale * ds[:, None] * q[bi, ti, hi][None, :]
    return o, (dq, dk, dv)


CASES = {  # b, t, s, h, kv, d, e, block, q positions, kv lengths (None: the full causal forward)
    "causal_gqa_ragged_block": (2, 13, 13, 6, 2, 4, 3, 4, None, None),
    "causal_mqa_one_block": (1, 7, 7, 3, 1, 6, 6, 16, None, None),
    "cached_prefill_ragged": (3, 5, 11, 4, 4, 4, 6, 3, [[3, 4, 5, 6, 7], [0, 1, 2, 3, 4], [6, 7, 8, 9, 10]],
                              [8, 5, 11]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_forward_and_gradients_match_loops(case):
    b, t, s, h, kv, d, e, block, q_pos, kv_len = CASES[case]
    q_pos = np.broadcast_to(np.arange(t), (b, t)) if q_pos is None else np.asarray(q_pos)
    kv_len = np.full((b,), s) if kv_len is None else np.asarray(kv_len)
    rng = np.random.default_rng(len(case))
    q, k = rng.standard_normal((b, t, h, d)), rng.standard_normal((b, s, kv, d))
    v, do = rng.standard_normal((b, s, kv, e)), rng.standard_normal((b, t, h, e))
    want_o, want_grads = slow_attention_and_grads(q, k, v, do, q_pos, kv_len, SCALE)
    f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731

    def f(q_, k_, v_):
        return blocked_attention(q_, k_, v_, jnp.asarray(q_pos), jnp.asarray(kv_len), scale=SCALE, block_size=block)

    o, vjp = jax.vjp(jax.jit(f), f32(q), f32(k), f32(v))
    np.testing.assert_allclose(o, want_o, rtol=1e-5, atol=1e-5)
    for got, want in zip(vjp(f32(do)), want_grads):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert np.abs(want_grads[1]).max() > 1e-2


def test_rows_that_see_nothing_give_zero_and_no_gradient():
    q_pos, kv_len = jnp.asarray([[0, 1, 2, 3]]), jnp.asarray([0])  # no key is filled
    rng = np.random.default_rng(3)
    q, k, v = (jnp.asarray(rng.standard_normal(sh), jnp.float32) for sh in ((1, 4, 2, 4), (1, 6, 2, 4), (1, 6, 2, 4)))
    out = lambda *a: blocked_attention(*a, q_pos, kv_len, scale=1.0, block_size=2)  # noqa: E731
    assert float(jnp.abs(jax.jit(out)(q, k, v)).max()) == 0.0
    for g in jax.jit(jax.grad(lambda *a: out(*a).sum(), argnums=(0, 1, 2)))(q, k, v):
        assert np.all(np.isfinite(g)) and float(jnp.abs(g).max()) == 0.0


def needed_blocks(q_pos, kv_len, s, block):
    """[query tile, key block] pairs holding at least one visible (query, key) pair, by brute force
    (the last key block starts at S - block, as the kernel's does)."""
    b, t = q_pos.shape
    tq, bk = min(block, t), min(block, s)
    vis = visible(q_pos, kv_len, s)
    count = 0
    for i in range(-(-t // tq)):
        for j in range(-(-s // bk)):
            count += bool(vis[:, i * tq:(i + 1) * tq, j * bk:(j + 1) * bk].any())
    return count


@pytest.mark.parametrize("t, s, block, q0, kv_len", [(16, 16, 4, 0, 16), (13, 13, 4, 0, 13), (6, 40, 4, 20, 26),
                                                      (64, 64, 8, 0, 20)])
def test_block_skipping_counts(t, s, block, q0, kv_len):
    """Forward and backward compute exactly the blocks that hold a visible key: n (n + 1) / 2 for
    a causal forward of n tiles, none past the filled length, none past the diagonal."""
    q_pos = np.arange(q0, q0 + t)[None]
    shapes = ((1, t, 2, 4), (1, s, 1, 4), (1, s, 1, 4))
    q, k, v = (jnp.zeros(sh, jnp.float32) for sh in shapes)
    fwd, bwd = block_counts(q, k, v, jnp.asarray(q_pos), jnp.asarray([kv_len]), block_size=block)
    want = needed_blocks(q_pos, np.array([kv_len]), s, block)
    assert fwd == bwd == want
    if q0 == 0 and kv_len == s:
        n = -(-t // block)
        assert want == n * (n + 1) // 2


def _avals(jaxpr):
    """Every value's abstract shape in a closed jaxpr, sub-jaxprs (loops, custom VJPs) included."""
    for eqn in jaxpr.eqns:
        for var in eqn.outvars:
            yield var.aval
        for param in eqn.params.values():
            subs = param if isinstance(param, (tuple, list)) else (param,)
            for sub in subs:
                inner = getattr(sub, "jaxpr", None)
                if inner is not None:
                    yield from _avals(inner if hasattr(inner, "eqns") else inner.jaxpr)


def test_no_t_by_s_array_in_forward_or_backward():
    """The traced forward + backward never holds an array as large as one [T, S] score matrix per head."""
    b, t, h, d, block = 1, 64, 2, 4, 8
    q = jnp.zeros((b, t, h, d), jnp.float32)
    pos, lens = jnp.arange(t)[None], jnp.asarray([t])

    def loss(q_, k_, v_):
        return blocked_attention(q_, k_, v_, pos, lens, scale=1.0, block_size=block).sum()

    def largest(f):
        jaxpr = jax.make_jaxpr(jax.grad(f, argnums=(0, 1, 2)))(q, q, q)
        return max(int(np.prod(a.shape)) for a in _avals(jaxpr.jaxpr) if hasattr(a, "shape"))

    assert largest(loss) < t * t
    # the walker does see inside: the dense reference's [B, K, T, S] scores are found
    mask = attention_mask(pos, lens, jnp.arange(t))
    assert largest(lambda *a: attend(*a, scale=1.0, mask_BTS=mask).sum()) >= h * t * t
