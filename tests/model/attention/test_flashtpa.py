"""tpa_jax.model.attention.flashtpa: FlashTPA decoding and prefill (paper App. A Alg. 1, App. B
Alg. 2) against float64 NumPy attention over the rebuilt Q, K, V, and the check that nothing of
the size of Q, K or V is ever formed."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tpa_jax.model.attention.flashtpa import (flashtpa_decode, flashtpa_decode_plain_q, flashtpa_prefill,
                                              flashtpa_prefill_plain_q)

from model_reference import tpa_attention

# (Rq, Rk, Rv, H, D, E): the paper's rank sets, odd head counts, D == E and D != E
RANKS = {
    "r111": (1, 1, 1, 5, 8, 8),
    "r622": (6, 2, 2, 7, 8, 6),
    "r1611": (16, 1, 1, 5, 4, 10),
}
B, S = 3, 37  # S is not a multiple of any block size below
LENGTHS = (1, 20, S)  # one short, one middle, one full cache row
# block sizes per rank set: 1, 8 (no divisor of S) and 64 > S, each used twice (compiles are the cost)
BLOCKS = {"r111": (1, 8), "r622": (8, 64), "r1611": (64, 1)}
PREFILL_BLOCKS = {"r111": [(1, 64), (8, 5)], "r622": [(8, 5), (64, 16)], "r1611": [(64, 16), (1, 64)]}


def _rand(rng, *shape, dtype=jnp.float32):
    return jnp.asarray(rng.standard_normal(shape), dtype)


def _cache(rng, rk, rv, h, d, e, s=S, batch=B):
    return (_rand(rng, batch, s, rk, h), _rand(rng, batch, s, rk, d),
            _rand(rng, batch, s, rv, h), _rand(rng, batch, s, rv, e))


def _kw(rq, rk, rv, d):
    return dict(q_rank=rq, k_rank=rk, v_rank=rv, scale=1.0 / np.sqrt(d))


def _decode_ref(aq, bq, ak, bk, av, bv, lengths, **kw):
    """One query per sequence at position lengths[b] - 1 against the whole cache: o [B, H, E]."""
    lengths = np.asarray(lengths)
    o = tpa_attention(np.asarray(aq)[:, None], np.asarray(bq)[:, None], ak, bk, av, bv,
                      q_positions=(lengths - 1)[:, None], kv_lengths=lengths, **kw)
    return o[:, 0]


@pytest.mark.parametrize("ranks", list(RANKS))
def test_decode_matches_reference(ranks):
    """Lengths 1, 20 and S in one batch; block sizes from BLOCKS."""
    rng = np.random.default_rng(1)
    rq, rk, rv, h, d, e = RANKS[ranks]
    aq, bq = _rand(rng, B, rq, h), _rand(rng, B, rq, d)
    cache = _cache(rng, rk, rv, h, d, e)
    kw = _kw(rq, rk, rv, d)
    want = _decode_ref(aq, bq, *cache, LENGTHS, **kw)
    for block in BLOCKS[ranks]:  # the block loop (what accelerators run) ...
        o = flashtpa_decode(aq, bq, *cache, jnp.array(LENGTHS), block_size=block, one_pass=False, **kw)
        assert o.shape == (B, h, e) and o.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(o), want, rtol=1e-5, atol=1e-5, err_msg=f"block_size={block}")
    o = flashtpa_decode(aq, bq, *cache, jnp.array(LENGTHS), one_pass=True, **kw)  # ... and a CPU's one pass
    np.testing.assert_allclose(np.asarray(o), want, rtol=1e-5, atol=1e-5, err_msg="one pass")


def test_one_pass_splits_the_rows_into_pieces():
    """A cache of 40 rows (a multiple of ONE_PASS_PIECES) takes the one pass's split GEMMs."""
    rng = np.random.default_rng(9)
    rq, rk, rv, h, d, e = RANKS["r622"]
    aq, bq = _rand(rng, B, rq, h), _rand(rng, B, rq, d)
    cache = _cache(rng, rk, rv, h, d, e, s=40)
    kw = _kw(rq, rk, rv, d)
    want = _decode_ref(aq, bq, *cache, (1, 20, 40), **kw)
    o = flashtpa_decode(aq, bq, *cache, jnp.array([1, 20, 40]), one_pass=True, **kw)
    np.testing.assert_allclose(np.asarray(o), want, rtol=1e-5, atol=1e-5)


