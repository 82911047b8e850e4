"""tpa_jax.model.transformer: the decoder for every mechanism (causality, scan / unrolled / remat
agree, bfloat16 compute) and the entry point (cross-entropy against its formula, one function per
config)."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tpa_jax
from tpa_jax.model import cross_entropy, logits_fn, loss_fn, model_of

from _util import VARIANTS, cfg_of, forward, init_params, tokens


@pytest.mark.parametrize("name", list(VARIANTS))
def test_causality(name):
    cfg = cfg_of(name)
    model, params = init_params(cfg)
    tok = tokens(cfg, seq=12)
    fwd = forward(model)
    base = fwd(params, tok)
    assert base.dtype == jnp.float32 and base.shape == (2, 12, cfg.vocab_size)
    for t in (0, 5, 10):
        changed = tok.at[:, t + 1:].set((tok[:, t + 1:] + 7) % cfg.vocab_size)
        out = fwd(params, changed)
        np.testing.assert_array_equal(np.asarray(out[:, : t + 1]), np.asarray(base[:, : t + 1]))
        assert float(jnp.abs(out[:, t + 1:] - base[:, t + 1:]).max()) > 1e-4  # the future did change


def test_unrolled_and_remat_match_scan():
    cfg = cfg_of("tpa")
    model, params = init_params(cfg)
    tok = tokens(cfg)

    def value_and_grad(m):
        return jax.jit(jax.value_and_grad(lambda p: (m.apply({"params": p}, tok) ** 2).mean()))

    base, ref = value_and_grad(model)(params)
    for change in (dict(scan_layers=False), dict(remat_policy="full"), dict(remat_policy="dots")):
        other = tpa_jax.Transformer(dataclasses.replace(cfg, **change))
        val, grads = value_and_grad(other)(params)
        np.testing.assert_allclose(val, base, rtol=1e-5)
        for g, r in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(ref)):
            np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5)


def test_bfloat16_compute_keeps_float32_params_and_logits():
    cfg = dataclasses.replace(cfg_of("tpa"), compute_dtype="bfloat16")
    model, params = init_params(cfg)
    assert all(l.dtype == jnp.float32 for l in jax.tree_util.tree_leaves(params))
    tok = tokens(cfg)
    out = forward(model)(params, tok)
    ref = forward(init_params(dataclasses.replace(cfg, compute_dtype="float32"))[0])(params, tok)
    assert out.dtype == jnp.float32
    assert float(jnp.abs(out - ref).max()) < 0.1 * float(jnp.abs(ref).max())


def test_cross_entropy_formula_with_ignored_targets():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((2, 5, 7)) * 3
    targets = rng.integers(0, 7, (2, 5))
    targets[0, 1] = targets[1, 4] = -1
    got = float(cross_entropy(jnp.asarray(logits, jnp.float32), jnp.asarray(targets)))
    nll = [np.log(np.exp(logits[b, t]).sum()) - logits[b, t, targets[b, t]]
           for b in range(2) for t in range(5) if targets[b, t] != -1]
    np.testing.assert_allclose(got, np.mean(nll), rtol=1e-5)
    assert float(cross_entropy(jnp.zeros((1, 2, 3)), jnp.full((1, 2), -1))) == 0.0  # nothing scored


def test_entry_point_is_one_function_per_config():
    cfg = cfg_of("tpa")
    same = dataclasses.replace(cfg)
    assert model_of(cfg) is model_of(same) and logits_fn(cfg) is logits_fn(same) and loss_fn(cfg) is loss_fn(same)
    assert logits_fn(cfg) is not logits_fn(dataclasses.replace(cfg, n_layer=1))
