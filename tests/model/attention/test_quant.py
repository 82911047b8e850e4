"""The int8 cache's quantisation (``tpa_jax.model.attention.quant``): symmetric absmax over the
last axis, checked against the explicit numpy formula, its round-trip error bound, the scale leaves
it adds to a layout, what a write stores and the one-line error for an unsupported dtype."""
import jax.numpy as jnp
import numpy as np
import pytest

from tpa_jax.model.attention import CacheLeaf, quant


def numpy_quantize(x):
    """scale = max|x| / 127 over the last axis (1 for an all-zero row), q = clip(round(x / scale), -127, 127)."""
    x = np.asarray(x, np.float32)
    amax = np.abs(x).max(axis=-1)
    scale = np.where(amax > 0, amax / np.float32(127), np.float32(1)).astype(np.float32)
    q = np.clip(np.round(x / scale[..., None]), -127, 127).astype(np.int8)
    return q, scale


@pytest.mark.parametrize("shape", [(2, 5, 3, 8), (4, 7), (3, 1, 16)])
def test_round_trip_matches_the_formula_and_is_within_half_a_step(shape):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(shape) * rng.uniform(0.01, 10, shape[:-1] + (1,))).astype(np.float32)
    x[(0,) * (len(shape) - 1)] = 0.0  # an all-zero row: scale 1, q 0
    q, scale = quant.quantize(jnp.asarray(x))
    assert q.dtype == jnp.int8 and scale.dtype == jnp.float32 and scale.shape == shape[:-1]
    want_q, want_scale = numpy_quantize(x)
    np.testing.assert_array_equal(np.asarray(scale), want_scale)
    np.testing.assert_array_equal(np.asarray(q), want_q)
    assert np.abs(np.asarray(q)).max() <= 127
    err = np.abs(np.asarray(quant.dequantize(q, scale)) - x)
    assert np.all(err <= want_scale[..., None] / 2 * (1 + 1e-6))
    assert np.asarray(quant.dequantize(q, scale))[(0,) * (len(shape) - 1)].tolist() == [0.0] * shape[-1]


def test_layout_gains_a_scale_leaf_per_leaf_for_int8_only():
    spec = {"a_k": CacheLeaf((2, 6), ("rank", "heads")), "c_kv": CacheLeaf((12,), ("latent",))}
    assert quant.with_scales(spec, "float32") == spec
    got = quant.with_scales(spec, "int8")
    assert list(got) == ["a_k", "a_k_scale", "c_kv", "c_kv_scale"]
    assert got["a_k_scale"] == CacheLeaf((2,), ("rank",)) and got["c_kv_scale"] == CacheLeaf((), ())
    assert quant.leaf_dtype("a_k_scale", "int8") == jnp.float32 and quant.leaf_dtype("a_k", "int8") == jnp.int8


def test_store_and_as_stored():
    """A write into an int8 cache stores q and its scale; the new token is attended as stored."""
    rng = np.random.default_rng(1)
    items = {"k": jnp.asarray(rng.standard_normal((2, 1, 3, 4)), jnp.float32)}
    layers8 = {"k": jnp.zeros((2, 5, 3, 4), jnp.int8), "k_scale": jnp.zeros((2, 5, 3), jnp.float32)}
    stored = quant.store(items, layers8)
    want_q, want_scale = numpy_quantize(items["k"])
    np.testing.assert_array_equal(np.asarray(stored["k"]), want_q)
    np.testing.assert_array_equal(np.asarray(stored["k_scale"]), want_scale)
    new = quant.as_stored(items, layers8, jnp.float32)
    assert list(new) == ["k"]
    np.testing.assert_allclose(np.asarray(new["k"]), want_q * want_scale[..., None], rtol=1e-6)
    rows = quant.dequantize_rows({"k": stored["k"], "k_scale": stored["k_scale"]}, jnp.float32)
    np.testing.assert_array_equal(np.asarray(rows["k"]), np.asarray(new["k"]))
    layers16 = {"k": jnp.zeros((2, 5, 3, 4), jnp.bfloat16)}
    assert quant.store(items, layers16)["k"].dtype == jnp.bfloat16
    assert quant.dequantize_rows(layers16, jnp.float32) is layers16


@pytest.mark.parametrize("bad", ["int4", "int16", "float64", "nonsense"])
def test_unsupported_cache_dtype_is_a_one_line_error(bad):
    with pytest.raises(ValueError, match=f"cache dtype '{bad}' is not supported") as e:
        quant.cache_dtype(bad)
    assert "\n" not in str(e.value)
    for ok in ("float32", "bfloat16", "float16", "int8", jnp.int8):
        quant.cache_dtype(ok)
