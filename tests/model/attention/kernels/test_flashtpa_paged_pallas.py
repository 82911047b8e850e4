"""tpa_jax.model.attention.kernels.flashtpa_paged_pallas: FlashTPA decoding through a page table,
run by the Pallas interpreters (CPU) against the jnp ``flashtpa_decode`` over a contiguous cache
gathered from the pool with NumPy indexing -- ragged lengths, pages in shuffled order, NO_PAGE
entries past the length, NaN garbage in unused rows and pages, ``new_kv``, an int8 pool, R_K != R_V;
the clamped page index; the grid (one page of one sequence per step, two scalar-prefetch arrays);
the TPU export (a Mosaic kernel) and the page-size error."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from tpa_jax.model.attention.flashtpa import flashtpa_decode
from tpa_jax.model.attention.kernels import flashtpa_decode_paged_pallas
from tpa_jax.model.attention.flashtpa_paged import flashtpa_decode_paged
from tpa_jax.model.attention.kernels.flashtpa_paged_pallas import pool_page_index
from tpa_jax.model.attention.quant import quantize

from _util import find_pallas_call

B, J, N = 4, 4, 13  # 4 sequences of up to 4 pages from a pool of 13 (never all used)
KERNEL = "tpu_custom_call"


def _kw(rq, rk, rv, d):
    return dict(q_rank=rq, k_rank=rk, v_rank=rv, scale=1.0 / np.sqrt(d))


def _paged_inputs(seed, ranks, lengths, page_size, *, new_kv=False, int8=False):
    """(query factors, pool factors, page table, pool scales or None, new_kv or None).  Each sequence
    holds ceil(rows / page_size) pool pages in a shuffled order (rows = lengths - 1 with new_kv);
    its other table entries are N (NO_PAGE).  Rows past the length and unheld pages are NaN (an int8
    pool: NaN scales and random int8)."""
    rq, rk, rv, h, d, e = ranks
    rng = np.random.default_rng(seed)
    q = [rng.standard_normal(sh).astype(np.float32) for sh in [(B, rq, h), (B, rq, d)]]
    factor_shapes = [(rk, h), (rk, d), (rv, h), (rv, e)]
    pool = [rng.standard_normal((N, page_size, *sh)).astype(np.float32) for sh in factor_shapes]
    rows = np.maximum(np.asarray(lengths) - new_kv, 0)
    order = rng.permutation(N)
    table, used, k = np.full((B, J), N, np.int32), np.zeros((N, page_size), bool), 0
    for b in range(B):
        for j in range(-(-rows[b] // page_size)):
            table[b, j] = order[k]
            used[order[k]] = np.arange(j * page_size, (j + 1) * page_size) < rows[b]
            k += 1
    garbage = ~used
    scales = None
    if int8:
        quantised = [quantize(jnp.asarray(x)) for x in pool]
        pool = [np.array(x) for x, _ in quantised]
        scales = [np.array(sc) for _, sc in quantised]
        for x, sc in zip(pool, scales):
            x[garbage] = rng.integers(-127, 128, x[garbage].shape)
            sc[garbage] = np.nan
    else:
        for x in pool:
            x[garbage] = np.nan
    new = [rng.standard_normal((B, *sh)).astype(np.float32) for sh in factor_shapes]
    return q, pool, table, scales, (new if new_kv else None)


def _gather(pool, table):
    """A contiguous cache [B, J page_size, ...] from a pool: NumPy indexing, zeros for NO_PAGE."""
    held = table < N
    pages = np.where(held.reshape(*held.shape, *(1,) * (pool.ndim - 1)), pool[np.minimum(table, N - 1)], 0)
    return pages.reshape(B, J * pool.shape[1], *pool.shape[2:])


def _arrays(xs):
    return None if xs is None else tuple(None if x is None else jnp.asarray(x) for x in xs)


def _reference(q, pool, table, scales, new, lengths, **kw):
    cache = [jnp.asarray(_gather(x, table)) for x in pool]
    cache_scales = None if scales is None else [None if sc is None else _gather(sc, table) for sc in scales]
    return np.asarray(flashtpa_decode(*_arrays(q), *cache, jnp.asarray(lengths), scales=_arrays(cache_scales),
                                      new_kv=_arrays(new), **kw))


def _run(q, pool, table, scales, new, lengths, fn=flashtpa_decode_paged_pallas, **kw):
    return fn(*_arrays(q), *_arrays(pool), jnp.asarray(table), jnp.asarray(lengths), scales=_arrays(scales),
              new_kv=_arrays(new), **kw)


# (R_Q, R_K, R_V, H, D, E): R_K != R_V, rank 1, odd head counts
RANKS = [(3, 2, 3, 5, 8, 6), (1, 1, 1, 7, 4, 3), (6, 3, 2, 34, 8, 5)]
LENGTHS = np.array([0, 13, 32, 8])  # empty, ragged, all J pages, exactly one page
LENGTHS_NEW = np.array([1, 14, 33, 9])  # the same pool rows, plus the token itself (1: only the new token)


@pytest.mark.parametrize("ranks", RANKS)
@pytest.mark.parametrize("new_kv", [False, True])
def test_paged_kernel_matches_the_gathered_contiguous_cache(ranks, new_kv):
    """The default mode (the interpreter on CPU) equals the jnp FlashTPA over each sequence's pages
    gathered contiguously; NaN in unused rows and pages never reaches the output."""
    kw = _kw(*ranks[:3], ranks[4])
    lengths = LENGTHS_NEW if new_kv else LENGTHS
    inputs = _paged_inputs(1, ranks, lengths, 8, new_kv=new_kv)
    o = _run(*inputs, lengths, **kw)
    assert o.shape == (B, ranks[3], ranks[5]) and o.dtype == jnp.float32
    ref = _reference(*inputs, lengths, **kw)
    assert np.all(np.isfinite(ref))
    np.testing.assert_allclose(np.asarray(o), ref, rtol=1e-5, atol=1e-5)
    if not new_kv:
        assert not np.any(np.asarray(o)[0])  # an empty sequence gives zeros
    # the jnp form (the non-TPU, non-CPU fallback) gives the same numbers
    jnp_o = _run(*inputs, lengths, fn=jax.jit(flashtpa_decode_paged, static_argnames=tuple(kw)), **kw)
    np.testing.assert_allclose(np.asarray(jnp_o), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("new_kv", [False, True])
def test_int8_pool(new_kv):
    """An int8 pool with float32 [N, page_size, rank] scales (garbage rows: random int8, NaN scales),
    and one float factor beside the int8 ones (scale None)."""
    ranks = (3, 2, 3, 5, 8, 6)
    kw = _kw(3, 2, 3, 8)
    lengths = LENGTHS_NEW if new_kv else LENGTHS
    q, pool, table, scales, new = _paged_inputs(2, ranks, lengths, 8, new_kv=new_kv, int8=True)
    o = _run(q, pool, table, scales, new, lengths, interpret=True, **kw)
    np.testing.assert_allclose(np.asarray(o), _reference(q, pool, table, scales, new, lengths, **kw),
                               rtol=1e-5, atol=1e-5)
    float_a_v = np.where(np.isnan(scales[2])[..., None], np.nan, pool[2] * scales[2][..., None]).astype(np.float32)
    mixed_pool, mixed_scales = [pool[0], pool[1], float_a_v, pool[3]], [scales[0], scales[1], None, scales[3]]
    o = _run(q, mixed_pool, table, mixed_scales, new, lengths, interpret=True, **kw)
    np.testing.assert_allclose(np.asarray(o), _reference(q, mixed_pool, table, mixed_scales, new, lengths, **kw),
                               rtol=1e-5, atol=1e-5)


def test_tpu_interpreter_with_shuffled_batch_and_race_detection():
    """pltpu.InterpretParams simulates the scalar prefetch, the page DMAs and a random order of the
    parallel batch axis; uninitialised memory reads as NaN.  Same numbers, no races."""
    ranks = (3, 2, 3, 5, 8, 6)
    kw = _kw(3, 2, 3, 8)
    inputs = _paged_inputs(3, ranks, LENGTHS_NEW, 8, new_kv=True)
    params = pltpu.InterpretParams(detect_races=True, random_seed=3, uninitialized_memory="nan")
    o = _run(*inputs, LENGTHS_NEW, interpret=params, **kw)
    np.testing.assert_allclose(np.asarray(o), _reference(*inputs, LENGTHS_NEW, **kw), rtol=1e-5, atol=1e-5)


def test_interpreter_takes_any_page_size():
    """interpret=True runs a page size that is not a multiple of 8 (5 rows; lengths up to 4 pages)."""
    ranks = (3, 2, 3, 5, 8, 6)
    kw = _kw(3, 2, 3, 8)
    lengths = np.array([3, 11, 20, 5])
    inputs = _paged_inputs(4, ranks, lengths, 5)
    o = _run(*inputs, lengths, interpret=True, **kw)
    np.testing.assert_allclose(np.asarray(o), _reference(*inputs, lengths, **kw), rtol=1e-5, atol=1e-5)


def test_pool_page_index_clamps_to_the_last_filled_page_and_into_the_pool():
    """Step j reads entry min(j, ceil(length / page_size) - 1) (entry 0 when empty), clipped to [0, N)."""
    table = np.array([[7, 2, N, N], [N, N, N, N], [4, 0, 9, 1]], np.int32)
    b, length, j = (x.reshape(-1) for x in np.meshgrid(np.arange(3), np.arange(J * 8 + 1), np.arange(J),
                                                        indexing="ij"))
    index = functools.partial(pool_page_index, pages_per_row=J, page_size=8, n_pages=N)
    got = jax.jit(jax.vmap(index, in_axes=(0, 0, 0, None)))(b, j, length, jnp.asarray(table.reshape(-1)))
    expected = np.minimum(table[b, np.minimum(j, np.maximum(-(-length // 8) - 1, 0))], N - 1)
    np.testing.assert_array_equal(np.asarray(got), expected)


def _structs(ranks, page_size, dtype, new_kv=False, int8=False):
    rq, rk, rv, h, d, e = ranks
    q = [jax.ShapeDtypeStruct(sh, dtype) for sh in [(B, rq, h), (B, rq, d)]]
    pool_dtype = jnp.int8 if int8 else dtype
    pool = [jax.ShapeDtypeStruct((N, page_size, *sh), pool_dtype) for sh in [(rk, h), (rk, d), (rv, h), (rv, e)]]
    ints = [jax.ShapeDtypeStruct((B, J), jnp.int32), jax.ShapeDtypeStruct((B,), jnp.int32)]
    new = [jax.ShapeDtypeStruct((B, *sh), dtype) for sh in [(rk, h), (rk, d), (rv, h), (rv, e)]]
    scales = [jax.ShapeDtypeStruct((N, page_size, r), jnp.float32) for r in (rk, rk, rv, rv)]
    return q + pool + ints + [new if new_kv else None, scales if int8 else None]


def _fn(ranks, interpret):
    rq, rk, rv, h, d, e = ranks
    call = functools.partial(flashtpa_decode_paged_pallas, **_kw(rq, rk, rv, d), interpret=interpret)
    return lambda *a: call(*a[:8], new_kv=None if a[8] is None else tuple(a[8]),
                           scales=None if a[9] is None else tuple(a[9]))


def test_grid_is_one_page_of_one_sequence_per_step():
    """Grid (B, J) with two scalar-prefetch arrays (lengths, page table); every pool block is one
    page [1, page_size, width] and every block respects TPU tiling."""
    ranks = (3, 2, 3, 34, 8, 6)
    structs = _structs(ranks, 16, jnp.float32, new_kv=True, int8=True)
    eqn = find_pallas_call(jax.make_jaxpr(_fn(ranks, False))(*structs).jaxpr)
    grid_mapping = eqn.params["grid_mapping"]
    assert tuple(grid_mapping.grid) == (B, J) and grid_mapping.num_index_operands == 2
    n_pool = 0
    for bm in grid_mapping.block_mappings:
        sizes = [getattr(s, "block_size", 1) for s in bm.block_shape]
        array = bm.array_aval.shape
        assert sizes[-1] == array[-1] or sizes[-1] % 128 == 0, (sizes, array)
        assert sizes[-2] == array[-2] or sizes[-2] % 8 == 0, (sizes, array)
        if array[:2] == (N, 16):
            n_pool += 1
            assert sizes == [1, 16, array[-1]]
    assert n_pool == 8  # four factors and four scales


@pytest.mark.parametrize("ranks, page_size, dtype, new_kv, int8", [
    ((3, 2, 3, 34, 64, 64), 16, jnp.float32, False, False), ((1, 1, 1, 47, 8, 6), 8, jnp.bfloat16, True, False),
    ((6, 3, 2, 5, 8, 6), 8, jnp.float32, True, True)])
def test_kernel_exports_for_tpu(ranks, page_size, dtype, new_kv, int8):
    """interpret=False and the default mode lower to one Mosaic kernel for TPU."""
    structs = _structs(ranks, page_size, dtype, new_kv, int8)
    for interpret in (False, None):
        exported = jax.export.export(jax.jit(_fn(ranks, interpret)), platforms=("tpu",))(*structs)
        assert exported.mlir_module().count(KERNEL) == 1
        out_dtype = jnp.float32 if int8 else dtype
        assert exported.out_avals[0].shape == (B, ranks[3], ranks[5]) and exported.out_avals[0].dtype == out_dtype


def test_default_mode_falls_back_to_jnp_on_gpu():
    """Lowered for CUDA, the default mode is the jnp form (no custom call)."""
    ranks = (3, 2, 3, 5, 8, 6)
    exported = jax.export.export(jax.jit(_fn(ranks, None)), platforms=("cuda",))(
        *_structs(ranks, 8, jnp.float32, new_kv=True))
    assert "custom_call" not in exported.mlir_module() and exported.out_avals[0].shape == (B, 5, 6)


def test_one_line_errors():
    ranks = (3, 2, 3, 5, 8, 6)
    for interpret in (False, None):
        with pytest.raises(ValueError, match="page_size=12 must be a multiple of 8") as exc:
            jax.export.export(jax.jit(_fn(ranks, interpret)), platforms=("tpu",))(*_structs(ranks, 12, jnp.float32))
        assert "\n" not in str(exc.value)
    structs = _structs(ranks, 8, jnp.float32)
    with pytest.raises(ValueError, match="ranks"):
        jax.eval_shape(_fn((2, 2, 3, 5, 8, 6), True), *structs)
    bad_table = structs[:6] + [jax.ShapeDtypeStruct((B + 1, J), jnp.int32)] + structs[7:]
    with pytest.raises(ValueError, match="page_table"):
        jax.eval_shape(_fn(ranks, True), *bad_table)
    bad_pool = structs[:3] + [jax.ShapeDtypeStruct((N, 16, 3, 6), jnp.float32)] + structs[4:]
    with pytest.raises(ValueError, match="page_size"):
        jax.eval_shape(_fn(ranks, True), *bad_pool)
