"""Factorised decode caches: cached prefill + token-by-token decode == the full forward."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tpa_jax import accounting
from tpa_jax.inference import cache_bytes_per_token, init_cache

from _util import VARIANTS, cfg_of, forward, init_params, tokens


def cached_apply(model):
    return jax.jit(lambda p, t, c, v=None: model.apply({"params": p}, t, cache=c, valid_lengths=v))


@pytest.mark.parametrize("name", list(VARIANTS))
def test_decode_reproduces_full_forward(name):
    cfg = cfg_of(name)
    model, params = init_params(cfg)
    tok = tokens(cfg, batch=2, seq=10)
    full = np.asarray(forward(model)(params, tok))
    step = cached_apply(model)
    cache = init_cache(cfg, 2, 16, dtype="float32")
    logits, cache = step(params, tok[:, :4], cache)  # prefill
    np.testing.assert_allclose(logits, full[:, :4], rtol=1e-4, atol=1e-4)
    for t in range(4, 10):  # one token at a time
        logits, cache = step(params, tok[:, t:t + 1], cache)
        np.testing.assert_allclose(logits[:, 0], full[:, t], rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(cache["lengths"], [10, 10])


@pytest.mark.parametrize("name", ["tpa", "gqa", "mla"])
def test_batch_of_prompts_with_different_lengths(name):
    cfg = cfg_of(name)
    model, params = init_params(cfg)
    seqs = [np.asarray(tokens(cfg, batch=1, seq=9, seed=s))[0] for s in (1, 2)]
    prompt_lens = [3, 6]
    fwd = forward(model)
    full = [np.asarray(fwd(params, jnp.asarray(s)[None]))[0] for s in seqs]
    prompts = np.zeros((2, 6), np.int32)
    for i, (s, n) in enumerate(zip(seqs, prompt_lens)):
        prompts[i, :n] = s[:n]
    step = cached_apply(model)
    cache = init_cache(cfg, 2, 12, dtype="float32")
    logits, cache = step(params, jnp.asarray(prompts), cache, jnp.asarray(prompt_lens))
    for i, n in enumerate(prompt_lens):
        np.testing.assert_allclose(logits[i, :n], full[i][:n], rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(cache["lengths"], prompt_lens)
    pos = list(prompt_lens)
    for _ in range(3):  # each row decodes its own next token at its own position
        nxt = jnp.asarray([[seqs[i][pos[i]]] for i in range(2)], jnp.int32)
        logits, cache = step(params, nxt, cache)
        for i in range(2):
            np.testing.assert_allclose(logits[i, 0], full[i][pos[i]], rtol=1e-4, atol=1e-4)
            pos[i] += 1


@pytest.mark.parametrize("name", list(VARIANTS))
def test_cache_bytes_equal_the_accounting(name):
    cfg = cfg_of(name)
    for dtype, nbytes in (("float32", 4), ("bfloat16", 2)):
        cache = init_cache(cfg, 3, 8, dtype=dtype)
        assert cache_bytes_per_token(cache) == accounting.kv_cache_per_token(cfg) * cfg.n_layer * nbytes


def test_tpa_cache_holds_factors_not_kv():
    cfg = cfg_of("tpa")
    cache = init_cache(cfg, 2, 8)
    assert set(cache["layers"]) == {"a_k", "b_k", "a_v", "b_v"}
    assert cache["layers"]["a_k"].shape == (cfg.n_layer, 2, 8, cfg.k_rank, cfg.n_head)
    assert cache["layers"]["b_k"].shape == (cfg.n_layer, 2, 8, cfg.k_rank, cfg.head_dim)
    mla = init_cache(cfg_of("mla"), 2, 8)
    assert set(mla["layers"]) == {"c_kv", "k_r"}
    with pytest.raises(ValueError, match="max_len"):
        init_cache(cfg, 1, cfg.max_seq_len + 1)


def test_cached_keys_are_pre_rotated():
    """The cached B_K of a token equals its RoPE-rotated factor (eq. 3.5), independent of later steps."""
    from tpa_jax.model.rope import apply_rope, rope_tables

    cfg = dataclasses.replace(cfg_of("tpa"), n_layer=1)
    model, params = init_params(cfg)
    tok = tokens(cfg, batch=1, seq=5)
    _, cache = cached_apply(model)(params, tok, init_cache(cfg, 1, 8, dtype="float32"))
    x = model.apply({"params": params}, tok, method=lambda m, t: m.embed(t))
    from tpa_jax.model.layers import rms_norm

    h = rms_norm(x, cfg.norm_eps)
    w_bk = params["blocks"]["attn"]["w_bk"][0]
    raw = jnp.einsum("btm,mrd->btrd", h, w_bk)
    want = apply_rope(raw, *rope_tables(jnp.arange(5)[None], cfg.head_dim))
    np.testing.assert_allclose(cache["layers"]["b_k"][0, :, :5], want, rtol=1e-5, atol=1e-5)
    assert float(jnp.abs(cache["layers"]["b_k"][0, :, 1:5] - raw[:, 1:]).max()) > 1e-3
