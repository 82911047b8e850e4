"""The paged decode cache (``tpa_jax.inference.paged``): FlashTPA decoding through a page table
against an explicit float64 softmax over K and V rebuilt from the factors (pages shuffled, garbage
in every row no sequence holds, an int8 pool), a model's prefill and decode through page tables
equal to the same steps on a contiguous cache for every mechanism, dropped writes for rows
without a page, the pool's bytes against the accounting, the allocator's reservations and the
concurrency at a memory budget."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tpa_jax import accounting
from tpa_jax.inference import init_cache
from tpa_jax.inference.paged import PageAllocator, init_pool, max_concurrent, page_bytes, pages_for
from tpa_jax.model.attention import core, quant
from tpa_jax.model.attention.flashtpa_paged import flashtpa_decode_paged

from _util import cfg_of, init_params, tokens

B, P, R, U, H, D, E, PS, J, N = 3, 3, 2, 3, 4, 8, 6, 4, 5, 20


def _pool_and_table(rng, lengths, garbage=np.nan):
    """A float32 pool (pages no sequence holds and rows past a length full of ``garbage``) and a table
    of shuffled pages, NO_PAGE (N) past each sequence's last page."""
    shapes = [(R, H), (R, D), (U, H), (U, E)]
    pool = [rng.standard_normal((N, PS) + s).astype(np.float32) for s in shapes]
    table = np.full((B, J), N, np.int32)
    free = list(rng.permutation(N))
    held = np.zeros((N, PS), bool)
    for b, n in enumerate(lengths):
        for j in range(pages_for(n, PS)):
            table[b, j] = free.pop()
            held[table[b, j], : min(PS, n - j * PS)] = True
    for x in pool:
        x[~held] = garbage
    return pool, table


