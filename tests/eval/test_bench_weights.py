"""Benchmark weights: the model's own init or a cheap uniform fill of the same shapes, and the
fill itself (host path for small leaves, one jitted hash for large ones)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tpa_jax
from tpa_jax.eval import bench_weights
from tpa_jax.eval.bench_weights import FAST_SCALE, bench_params, filled_like, nbytes
from _util import cfg_of

CFG = cfg_of("mqa", n_layer=1)


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_model_weights_are_the_entry_points_init():
    got = bench_params(CFG, "model")
    want = tpa_jax.init_params(CFG, jax.random.key(0))
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(_leaves(got), _leaves(want)):
        np.testing.assert_array_equal(a, b)


def test_fast_weights_have_the_models_shapes_and_a_bounded_spread():
    got = bench_params(CFG, "fast")
    want = tpa_jax.model.abstract_params(CFG)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert a.shape == b.shape and a.dtype == b.dtype
        assert float(jnp.max(jnp.abs(a))) < FAST_SCALE
    flat = np.concatenate([x.ravel() for x in _leaves(got)])
    assert flat.std() == pytest.approx(FAST_SCALE / np.sqrt(3), rel=0.05)  # uniform on [-s, s)
    for a, b in zip(_leaves(got), _leaves(bench_params(CFG, "fast"))):  # deterministic
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="param_init"):
        bench_params(CFG, "zeros")


def test_nbytes():
    tree = {"a": jnp.zeros((3, 5), jnp.float32), "b": [jnp.zeros((7,), jnp.bfloat16)]}
    assert nbytes(tree) == 3 * 5 * 4 + 7 * 2


def test_large_leaves_are_hashed_on_device(monkeypatch):
    monkeypatch.setattr(bench_weights, "HOST_FILL_MAX", 10)
    abstract = {"small": jax.ShapeDtypeStruct((2, 5), jnp.float32),
                "big": jax.ShapeDtypeStruct((64, 33), jnp.float32),
                "big16": jax.ShapeDtypeStruct((4, 40), jnp.bfloat16)}
    out = filled_like(abstract, seed=3, scale=0.5)
    for k, spec in abstract.items():
        x = np.asarray(out[k], np.float32)
        assert out[k].shape == spec.shape and out[k].dtype == spec.dtype
        assert np.all(np.abs(x) <= 0.5) and len(np.unique(x)) > x.size // 2  # spread, not constant
    big = np.asarray(out["big"]).ravel()
    assert abs(big.mean()) < 0.05 and big.std() == pytest.approx(0.5 / np.sqrt(3), rel=0.1)
    again = filled_like(abstract, seed=3, scale=0.5)
    np.testing.assert_array_equal(np.asarray(again["big"]), np.asarray(out["big"]))
    other = filled_like(abstract, seed=4, scale=0.5)
    assert not np.array_equal(np.asarray(other["big"]), np.asarray(out["big"]))
