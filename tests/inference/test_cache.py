"""tpa_jax.inference.cache: the cache layout is what attention writes (for every mechanism and
variant), its size is the accounting's, and cached prefill + token-by-token decode == the full
forward."""
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tpa_jax import accounting, parallel
from tpa_jax.inference import cache_bytes_per_token, cache_layout, cache_logical_axes, init_cache
from tpa_jax.model.attention import attention_class
from tpa_jax.model.rope import rope_tables

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
def test_layout_is_what_attention_writes(name):
    """The attention module's kv_items for T tokens (traced abstractly) are exactly the layout's
    leaves, each [B, T, *per-token shape]; every per-token axis has a logical name of the rule table."""
    cfg = cfg_of(name)
    b, t = 2, 5
    module = attention_class(cfg)(cfg)
    rope = rope_tables(jnp.arange(t)[None], cfg.rope_dim)
    x = jax.ShapeDtypeStruct((b, t, cfg.d_model), jnp.float32)
    items, _ = jax.eval_shape(lambda x_: module.init_with_output(jax.random.key(0), x_, rope, method="kv_items"), x)
    layout = cache_layout(cfg)
    assert set(items) == set(layout), (sorted(items), sorted(layout))
    rule_names = {name for name, _ in parallel.LOGICAL_AXIS_RULES}
    for leaf, (shape, axes) in layout.items():
        assert items[leaf].shape == (b, t) + tuple(shape), leaf
        assert len(axes) == len(shape) and set(axes) <= rule_names, (leaf, axes)
    axes_tree = cache_logical_axes(cfg)
    cache = init_cache(cfg, b, 8)
    for leaf, arr in cache["layers"].items():
        assert arr.shape == (cfg.n_layer, b, 8) + tuple(layout[leaf][0])
        assert axes_tree["layers"][leaf] == ("layers", "batch", "cache_length") + tuple(layout[leaf][1])


@pytest.mark.parametrize("name", list(VARIANTS))
def test_cache_size_equals_the_accounting(name):
    """Numbers per token per layer measured on an init_cache pytree == accounting.kv_cache_per_token,
    and the measured bytes follow the dtype."""
    cfg = cfg_of(name)
    cache = init_cache(cfg, 3, 8, dtype="float32")
    per_token_per_layer = sum(math.prod(a.shape[3:]) for a in cache["layers"].values())
    assert per_token_per_layer == accounting.kv_cache_per_token(cfg)
    for dtype, nbytes in (("float32", 4), ("bfloat16", 2)):
        cache = init_cache(cfg, 3, 8, dtype=dtype)
        assert cache_bytes_per_token(cache) == per_token_per_layer * cfg.n_layer * nbytes


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


def _rotate(x, positions, theta=10000.0):
    """RoPE written out (official half-split convention): y1 = x1 cos + x2 sin, y2 = x2 cos - x1 sin,
    angle pos * theta^(-2j/d); x [B, T, ..., d]."""
    x = np.asarray(x, np.float64)
    half = x.shape[-1] // 2
    angle = np.asarray(positions)[:, None] * theta ** (-2.0 * np.arange(half) / x.shape[-1])  # [T, d/2]
    angle = angle.reshape((1, len(positions)) + (1,) * (x.ndim - 3) + (half,))
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * np.cos(angle) + x2 * np.sin(angle), x2 * np.cos(angle) - x1 * np.sin(angle)], -1)


def test_cached_keys_are_pre_rotated():
    """The cached B_K of a token equals its RoPE-rotated factor (eq. 3.5), independent of later steps."""
    cfg = dataclasses.replace(cfg_of("tpa"), n_layer=1)
    model, params = init_params(cfg)
    tok = tokens(cfg, batch=1, seq=5)
    _, cache = cached_apply(model)(params, tok, init_cache(cfg, 1, 8, dtype="float32"))
    x = np.asarray(params["embed"]["embedding"], np.float64)[np.asarray(tok)]  # [1, T, M]
    h = x / np.sqrt((x ** 2).mean(-1, keepdims=True) + cfg.norm_eps)  # the weight-free block norm
    raw = np.einsum("btm,mrd->btrd", h, np.asarray(params["blocks"]["attn"]["w_bk"][0], np.float64))
    cached = np.asarray(cache["layers"]["b_k"][0, :, :5])
    np.testing.assert_allclose(cached, _rotate(raw, np.arange(5)), rtol=1e-5, atol=1e-5)
    assert np.abs(cached[:, 1:] - raw[:, 1:5]).max() > 1e-3  # RoPE really acted
