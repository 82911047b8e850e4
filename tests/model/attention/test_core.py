"""tpa_jax.model.attention.core against explicit loops and NumPy formulas: the mask rule, GQA
attention, the output projection with its per-head norm, and the cache write."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from tpa_jax.model.attention.core import attend, attention_mask, project_out, write_cache
from tpa_jax.model.layers import RMSNorm

from _util import BASE


def test_mask_rule():
    """Key s is visible to a query at position p of sequence b iff s <= p and s < kv_lengths[b]."""
    q_pos = np.array([[0, 2, 5], [3, 4, 6]])
    lens = np.array([4, 7])
    keys = np.arange(8)
    got = np.asarray(jax.jit(attention_mask)(jnp.asarray(q_pos), jnp.asarray(lens), jnp.asarray(keys)))
    assert got.shape == (2, 3, 8)
    for b in range(2):
        for t in range(3):
            for s in keys:
                assert got[b, t, s] == (s <= q_pos[b, t] and s < lens[b]), (b, t, s)


def test_attend_gqa_against_loops():
    rng = np.random.default_rng(5)
    b, t, s, h, kv, d, e = 2, 4, 6, 6, 2, 5, 3
    q, k, v = rng.standard_normal((b, t, h, d)), rng.standard_normal((b, s, kv, d)), rng.standard_normal((b, s, kv, e))
    mask = rng.random((b, t, s)) < 0.7
    mask[..., 0] = True
    run = jax.jit(lambda q_, k_, v_, m_: attend(q_, k_, v_, scale=0.3, mask_BTS=m_))  # one program, not eager ops
    got = np.asarray(run(*(jnp.asarray(a, jnp.float32) for a in (q, k, v)), jnp.asarray(mask)))
    for bi in range(b):
        for ti in range(t):
            for hi in range(h):
                j = hi // (h // kv)  # consecutive blocks of query heads share a kv head
                sc = np.where(mask[bi, ti], 0.3 * k[bi, :, j] @ q[bi, ti, hi], -np.inf)
                w = np.exp(sc - sc.max())
                np.testing.assert_allclose(got[bi, ti, hi], (w / w.sum()) @ v[bi, :, j], rtol=1e-5, atol=1e-5)


def test_project_out_with_per_head_norm():
    """out = sum_h RMSNorm(o_h) W_O[h] with one gain vector [E] shared by the heads (eq. 3.3)."""
    cfg = dataclasses.replace(BASE, attn_out_norm=True)
    rng = np.random.default_rng(1)
    h, e, m = 3, 4, 5
    o, w_o, gain = rng.standard_normal((2, 6, h, e)), rng.standard_normal((h, e, m)), rng.standard_normal(e)
    norm = RMSNorm(cfg, e, 0.1, True, "value_dim")
    got = jax.jit(lambda g_, o_, w_: norm.apply({"params": {"scale": g_}}, o_,
                                                 method=lambda mod, x: project_out(cfg, x, w_, mod)))(
        jnp.asarray(gain, jnp.float32), jnp.asarray(o, jnp.float32), jnp.asarray(w_o, jnp.float32))
    normed = o / np.sqrt((o ** 2).mean(-1, keepdims=True) + 0.1) * gain
    want = sum(normed[:, :, i] @ w_o[i] for i in range(h))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    plain = jax.jit(lambda o_, w_: project_out(cfg, o_, w_))(jnp.asarray(o, jnp.float32), jnp.asarray(w_o, jnp.float32))
    np.testing.assert_allclose(plain, sum(o[:, :, i] @ w_o[i] for i in range(h)), rtol=1e-5, atol=1e-5)


def test_write_cache_at_per_sequence_rows():
    rng = np.random.default_rng(2)
    cache = {"a": np.zeros((2, 7, 3)), "b": np.zeros((2, 7))}
    items = {"a": rng.standard_normal((2, 2, 3)), "b": rng.standard_normal((2, 2))}
    start = np.array([0, 4])
    got = jax.jit(write_cache)({k: jnp.asarray(v, jnp.float32) for k, v in cache.items()},
                               {k: jnp.asarray(v, jnp.float32) for k, v in items.items()}, jnp.asarray(start))
    for name in cache:
        want = cache[name].copy()
        for b in range(2):
            want[b, start[b]:start[b] + 2] = items[name][b]
        assert got[name].dtype == jnp.float32
        np.testing.assert_allclose(got[name], want, rtol=1e-6)
