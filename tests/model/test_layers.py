"""tpa_jax.model.layers against explicit float64 NumPy formulas: RMSNorm, SwiGLU, the tied
embedding, and parameter creation (initialiser bounds, dtype, logical axes)."""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tpa_jax.model.layers import Embedding, RMSNorm, SwiGLU, fan_in_init, param, rms_norm, uniform_init

from _util import BASE

CFG = dataclasses.replace(BASE, d_model=12, mlp_hidden=20, vocab_size=11)


def _np_rms(x, eps, w=None):
    y = x / np.sqrt((x ** 2).mean(-1, keepdims=True) + eps)
    return y if w is None else y * w


def test_rms_norm_formula_and_dtype():
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((2, 3, 12)), rng.standard_normal(12)
    np.testing.assert_allclose(rms_norm(jnp.asarray(x, jnp.float32), 1e-5), _np_rms(x, 1e-5), rtol=1e-5, atol=1e-6)
    got = RMSNorm(CFG, 12, 0.5, True).apply({"params": {"scale": jnp.asarray(w, jnp.float32)}},
                                            jnp.asarray(x, jnp.float32))
    np.testing.assert_allclose(got, _np_rms(x, 0.5, w), rtol=1e-5, atol=1e-6)  # a large eps shows it is used
    y16 = rms_norm(jnp.asarray(x, jnp.bfloat16), 1e-5)
    assert y16.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(y16, np.float32), _np_rms(x, 1e-5), rtol=1e-2, atol=1e-2)
    # the weight-free block norm has no parameters
    assert RMSNorm(CFG, 12, 1e-5, False).init(jax.random.key(0), jnp.ones((1, 1, 12))) == {}


def test_swiglu_formula():
    rng = np.random.default_rng(1)
    m, i = CFG.d_model, CFG.ffn_dim
    w1, w2, w3 = rng.standard_normal((m, i)), rng.standard_normal((m, i)), rng.standard_normal((i, m))
    x = rng.standard_normal((2, 4, m))
    params = {"w1": w1, "w2": w2, "w3": w3}
    got = SwiGLU(CFG).apply({"params": jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)},
                            jnp.asarray(x, jnp.float32))
    a = x @ w1
    want = (a / (1 + np.exp(-a)) * (x @ w2)) @ w3
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    assert CFG.ffn_dim == 20 and dataclasses.replace(CFG, mlp_hidden=None).ffn_dim == int(8 * 12 / 3)
    # init: W1, W2 as torch's nn.Linear (U(+-1/sqrt(M))), W3 zero so each block starts as the identity
    init = nn.meta.unbox(SwiGLU(CFG).init(jax.random.key(0), jnp.zeros((1, 1, m)))["params"])
    assert 0.9 / np.sqrt(m) < float(jnp.abs(init["w1"]).max()) <= 1 / np.sqrt(m)
    assert not np.any(np.asarray(init["w3"]))


def test_embedding_lookup_and_tied_head():
    rng = np.random.default_rng(2)
    table = rng.standard_normal((CFG.vocab_size, CFG.d_model))
    emb = Embedding(CFG)
    variables = {"params": {"embedding": jnp.asarray(table, jnp.float32)}}
    tok = np.array([[0, 3, 10], [5, 5, 1]])
    np.testing.assert_array_equal(emb.apply(variables, jnp.asarray(tok)), table[tok].astype(np.float32))
    x = rng.standard_normal((2, 3, CFG.d_model))
    logits = emb.apply(variables, jnp.asarray(x, jnp.float32), method=Embedding.attend)
    assert logits.dtype == jnp.float32
    np.testing.assert_allclose(logits, x @ table.T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bound, init", [(0.3, uniform_init(0.3)), (1 / np.sqrt(50), fan_in_init(50))])
def test_initialisers_draw_uniform_within_bound(bound, init):
    draws = np.asarray(init(jax.random.key(0), (4000,)))
    assert np.abs(draws).max() <= bound and np.abs(draws).max() > 0.99 * bound
    assert abs(draws.mean()) < 0.05 * bound and abs(draws.std() - bound / np.sqrt(3)) < 0.05 * bound


def test_param_has_param_dtype_and_logical_axes():
    cfg = dataclasses.replace(CFG, param_dtype="bfloat16")

    class One(nn.Module):
        cfg: object

        @nn.compact
        def __call__(self):
            return param(self, "w", nn.initializers.ones, (3, 4), ("embed", "heads"))

    boxed = One(cfg).init(jax.random.key(0))["params"]["w"]
    assert isinstance(boxed, nn.LogicallyPartitioned) and tuple(boxed.names) == ("embed", "heads")
    assert boxed.value.dtype == jnp.bfloat16 and boxed.value.shape == (3, 4)
