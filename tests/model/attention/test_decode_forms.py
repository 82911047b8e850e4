"""tpa_jax.model.attention.decode: one-token attention of MHA / MQA / GQA against the cache rows
before the token plus the token itself, in each form ("reduce", "gemm", "einsum"), against float64
NumPy softmax attention; junk past each length (even NaN in K) must not reach the output."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tpa_jax.model.attention.decode import DECODE_FORMS, decode_form, rows_attention, with_token


def decode_attention(q_B1HD, rows, new, start_B, *, scale, form):
    """The model's decode step on a contiguous cache: the rows' (o, lse), then the token joined."""
    q_BHD = q_B1HD[:, 0]
    return with_token(q_BHD, *rows_attention(q_BHD, *rows, start_B, scale=scale, form=form), new, scale=scale)


_decode = jax.jit(decode_attention, static_argnames=("scale", "form"))  # one compile per case, not per op

B, S, D, E = 3, 13, 8, 6


def _reference(q, k, v, start, k_new, v_new, scale):
    """Per sequence b and head h: softmax over rows < start[b] and the new token, head h reading kv h // G."""
    b, h, _ = q.shape
    g = h // k.shape[2]
    out = np.zeros((b, h, v.shape[-1]))
    for i in range(b):
        keys = np.concatenate([k[i, :start[i]], k_new[i]])  # [s + 1, K, D]
        vals = np.concatenate([v[i, :start[i]], v_new[i]])
        for j in range(h):
            logits = keys[:, j // g] @ q[i, j] * scale
            w = np.exp(logits - logits.max())
            out[i, j] = (w / w.sum()) @ vals[:, j // g]
    return out


@pytest.mark.parametrize("form", DECODE_FORMS)
@pytest.mark.parametrize("heads", [(4, 4), (6, 2), (5, 1)])  # MHA, GQA, MQA (odd head count)
def test_every_form_equals_softmax_over_the_rows_and_the_token(form, heads):
    h, kv = heads
    rng = np.random.default_rng(h * 10 + kv)
    q = rng.standard_normal((B, h, D))
    k, v = rng.standard_normal((B, S, kv, D)), rng.standard_normal((B, S, kv, E))
    k_new, v_new = rng.standard_normal((B, 1, kv, D)), rng.standard_normal((B, 1, kv, E))
    start = np.array([0, 7, S - 1])  # the first sequence sees only its own token
    want = _reference(q, k, v, start, k_new, v_new, 0.3)
    k_dirty = np.where(np.arange(S)[None, :, None, None] < start[:, None, None, None], k, np.nan)
    f32 = lambda x: jnp.asarray(x, jnp.float32)
    got = _decode(f32(q)[:, None], (f32(k_dirty), f32(v)), (f32(k_new), f32(v_new)), jnp.asarray(start),
                           scale=0.3, form=form)
    assert got.shape == (B, 1, h, E)
    np.testing.assert_allclose(np.asarray(got[:, 0]), want, rtol=1e-5, atol=1e-5)
    # teeth: a row inside a length matters
    k_touched = k_dirty.copy()
    k_touched[1, 6] += 2.0
    moved = _decode(f32(q)[:, None], (f32(k_touched), f32(v)), (f32(k_new), f32(v_new)), jnp.asarray(start),
                             scale=0.3, form=form)
    assert np.abs(np.asarray(moved[1, 0]) - want[1]).max() > 1e-3


def test_the_form_follows_backend_grouping_and_dtype():
    assert decode_form(16, 16, jnp.bfloat16, "cpu") == "reduce"
    assert decode_form(16, 16, jnp.float32, "cpu") == "gemm"
    assert decode_form(4, 16, jnp.bfloat16, "cpu") == "gemm"
    assert decode_form(16, 16, jnp.bfloat16, "gpu") == decode_form(4, 16, jnp.float32, "tpu") == "einsum"