def _explicit(a_q, b_q, pool, table, lengths, new=None, scale=0.4):
    """softmax(q k^T * scale) v in float64, with Q, K, V contracted from their factors (eq. 3.1)."""
    out = np.zeros((B, H, E))
    for b, n in enumerate(lengths):
        rows = [table[b, s // PS] * PS + s % PS for s in range(n)]
        a_k, b_k, a_v, b_v = (x.reshape(N * PS, *x.shape[2:])[rows].astype(np.float64) for x in pool)
        if new is not None:  # the token's own factors come last
            a_k, b_k, a_v, b_v = (np.concatenate([x, y[b][None].astype(np.float64)]) for x, y in
                                  zip((a_k, b_k, a_v, b_v), new))
        q = np.einsum("ph,pd->hd", a_q[b], b_q[b]) / P
        k = np.einsum("srh,srd->shd", a_k, b_k) / R
        v = np.einsum("suh,sue->she", a_v, b_v) / U
        logits = np.einsum("hd,shd->hs", q, k) * scale
        p = np.exp(logits - logits.max(-1, keepdims=True))
        out[b] = np.einsum("hs,she->he", p / p.sum(-1, keepdims=True), v)
    return out


@pytest.fixture(params=[8, 64], ids=["blocks_of_2_pages", "one_block"])
def block_rows(request, monkeypatch):
    """Paged decoding's rows per block (``core.PAGED_BLOCK_ROWS``): 8 = blocks of 2 pages (the 5-page table
    widened to 6, several blocks merged), 64 = the whole table in one block."""
    monkeypatch.setattr(core, "PAGED_BLOCK_ROWS", request.param)
    return request.param


@pytest.mark.parametrize("with_new", [False, True])
def test_flashtpa_decode_paged_matches_the_explicit_softmax(with_new, block_rows):
    rng = np.random.default_rng(0)
    stored = [1, 13, 19]  # rows in the pool; 19 ends inside the last held page
    pool, table = _pool_and_table(rng, stored)
    a_q, b_q = rng.standard_normal((B, P, H)), rng.standard_normal((B, P, D))
    new = [rng.standard_normal((B,) + x.shape[2:]) for x in pool] if with_new else None
    lengths = np.asarray(stored) + (1 if with_new else 0)
    got = flashtpa_decode_paged(jnp.asarray(a_q, jnp.float32), jnp.asarray(b_q, jnp.float32), *pool, table, lengths,
                                q_rank=P, k_rank=R, v_rank=U, scale=0.4,
                                new_kv=None if new is None else tuple(jnp.asarray(x, jnp.float32) for x in new))
    assert np.isfinite(np.asarray(got)).all()
    np.testing.assert_allclose(got, _explicit(a_q, b_q, pool, table, stored, new), rtol=2e-5, atol=2e-5)


def test_flashtpa_decode_paged_int8_pool_dequantises_each_page(block_rows):
    rng = np.random.default_rng(1)
    stored = [6, 0, 17]
    pool, table = _pool_and_table(rng, stored, garbage=0.0)
    q8 = [quant.quantize(jnp.asarray(x)) for x in pool]
    deq = [np.asarray(quant.dequantize(q, s)) for q, s in q8]
    a_q, b_q = rng.standard_normal((B, P, H)), rng.standard_normal((B, P, D))
    new = [rng.standard_normal((B,) + x.shape[2:]) for x in pool]
    got = flashtpa_decode_paged(jnp.asarray(a_q, jnp.float32), jnp.asarray(b_q, jnp.float32), *(q for q, _ in q8),
                                table, np.asarray(stored) + 1, q_rank=P, k_rank=R, v_rank=U, scale=0.4,
                                new_kv=tuple(jnp.asarray(x, jnp.float32) for x in new),
                                scales=tuple(s for _, s in q8))
    np.testing.assert_allclose(got, _explicit(a_q, b_q, deq, table, stored, new), rtol=2e-5, atol=2e-5)


def _paged_vs_contiguous(cfg, dtype, params):
    """Prefill ragged prompts, then decode 6 tokens, through a paged cache and a contiguous one."""
    f = jax.jit(__import__("tpa_jax").logits_fn(cfg))
    table = np.random.default_rng(2).permutation(N)[: B * J].reshape(B, J).astype(np.int32)
    table[0, 3:] = N  # sequence 0 never needs more than 3 pages
    paged = {"lengths": jnp.zeros(B, jnp.int32), "page_table": jnp.asarray(table),
             **init_pool(cfg, N, PS, dtype)}
    flat = init_cache(cfg, B, J * PS, dtype=dtype)
    prompts, lens = tokens(cfg, batch=B, seq=8, seed=3), np.asarray([3, 8, 5], np.int32)
    got, paged = f(params, prompts, cache=paged, valid_lengths=lens)
    want, flat = f(params, prompts, cache=flat, valid_lengths=lens)
    diffs = [float(jnp.max(jnp.abs(got - want)))]
    tok = prompts[:, :1]
    for _ in range(6):
        got, paged = f(params, tok, cache=paged)
        want, flat = f(params, tok, cache=flat)
        diffs.append(float(jnp.max(jnp.abs(got - want))))
        tok = jnp.argmax(want[:, -1], -1)[:, None].astype(jnp.int32)
    np.testing.assert_array_equal(paged["lengths"], flat["lengths"])
    return max(diffs), paged, flat, table


@pytest.mark.parametrize("name,dtype", [("tpa", "float32"), ("tpa", "int8"), ("tpa_kvonly", "float32"),
                                        ("tpa_shared_b", "float32"), ("gqa", "float32"), ("mla", "int8")])
def test_paged_model_steps_equal_the_contiguous_cache(name, dtype, monkeypatch):
    """Blocks of 2 pages (3 blocks over the 5-page table): every paged reader merges several blocks."""
    monkeypatch.setattr(core, "PAGED_BLOCK_ROWS", 2 * PS)
    cfg = cfg_of(name)
    diff, paged, flat, table = _paged_vs_contiguous(cfg, dtype, init_params(cfg)[1])
    assert diff < 1e-4, diff
    # every row each sequence holds sits where its page table says
    for leaf, pooled in paged["layers"].items():
        rows = np.asarray(pooled)[:, table.clip(0, N - 1)].reshape(cfg.n_layer, B, J * PS, *pooled.shape[3:])
        for b, n in enumerate(np.asarray(flat["lengths"])):
            np.testing.assert_allclose(rows[:, b, :n], np.asarray(flat["layers"][leaf])[:, b, :n], rtol=1e-5,
                                       atol=1e-6, err_msg=leaf)


def test_writes_without_a_page_are_dropped():
    """Idle rows (a table of NO_PAGE) and rows past the table write nothing into the pool."""
    cfg = cfg_of("tpa")
    f = jax.jit(__import__("tpa_jax").logits_fn(cfg))
    params = init_params(cfg)[1]
    pool = init_pool(cfg, 4, PS)
    table = np.asarray([[0, 1], [4, 4]], np.int32)  # sequence 1 holds no page
    cache = {"lengths": jnp.asarray([0, 0], jnp.int32), "page_table": jnp.asarray(table), **pool}
    _, cache = f(params, tokens(cfg, batch=2, seq=8), cache=cache, valid_lengths=np.asarray([8, 8], np.int32))
    layers = {k: np.asarray(v) for k, v in cache["layers"].items()}
    assert all((v[:, 2:] == 0).all() and (v[:, :2] != 0).any() for v in layers.values())
    cache["lengths"] = jnp.asarray([8, 8], jnp.int32)  # both full: row 8 is past sequence 0's two pages
    _, cache = f(params, tokens(cfg, batch=2, seq=1), cache=cache)
    for k, v in cache["layers"].items():
        np.testing.assert_array_equal(np.asarray(v), layers[k])


@pytest.mark.parametrize("dtype", ["bfloat16", "int8"])
@pytest.mark.parametrize("name", ["tpa", "gqa", "mla", "mha"])
def test_pool_bytes_equal_the_accounting(name, dtype):
    cfg = cfg_of(name)
    pool = init_pool(cfg, 3, 16, dtype)
    measured = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(pool))
    assert measured == page_bytes(cfg, 16, dtype) * 3 == accounting.kv_cache_bytes_per_token(cfg, dtype) * 16 * 3


def test_page_allocator_reservations():
    a = PageAllocator(5)
    a.reserve(3)
    assert (a.free, a.in_use) == (2, 0) and not a.can_reserve(3)
    pages = [a.take(), a.take()]
    assert (a.free, a.in_use) == (2, 2)
    with pytest.raises(ValueError, match="cannot reserve 3 pages: 2 of 5 are free"):
        a.reserve(3)
    a.release(pages, unused_reservation=1)
    assert (a.free, a.in_use) == (5, 0)
    with pytest.raises(RuntimeError, match="without a reservation"):
        a.take()


def test_max_concurrent_counts_first_come_first_served():
    cfg = cfg_of("tpa")
    per_page = 2 * cfg.n_layer * 16 * (R * cfg.n_head + R * cfg.head_dim) * 2  # a_k, b_k, a_v, b_v in bfloat16
    assert page_bytes(cfg, 16, "bfloat16") == per_page
    requests = [40, 16, 17, 100, 1]  # 3, 1, 2, 7, 1 pages
    assert max_concurrent(per_page * 6, cfg, 16, "bfloat16", requests) == 3
    assert max_concurrent(per_page * 6 + per_page - 1, cfg, 16, "bfloat16", requests) == 3
    assert max_concurrent(per_page * 13, cfg, 16, "bfloat16", requests) == 4
    assert max_concurrent(per_page * 13, cfg, 16, "bfloat16", requests, max_batch=2) == 2