def test_decode_plain_query_matches_reference():
    """TPA-KVonly's plain query q [B, H, D] is TPA with R_Q = H, A_Q = H I and B_Q[p] = q_p
    (Section 4), so the same reference applies."""
    rng = np.random.default_rng(7)
    _, rk, rv, h, d, e = RANKS["r622"]
    q = _rand(rng, B, h, d)
    cache = _cache(rng, rk, rv, h, d, e)
    kw = _kw(h, rk, rv, d)
    want = _decode_ref(np.broadcast_to(h * np.eye(h), (B, h, h)), q, *cache, LENGTHS, **kw)
    for one_pass in (False, True):
        o = flashtpa_decode_plain_q(q, *cache, jnp.array(LENGTHS), block_size=8, k_rank=rk, v_rank=rv,
                                    scale=kw["scale"], one_pass=one_pass)
        assert o.shape == (B, h, e)
        np.testing.assert_allclose(np.asarray(o), want, rtol=1e-5, atol=1e-5, err_msg=f"one_pass={one_pass}")


@pytest.mark.parametrize("ranks", list(RANKS))
def test_prefill_matches_reference(ranks):
    """Causal prefill of T = 23 tokens; the cache is allocated for S = 37 and rows >= 23 hold NaN,
    which kv_lengths must mask.  (key block, query tile) from PREFILL_BLOCKS."""
    rng = np.random.default_rng(2)
    rq, rk, rv, h, d, e = RANKS[ranks]
    t = 23
    aq, bq = _rand(rng, B, t, rq, h), _rand(rng, B, t, rq, d)
    cache = _cache(rng, rk, rv, h, d, e)
    kw = _kw(rq, rk, rv, d)
    want = tpa_attention(aq, bq, *(c[:, :t] for c in cache), **kw)
    dirty = [c.at[:, t:].set(np.nan) for c in cache]
    for block, q_block in PREFILL_BLOCKS[ranks]:
        o = flashtpa_prefill(aq, bq, *dirty, kv_lengths_B=jnp.full((B,), t), block_size=block, q_block_size=q_block,
                             **kw)
        assert o.shape == (B, t, h, e)
        np.testing.assert_allclose(np.asarray(o), want, rtol=1e-5, atol=1e-5, err_msg=f"{block=} {q_block=}")


def test_prefill_plain_query_matches_reference():
    """TPA-KVonly's chunked prefill: a plain query q [B, T, H, D] is TPA with R_Q = H, A_Q = H I and
    B_Q[p] = q_p (Section 4); chunk at per-row offsets, garbage past each filled length."""
    rng = np.random.default_rng(8)
    _, rk, rv, h, d, e = RANKS["r622"]
    t, starts = 9, np.array([0, 13, 28])
    q = _rand(rng, B, t, h, d)
    cache = _cache(rng, rk, rv, h, d, e)
    idx, lens = starts[:, None] + np.arange(t), starts + t
    kw = _kw(h, rk, rv, d)
    want = tpa_attention(np.broadcast_to(h * np.eye(h), (B, t, h, h)), q, *cache, q_positions=idx, kv_lengths=lens,
                         **kw)
    dirty = [jnp.where((jnp.arange(S) < lens[:, None])[:, :, None, None], c, 1e4) for c in cache]
    o = flashtpa_prefill_plain_q(q, *dirty, q_positions_BT=idx, kv_lengths_B=lens, block_size=8, q_block_size=4,
                                 k_rank=rk, v_rank=rv, scale=kw["scale"])
    assert o.shape == (B, t, h, e)
    np.testing.assert_allclose(np.asarray(o), want, rtol=1e-5, atol=1e-5)


