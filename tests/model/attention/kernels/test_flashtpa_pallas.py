"""tpa_jax.model.attention.kernels.flashtpa_pallas: the Pallas FlashTPA decode kernel (interpret
mode) against float64 NumPy attention over the rebuilt Q, K, V, and the config rule that only
attention="tpa" may ask for it."""
import jax.numpy as jnp
import numpy as np
import pytest

from tpa_jax import ModelConfig
from tpa_jax.model.attention.kernels import flashtpa_decode_pallas

from model_reference import tpa_attention

B, S = 3, 37  # S is not a multiple of the block sizes below
LENGTHS = np.array([1, 20, S])


def _inputs(seed, rq, rk, rv, h, d, e):
    rng = np.random.default_rng(seed)
    shapes = [(B, rq, h), (B, rq, d), (B, S, rk, h), (B, S, rk, d), (B, S, rv, h), (B, S, rv, e)]
    return [jnp.asarray(rng.standard_normal(sh), jnp.float32) for sh in shapes]


def _reference(a_q, b_q, a_k, b_k, a_v, b_v, lengths, **kw):
    """Per sequence: its one query (position lengths[b] - 1) against its own truncated cache."""
    return np.stack([tpa_attention(np.asarray(a_q)[b, None, None], np.asarray(b_q)[b, None, None],
                                   *(np.asarray(c)[b:b + 1, :lengths[b]] for c in (a_k, b_k, a_v, b_v)),
                                   q_positions=[[lengths[b] - 1]], **kw)[0, 0] for b in range(len(lengths))])


@pytest.mark.parametrize("ranks, block, head_block", [((6, 2, 2, 7, 8, 6), 8, 1), ((16, 1, 1, 5, 4, 10), 64, None)])
def test_kernel_matches_reference(ranks, block, head_block):
    """Head blocks of 1 over 7 heads; one program per sequence with a block larger than the cache."""
    rq, rk, rv, h, d, e = ranks
    kw = dict(q_rank=rq, k_rank=rk, v_rank=rv, scale=1.0 / np.sqrt(d))
    args = _inputs(6, *ranks)
    o = flashtpa_decode_pallas(*args, jnp.asarray(LENGTHS), block_size=block, head_block=head_block,
                               interpret=True, **kw)
    assert o.shape == (B, h, e) and o.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(o), _reference(*args, LENGTHS, **kw), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fill", [1e4, np.nan])
def test_garbage_past_length_is_ignored(fill):
    """Cache rows at or past each sequence's length (here 1e4 or NaN) never reach the output."""
    ranks = (6, 2, 2, 7, 8, 6)
    kw = dict(q_rank=6, k_rank=2, v_rank=2, scale=1.0 / np.sqrt(8))
    a_q, b_q, *cache = _inputs(4, *ranks)
    lens = np.array([1, 9, 30])
    dirty = [jnp.where((jnp.arange(S) < lens[:, None])[:, :, None, None], c, fill) for c in cache]
    o = flashtpa_decode_pallas(a_q, b_q, *dirty, jnp.asarray(lens), block_size=8, head_block=1, interpret=True, **kw)
    np.testing.assert_allclose(np.asarray(o), _reference(a_q, b_q, *cache, lens, **kw), rtol=1e-5, atol=1e-5)


def test_kernel_rejects_mismatched_ranks_and_head_blocks():
    args = _inputs(0, 2, 1, 1, 4, 4, 4)
    with pytest.raises(ValueError, match="ranks"):
        flashtpa_decode_pallas(*args, jnp.asarray(LENGTHS), q_rank=3, k_rank=1, v_rank=1, scale=1.0, interpret=True)
    with pytest.raises(ValueError, match="head_block"):
        flashtpa_decode_pallas(*args, jnp.asarray(LENGTHS), q_rank=2, k_rank=1, v_rank=1, scale=1.0, head_block=3,
                               interpret=True)


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
