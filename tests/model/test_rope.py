"""tpa_jax.model.rope against RoPE written from its own frequency formula (float64 NumPy)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tpa_jax.model.rope import apply_rope, rope_tables

from model_reference import rotation_matrix


@functools.partial(jax.jit, static_argnums=2)
def _rotate(x, positions, d):
    """apply_rope with the tables of ``positions`` as one compiled program (eager ops compile one by one)."""
    return apply_rope(x, *rope_tables(positions, d))


def test_tables_are_cos_sin_of_position_times_frequency():
    d, theta = 12, 500.0
    pos = np.array([[0, 1, 7, 63]])
    tables = jax.jit(rope_tables, static_argnums=(1, 2, 3))  # one program per call, not eager ops
    cos, sin = tables(jnp.asarray(pos), d, theta, False)
    angle = pos[..., None] * theta ** (-2.0 * np.arange(d // 2) / d)
    assert cos.shape == sin.shape == (1, 4, d // 2) and cos.dtype == jnp.float32
    np.testing.assert_allclose(cos, np.cos(angle), atol=1e-5)
    np.testing.assert_allclose(sin, np.sin(angle), atol=1e-5)
    # the official bf16-rounded tables: within bf16's relative precision, and really rounded
    cos16, sin16 = tables(jnp.asarray(pos), d, theta, True)
    np.testing.assert_allclose(cos16, np.cos(angle), rtol=2 ** -8, atol=2 ** -9)
    np.testing.assert_allclose(sin16, np.sin(angle), rtol=2 ** -8, atol=2 ** -9)
    assert float(jnp.abs(cos16 - cos).max()) > 1e-5


@pytest.mark.parametrize("batched_tables", [False, True])
def test_apply_rope_is_the_rotation_matrix(batched_tables):
    """x [B, T, R, d] rotated per position, the tables broadcasting over the middle axis."""
    rng = np.random.default_rng(0)
    d, pos = 10, np.array([0, 3, 17])
    x = rng.standard_normal((2, 3, 2, d)).astype(np.float32)
    positions = np.stack([pos, pos + 5]) if batched_tables else pos  # [B, T] or [T]
    got = np.asarray(_rotate(jnp.asarray(x), jnp.asarray(positions), d))
    for b in range(2):
        for j in range(3):
            p = positions[b, j] if batched_tables else positions[j]
            np.testing.assert_allclose(got[b, j], x[b, j] @ rotation_matrix(p, d), rtol=1e-5, atol=1e-5)


def test_official_sign_and_dtype():
    """First half y1 = x1 cos + x2 sin: rotating the unit vector x2[0] = 1 by position 3 gives
    y1[0] = sin(3), y2[0] = cos(3) (frequency 1 for j = 0).  The dtype of x is kept."""
    d = 8
    e = np.zeros(d, np.float32)
    e[d // 2] = 1.0
    y = np.asarray(_rotate(jnp.asarray(e)[None, None], jnp.asarray([[3]]), d))[0, 0]
    assert np.isclose(y[0], np.sin(3.0), atol=1e-6) and np.isclose(y[d // 2], np.cos(3.0), atol=1e-6)
    x16 = jnp.ones((1, 2, d), jnp.bfloat16)
    assert _rotate(x16, jnp.arange(2), d).dtype == jnp.bfloat16
