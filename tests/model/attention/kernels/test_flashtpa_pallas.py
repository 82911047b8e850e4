"""tpa_jax.model.attention.kernels.flashtpa_pallas: the Pallas FlashTPA decode kernel run by the
Pallas interpreters (CPU) against float64 NumPy attention over the rebuilt Q, K, V and against the
jnp FlashTPA; its grid and block shapes (TPU tiling, one cache block per program); ``new_kv``; the clamped
block index; one-line errors; and the config rules for decode_impl="pallas"."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from tpa_jax import ModelConfig
from tpa_jax.model.attention.flashtpa import flashtpa_decode
from tpa_jax.model.attention.kernels import flashtpa_decode_pallas
from tpa_jax.model.attention.kernels.flashtpa_pallas import kv_block_index
from tpa_jax.model.attention.quant import quantize

from _util import find_pallas_call
from model_reference import tpa_attention

B, S = 3, 37  # S is not a multiple of the block sizes below: the last block is partial
LENGTHS = np.array([1, 20, S])


def _inputs(seed, rq, rk, rv, h, d, e, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    shapes = [(B, rq, h), (B, rq, d), (B, S, rk, h), (B, S, rk, d), (B, S, rv, h), (B, S, rv, e)]
    return [jnp.asarray(rng.standard_normal(sh), dtype) for sh in shapes]


def _reference(a_q, b_q, a_k, b_k, a_v, b_v, lengths, **kw):
    """Per sequence: its one query (position lengths[b] - 1) against its own truncated cache; an
    empty cache gives zeros."""
    def one(b):
        if lengths[b] == 0:
            return np.zeros((a_q.shape[-1], b_v.shape[-1]))
        return tpa_attention(np.asarray(a_q)[b, None, None], np.asarray(b_q)[b, None, None],
                             *(np.asarray(c)[b:b + 1, :lengths[b]] for c in (a_k, b_k, a_v, b_v)),
                             q_positions=[[lengths[b] - 1]], **kw)[0, 0]
    return np.stack([one(b) for b in range(len(lengths))])


def _kw(rq, rk, rv, d):
    return dict(q_rank=rq, k_rank=rk, v_rank=rv, scale=1.0 / np.sqrt(d))


# (R_Q, R_K, R_V, H, D, E), block: the paper's head counts 34/47/61/78 and odd ranks; block 64 > S is one block
CASES = [((1, 1, 1, 34, 8, 6), 8), ((6, 2, 2, 47, 8, 6), 16), ((16, 1, 1, 61, 4, 10), 64), ((3, 3, 5, 78, 8, 5), 8)]


@pytest.mark.parametrize("ranks, block", CASES)
def test_kernel_matches_references(ranks, block):
    """The default mode (the interpreter on CPU) against the slow formula and the jnp FlashTPA."""
    kw = _kw(*ranks[:3], ranks[4])
    args = _inputs(6, *ranks)
    o = flashtpa_decode_pallas(*args, jnp.asarray(LENGTHS), block_size=block, **kw)
    assert o.shape == (B, ranks[3], ranks[5]) and o.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(o), _reference(*args, LENGTHS, **kw), rtol=1e-5, atol=1e-5)
    flash = flashtpa_decode(*args, jnp.asarray(LENGTHS), block_size=block, **kw)
    np.testing.assert_allclose(np.asarray(o), np.asarray(flash), rtol=1e-5, atol=1e-5)


def test_tpu_interpreter_with_shuffled_batch_and_race_detection():
    """pltpu.InterpretParams simulates VMEM scratch, DMAs and a random order of the parallel batch
    axis; uninitialised memory reads as NaN.  Same numbers, no races."""
    ranks = (6, 2, 2, 34, 8, 6)
    kw = _kw(6, 2, 2, 8)
    args = _inputs(2, *ranks)
    params = pltpu.InterpretParams(detect_races=True, random_seed=3, uninitialized_memory="nan")
    o = flashtpa_decode_pallas(*args, jnp.asarray(LENGTHS), block_size=8, interpret=params, **kw)
    np.testing.assert_allclose(np.asarray(o), _reference(*args, LENGTHS, **kw), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fill", [1e4, np.nan])
def test_garbage_past_length_is_ignored(fill):
    """Cache rows at or past each sequence's length (here 1e4 or NaN; whole blocks of it past
    row 9) never reach the output; a row of length 0 returns zeros."""
    ranks = (6, 2, 2, 7, 8, 6)
    kw = _kw(6, 2, 2, 8)
    a_q, b_q, *cache = _inputs(4, *ranks)
    lens = np.array([0, 9, 30])
    dirty = [jnp.where((jnp.arange(S) < lens[:, None])[:, :, None, None], c, fill) for c in cache]
    o = flashtpa_decode_pallas(a_q, b_q, *dirty, jnp.asarray(lens), block_size=8, interpret=True, **kw)
    ref = _reference(a_q, b_q, *cache, lens, **kw)
    assert not np.any(ref[0]) and not np.any(np.asarray(o)[0])
    np.testing.assert_allclose(np.asarray(o), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("int8", [False, True])
def test_new_kv_is_merged_into_the_softmax(int8):
    """``new_kv``: the cache holds rows < lengths - 1 (NaN from there on), the token's own factors come
    apart and seed the kernel's softmax state; equal to the jnp FlashTPA's log-sum-exp merge.  Length 1:
    the new token alone; an int8 cache (NaN scales past the rows) too."""
    ranks = (3, 2, 3, 7, 8, 6)
    kw = _kw(3, 2, 3, 8)
    a_q, b_q, *cache = _inputs(5, *ranks)
    new = tuple(c[:, 0] * 0.5 for c in _inputs(6, *ranks)[2:])
    lens = np.array([1, 10, S + 1])
    held = (jnp.arange(S) < lens[:, None] - 1)[:, :, None]
    scales = None
    if int8:
        quantised = [quantize(c) for c in cache]
        cache, scales = [q for q, _ in quantised], tuple(jnp.where(held, sc, jnp.nan) for _, sc in quantised)
    else:
        cache = [jnp.where(held[..., None], c, jnp.nan) for c in cache]
    o = flashtpa_decode_pallas(a_q, b_q, *cache, jnp.asarray(lens), block_size=8, new_kv=new, scales=scales, **kw)
    ref = flashtpa_decode(a_q, b_q, *cache, jnp.asarray(lens), new_kv=new, scales=scales, **kw)
    assert np.all(np.isfinite(np.asarray(ref)))
    np.testing.assert_allclose(np.asarray(o), np.asarray(ref), rtol=1e-5, atol=1e-5)


def test_kv_block_index_clamps_to_the_last_filled_block():
    """Step i reads block min(i, ceil(length / block) - 1) (block 0 for an empty row)."""
    for length in range(0, 40):
        for i in range(6):
            expected = min(i, max(-(-length // 8) - 1, 0))
            assert int(kv_block_index(jnp.int32(i), jnp.int32(length), 8)) == expected, (i, length)


@pytest.mark.parametrize("ranks, block", [((6, 2, 2, 47, 8, 6), 8), ((3, 3, 1, 78, 64, 64), 16)])
def test_grid_blocks_respect_tpu_tiling_and_never_hold_the_whole_cache(ranks, block):
    """Grid (B, ceil(S / block)); every block's last two dims are multiples of (8, 128) or the full
    array dims; a cache block holds ``block`` rows of one sequence, never all S."""
    rq, rk, rv, h, d, e = ranks
    sds = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in _inputs(0, *ranks)]
    fn = functools.partial(flashtpa_decode_pallas, block_size=block, interpret=False, **_kw(rq, rk, rv, d))
    eqn = find_pallas_call(jax.make_jaxpr(fn)(*sds, jax.ShapeDtypeStruct((B,), jnp.int32)).jaxpr)
    grid_mapping = eqn.params["grid_mapping"]
    assert tuple(grid_mapping.grid) == (B, -(-S // block)) and grid_mapping.num_index_operands == 1
    cache_widths = {rk * h, rk * d, rv * h, rv * e}
    n_cache = 0
    for bm in grid_mapping.block_mappings:
        sizes = [getattr(s, "block_size", 1) for s in bm.block_shape]  # Squeezed -> 1
        array = bm.array_aval.shape
        assert sizes[-1] == array[-1] or sizes[-1] % 128 == 0, (sizes, array)
        assert sizes[-2] == array[-2] or sizes[-2] % 8 == 0, (sizes, array)
        if array[1:] in [(S, w) for w in cache_widths]:
            n_cache += 1
            assert sizes == [1, block, array[-1]]  # one sequence, one block of rows
    assert n_cache == 4


def test_kernel_one_line_errors():
    args = _inputs(0, 2, 1, 1, 4, 4, 4)
    lens = jnp.asarray(LENGTHS)
    with pytest.raises(ValueError, match="ranks"):
        flashtpa_decode_pallas(*args, lens, q_rank=3, k_rank=1, v_rank=1, scale=1.0)
    with pytest.raises(ValueError, match="block_size=12 must be a multiple of 8"):
        flashtpa_decode_pallas(*args, lens, q_rank=2, k_rank=1, v_rank=1, scale=1.0, block_size=12)
    bad_heads = args[:4] + [args[4][..., :3]] + args[5:]
    with pytest.raises(ValueError, match="head counts") as exc:
        flashtpa_decode_pallas(*bad_heads, lens, q_rank=2, k_rank=1, v_rank=1, scale=1.0)
    assert "\n" not in str(exc.value)
    # a block of at least S rows is one block, whatever its value
    o = flashtpa_decode_pallas(*args, lens, q_rank=2, k_rank=1, v_rank=1, scale=1.0, block_size=45)
    assert np.all(np.isfinite(np.asarray(o)))


@pytest.mark.parametrize("attention", ["tpa_kvonly", "mha", "mqa", "gqa", "mla"])
def test_config_allows_the_kernel_for_tpa_only(attention):
    fields = dict(attention=attention, decode_impl="pallas")
    if attention == "gqa":
        fields["n_kv_head"] = 2
    if attention == "mla":
        fields.update(q_lora_rank=8, kv_lora_rank=4, rope_head_dim=4)
    with pytest.raises(ValueError, match="decode_impl") as exc:
        ModelConfig(**fields)
    assert "\n" not in str(exc.value)
    assert ModelConfig(decode_impl="pallas").decode_impl == "pallas"  # attention="tpa" (every variant) may


def test_config_block_size_must_tile_for_the_kernel():
    with pytest.raises(ValueError, match="decode_block_size.*multiple of 8"):
        ModelConfig(decode_impl="pallas", decode_block_size=20)
    assert ModelConfig(decode_impl="flash", decode_block_size=20).decode_block_size == 20