def test_chunked_prefill_continues_a_cache():
    """A chunk at positions [n0, n0+T) against a cache holding [0, n0) equals those rows of
    attention over the whole sequence; per-sequence offsets differ; rows past the filled length
    hold garbage."""
    rng = np.random.default_rng(3)
    rq, rk, rv, h, d, e = RANKS["r622"]
    kw = _kw(rq, rk, rv, d)
    n = 26
    aq, bq = _rand(rng, 2, n, rq, h), _rand(rng, 2, n, rq, d)
    cache = _cache(rng, rk, rv, h, d, e, s=n, batch=2)
    full = tpa_attention(aq, bq, *cache, **kw)  # [2, n, H, E]
    starts, t = np.array([17, 10]), 9
    idx = starts[:, None] + np.arange(t)  # [2, T] absolute positions
    take = lambda x: jnp.take_along_axis(x, jnp.asarray(idx)[:, :, None, None], axis=1)
    s_max = 40  # cache allocated longer than what is filled
    garbage = lambda x: jnp.concatenate([x, 1e4 * _rand(rng, 2, s_max - n, *x.shape[2:])], axis=1)
    lens = starts + t
    big = [garbage(c) for c in cache]
    big = [jnp.where((jnp.arange(s_max) < lens[:, None])[:, :, None, None], c, 1e4) for c in big]
    o = flashtpa_prefill(take(aq), take(bq), *big, q_positions_BT=idx, kv_lengths_B=lens, block_size=8,
                         q_block_size=4, **kw)
    np.testing.assert_allclose(np.asarray(o), np.take_along_axis(full, idx[:, :, None, None], axis=1),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("one_pass", [False, True])
@pytest.mark.parametrize("fill", [1e4, np.nan])
def test_garbage_past_length_is_ignored(fill, one_pass):
    """Cache rows at or past each sequence's length must not reach the decode output.  The
    expectation is attention over each sequence's own truncated cache."""
    rng = np.random.default_rng(4)
    rq, rk, rv, h, d, e = RANKS["r622"]
    kw = _kw(rq, rk, rv, d)
    aq, bq = _rand(rng, B, rq, h), _rand(rng, B, rq, d)
    cache = _cache(rng, rk, rv, h, d, e)
    lens = np.array([1, 9, 30])
    dirty = [jnp.where((jnp.arange(S) < lens[:, None])[:, :, None, None], c, fill) for c in cache]
    want = np.concatenate([_decode_ref(aq[b:b + 1], bq[b:b + 1], *(c[b:b + 1, :lens[b]] for c in cache), lens[b:b + 1],
                                       **kw) for b in range(B)])
    o = flashtpa_decode(aq, bq, *dirty, jnp.asarray(lens), block_size=8, one_pass=one_pass, **kw)
    np.testing.assert_allclose(np.asarray(o), want, rtol=1e-5, atol=1e-5)
    # the test has teeth: changing the last row inside a length changes the output
    touched = [c.at[2, 29].add(3.0) for c in dirty]
    o = flashtpa_decode(aq, bq, *touched, jnp.asarray(lens), block_size=8, one_pass=one_pass, **kw)
    assert np.abs(np.asarray(o)[2] - want[2]).max() > 1e-3


@pytest.mark.parametrize("one_pass", [False, True])
@pytest.mark.parametrize("plain_q", [False, True])
def test_decode_with_the_new_token_apart(one_pass, plain_q):
    """``new_kv``: the cache holds rows < lengths - 1 (rows from there on hold junk, finite with
    ``finite_rows``), the query's own token comes separately; equal to the cache with it written in."""
    rng = np.random.default_rng(8)
    rq, rk, rv, h, d, e = RANKS["r622"]
    kw = _kw(rq, rk, rv, d)
    aq, bq = _rand(rng, B, rq, h), _rand(rng, B, rq, d)
    cache = _cache(rng, rk, rv, h, d, e)
    new = [_rand(rng, B, *c.shape[2:]) for c in cache]
    rows = jnp.asarray(LENGTHS) - 1
    written = [c.at[jnp.arange(B), rows].set(n) for c, n in zip(cache, new)]
    if plain_q:
        q = _rand(rng, B, h, d)
        want = _decode_ref(np.broadcast_to(h * np.eye(h), (B, h, h)), q, *written, LENGTHS, **_kw(h, rk, rv, d))
        run = lambda **f: flashtpa_decode_plain_q(q, *cache, jnp.array(LENGTHS), block_size=8, k_rank=rk, v_rank=rv,
                                                  scale=kw["scale"], new_kv=tuple(new), one_pass=one_pass, **f)
    else:
        want = _decode_ref(aq, bq, *written, LENGTHS, **kw)
        run = lambda **f: flashtpa_decode(aq, bq, *cache, jnp.array(LENGTHS), block_size=8, new_kv=tuple(new),
                                          one_pass=one_pass, **kw, **f)
    for finite in (False, True):
        np.testing.assert_allclose(np.asarray(run(finite_rows=finite)), want, rtol=1e-5, atol=1e-5,
                                   err_msg=f"finite_rows={finite}")


def test_decode_bfloat16_inputs():
    rng = np.random.default_rng(5)
    rq, rk, rv, h, d, e = RANKS["r622"]
    kw = _kw(rq, rk, rv, d)
    args = [_rand(rng, B, rq, h), _rand(rng, B, rq, d), *_cache(rng, rk, rv, h, d, e)]
    args = [x.astype(jnp.bfloat16) for x in args]
    o = flashtpa_decode(*args, jnp.array(LENGTHS), block_size=8, **kw)
    assert o.dtype == jnp.bfloat16
    want = _decode_ref(*[x.astype(jnp.float32) for x in args], LENGTHS, **kw)
    np.testing.assert_allclose(np.asarray(o, np.float32), np.asarray(want), rtol=2e-2, atol=2e-2)


def _all_shapes(jaxpr):
    """Output shapes of every equation, descending into loop / map bodies."""
    for eqn in jaxpr.eqns:
        for v in eqn.outvars:
            yield tuple(getattr(v.aval, "shape", ()))
        for p in eqn.params.values():
            for j in (p if isinstance(p, (tuple, list)) else (p,)):
                inner = getattr(j, "jaxpr", j)  # ClosedJaxpr -> Jaxpr
                if hasattr(inner, "eqns"):
                    yield from _all_shapes(inner)


def test_no_materialised_q_k_v():
    """No intermediate of decode or prefill has a (head, head-dim) pair of axes (Q or K), or a
    (block, head, value-dim) triple (a V tile): everything goes through the factors."""
    h, d, e, blk = 7, 11, 13, 5
    rq, rk, rv, s = 3, 2, 2, 23
    sd = jax.ShapeDtypeStruct
    cache = (sd((2, s, rk, h), jnp.float32), sd((2, s, rk, d), jnp.float32),
             sd((2, s, rv, h), jnp.float32), sd((2, s, rv, e), jnp.float32))
    kw = _kw(rq, rk, rv, d)
    dec = [jax.make_jaxpr(lambda *a: flashtpa_decode(*a, block_size=blk, one_pass=one, **kw))(
        sd((2, rq, h), jnp.float32), sd((2, rq, d), jnp.float32), *cache, sd((2,), jnp.int32)) for one in (False, True)]
    pre = jax.make_jaxpr(lambda *a: flashtpa_prefill(*a, block_size=blk, q_block_size=s, **kw))(
        sd((2, s, rq, h), jnp.float32), sd((2, s, rq, d), jnp.float32), *cache)
    for closed in (*dec, pre):
        shapes = set(_all_shapes(closed.jaxpr))
        assert closed is dec[1] or any(blk in sh for sh in shapes)  # the walk did reach inside the loop
        bad = [sh for sh in shapes if (h in sh and d in sh) or (blk in sh and h in sh and e in sh)]
        assert not bad, bad
