"""Generation: greedy == explicit full-forward loop, per-sequence stops, sampling filters,
determinism, sharded caches, one-line errors; FlashTPA / absorbed-MLA decode inside the model."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tpa_jax
from tpa_jax import parallel
from tpa_jax.inference import generate, init_cache
from tpa_jax.inference.generate import sample_logits

from _util import cfg_of, forward, init_params, largest_intermediate, tokens


def greedy_reference(model, params, prompt, n_new, width=16):
    """Greedy continuation by full forward passes (no cache) over a fixed-width buffer: the model is
    causal, so the zeros after position i do not change the logits at i (and one compile serves)."""
    fwd = forward(model)
    buf = np.zeros((1, width), np.int32)
    buf[0, :len(prompt)] = prompt
    for i in range(len(prompt), len(prompt) + n_new):
        logits = np.asarray(fwd(params, jnp.asarray(buf)))
        buf[0, i] = int(np.argmax(logits[0, i - 1]))
    return buf[0, len(prompt):len(prompt) + n_new].tolist()


@pytest.mark.parametrize("name", ["tpa", "tpa_kvonly", "gqa", "mla"])
def test_greedy_generation_matches_full_forward_loop(name):
    cfg = cfg_of(name)
    model, params = init_params(cfg)
    prompts = [list(np.asarray(tokens(cfg, 1, n, seed=n))[0]) for n in (3, 7)]
    out = generate(params, cfg, prompts, 6)
    assert out.tokens.shape == (2, 6) and out.lengths.tolist() == [6, 6]
    for row, prompt in zip(out.tokens, prompts):
        assert row.tolist() == greedy_reference(model, params, prompt, 6)


def test_stops_per_sequence_and_pads():
    cfg = cfg_of("tpa")
    model, params = init_params(cfg)
    prompts = [[5, 6, 7], [8, 9]]
    free = generate(params, cfg, prompts, 8)
    stop = int(free.tokens[0, 2])  # row 0 must stop at its 3rd token
    out = generate(params, cfg, prompts, 8, stop_tokens=[stop], pad_id=0)
    first = [list(r).index(stop) + 1 if stop in list(r) else 8 for r in free.tokens]
    assert out.lengths.tolist() == first
    for row, n, ref in zip(out.tokens, out.lengths, free.tokens):
        assert row[:n].tolist() == ref[:n].tolist()  # identical up to and including the stop token
        assert (row[n:] == 0).all()


def test_sampling_is_deterministic_per_seed():
    cfg = cfg_of("tpa")
    _, params = init_params(cfg)
    kw = dict(temperature=1.5, top_k=20, top_p=0.95)
    a = generate(params, cfg, [[1, 2, 3]] * 3, 12, seed=7, **kw)
    b = generate(params, cfg, [[1, 2, 3]] * 3, 12, seed=7, **kw)
    c = generate(params, cfg, [[1, 2, 3]] * 3, 12, seed=8, **kw)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert (a.tokens != c.tokens).any()
    assert (a.tokens[0] != a.tokens[1]).any()  # rows of one batch draw independently
    greedy = generate(params, cfg, [[1, 2, 3]], 12)
    np.testing.assert_array_equal(generate(params, cfg, [[1, 2, 3]], 12, temperature=1.0, top_k=1).tokens,
                                  greedy.tokens)


def test_top_k_and_top_p_restrict_the_support():
    probs = np.asarray([0.5, 0.3, 0.15, 0.05])
    logits = jnp.asarray(np.log(np.tile(probs, (4000, 1))), jnp.float32)
    draw = lambda **kw: np.asarray(sample_logits(logits, jax.random.key(0), temperature=jnp.float32(1.0),
                                                 greedy=False, **kw))
    free = draw(top_k=None, top_p=None)
    np.testing.assert_allclose(np.bincount(free, minlength=4) / 4000, probs, atol=0.03)
    k2 = draw(top_k=2, top_p=None)
    assert set(k2.tolist()) == {0, 1}
    np.testing.assert_allclose((k2 == 0).mean(), 0.5 / 0.8, atol=0.03)
    p = draw(top_k=None, top_p=jnp.float32(0.7))  # 0.5 < 0.7 <= 0.8: tokens 0 and 1
    assert set(p.tolist()) == {0, 1}
    p = draw(top_k=None, top_p=jnp.float32(0.81))  # needs the third token too
    assert set(p.tolist()) == {0, 1, 2}
    tiny = draw(top_k=None, top_p=jnp.float32(1e-6))  # the most likely token is always kept
    assert set(tiny.tolist()) == {0}


def test_bad_input_is_one_line():
    cfg = cfg_of("tpa")  # max_seq_len 64, vocab 97
    _, params = init_params(cfg)
    cases = [
        (dict(prompt_tokens=[list(range(10)) * 7], max_new_tokens=1), "longer than max_len"),
        (dict(prompt_tokens=[[1] * 60], max_new_tokens=10), "past the cache capacity"),
        (dict(prompt_tokens=[[1, 2, 97]], max_new_tokens=2), "outside the vocabulary"),
        (dict(prompt_tokens=[[1, -1]], max_new_tokens=2), "outside the vocabulary"),
        (dict(prompt_tokens=[[]], max_new_tokens=2), "empty"),
        (dict(prompt_tokens=[[1]], max_new_tokens=0), "max_new_tokens"),
        (dict(prompt_tokens=[[1]], max_new_tokens=2, top_p=1.5), "top_p"),
        (dict(prompt_tokens=[[1]], max_new_tokens=2, max_len=128), "max_seq_len"),
    ]
    for kw, match in cases:
        with pytest.raises(ValueError, match=match) as e:
            generate(params, cfg, **kw)
        assert "\n" not in str(e.value)


def test_sharded_cache_matches_unsharded():
    cfg = dataclasses.replace(cfg_of("tpa"), n_head=4)
    _, params = init_params(cfg)
    mesh = parallel.make_mesh(data=2, fsdp=2, tensor=2)
    cache = init_cache(cfg, 4, 32)
    sh = tpa_jax.inference.cache_shardings(cfg, cache, mesh)
    assert sh["layers"]["a_k"].spec == jax.sharding.PartitionSpec(None, ("data", "fsdp"), None, None, "tensor")
    assert sh["layers"]["b_k"].spec == jax.sharding.PartitionSpec(None, ("data", "fsdp"))
    prompts = [[1, 2, 3], [4, 5], [6], [7, 8, 9, 10]]
    ref = generate(params, cfg, prompts, 5)
    with parallel.mesh_context(mesh):
        out = generate(params, cfg, prompts, 5, mesh=mesh)
    np.testing.assert_array_equal(out.tokens, ref.tokens)


# ------------------------------------------------------------------ decode paths inside the model
def _decode_logits(cfg, params, tok, prefill=5):
    logits_of = tpa_jax.logits_fn(cfg)
    step = jax.jit(lambda p, t, c: logits_of(p, t, cache=c))
    cache = init_cache(cfg, tok.shape[0], 64, dtype="float32")
    _, cache = step(params, tok[:, :prefill], cache)
    outs = []
    for t in range(prefill, tok.shape[1]):
        logits, cache = step(params, tok[:, t:t + 1], cache)
        outs.append(np.asarray(logits[:, 0]))
    return np.stack(outs, 1)


@pytest.mark.parametrize("name,impls", [("tpa", ("flash", "pallas")), ("tpa_kvonly", ("flash",)),
                                        ("tpa_order3", ("flash",)), ("tpa_shared_b_nonctx_b", ("flash",)),
                                        ("mla", ("flash",))])
def test_decode_impls_agree(name, impls):
    """FlashTPA (jnp and the Pallas kernel in interpret mode) and absorbed MLA == materialised K/V."""
    cfg = cfg_of(name, decode_impl="materialize")
    _, params = init_params(cfg)
    tok = tokens(cfg, batch=2, seq=9)
    ref = _decode_logits(cfg, params, tok)
    for impl in impls:
        c = dataclasses.replace(cfg, decode_impl=impl, decode_block_size=16)
        got = _decode_logits(c, params, tok)
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["tpa", "mla"])
def test_flash_decode_never_builds_per_head_keys(name):
    """With a long cache, the one-token decode step forms nothing of size B*S*H*D (K or V per head)
    while the materialising reference does."""
    b, s = 2, 256
    sizes = {}
    for impl in ("flash", "materialize"):
        cfg = cfg_of(name, decode_impl=impl, max_seq_len=s, decode_block_size=32)
        _, params = init_params(cfg)
        cache = init_cache(cfg, b, s, dtype="float32")
        tok = jnp.zeros((b, 1), jnp.int32)
        logits_of = tpa_jax.logits_fn(cfg)
        sizes[impl] = largest_intermediate(lambda p, t, c: logits_of(p, t, cache=c), params, tok, cache)
    per_head_kv = b * s * cfg.n_head * cfg.head_dim
    assert sizes["materialize"] >= per_head_kv
    assert sizes["flash"] < per_head_kv
