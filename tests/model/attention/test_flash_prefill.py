"""Cached prefill of TPA through FlashTPA Alg. 1 (``decode_impl="flash"``) equals the materialising
path (K and V rebuilt from the cache, ``decode_impl="materialize"``) to 1e-5 in float32 for every
TPA variant: per layer with ragged chunk starts (a first chunk, a later chunk against the filled
cache, a decode step), and through the model with ragged prompts (``valid_lengths``); and a flash
prefill never forms a per-head K or V."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tpa_jax
from tpa_jax.inference import init_cache
from tpa_jax.model.attention import TPAttention
from tpa_jax.model.attention.core import AttentionMask
from tpa_jax.model.rope import rope_tables

from _util import VARIANTS, cfg_of, init_params, largest_intermediate, tokens
from model_reference import as_f32, init_layer

TPA_NAMES = [n for n, v in VARIANTS.items() if v.get("attention", "tpa").startswith("tpa")]
B, S, T = 2, 24, 7


def _layer_step(cfg):
    """One TPA layer's cached call for new tokens at rows start_B .. start_B + t - 1 (the model's mask)."""
    module = TPAttention(cfg)

    @jax.jit
    def step(p, x_BTM, cache, start_B):
        t = x_BTM.shape[1]
        q_positions_BT = start_B[:, None] + jnp.arange(t)[None, :]
        mask_BTS = AttentionMask(q_positions_BT, start_B + t)
        return module.apply({"params": p}, x_BTM, rope_tables(q_positions_BT, cfg.rope_dim), mask_BTS, cache=cache,
                            key_rope=rope_tables(jnp.arange(S)[None], cfg.rope_dim), start_B=start_B)

    return step


@pytest.mark.parametrize("name", TPA_NAMES)
def test_layer_flash_prefill_matches_materialize(name):
    """A first chunk of T tokens into a cache of garbage (row 0 keeps only 4 of them, as a shorter
    prompt would), then a later chunk at per-row offsets (4, T) (decode steps: test_generate)."""
    cfg = cfg_of(name, decode_impl="materialize", decode_block_size=5, prefill_q_block_size=3)
    p = as_f32(init_layer(TPAttention, cfg))
    rng = np.random.default_rng(0)
    garbage = {k: jnp.asarray(3 * rng.standard_normal((B, S) + leaf.shape), jnp.float32)
               for k, leaf in TPAttention.cache_spec(cfg).items()}
    starts = [(0, 0), (4, T)]
    xs = [jnp.asarray(rng.standard_normal((B, T, cfg.d_model)), jnp.float32) for _ in starts]
    outs = {}
    for impl in ("materialize", "flash"):
        step, cache, outs[impl] = _layer_step(dataclasses.replace(cfg, decode_impl=impl)), garbage, []
        for x, start in zip(xs, starts):
            out, cache = step(p, x, cache, jnp.asarray(start, jnp.int32))
            outs[impl].append(np.asarray(out))
    for got, want in zip(outs["flash"], outs["materialize"]):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert np.abs(outs["flash"][1][0] - outs["flash"][1][1]).max() > 1e-3  # rows differ: the check has teeth


@pytest.mark.parametrize("name", ["tpa", "tpa_kvonly"])
def test_model_ragged_prompts_flash_prefill(name):
    """Through the model: prompts of 6 and 10 tokens in one padded chunk, a later chunk with 10 and
    3 valid tokens, then a decode step; logits at every valid position agree."""
    cfg = cfg_of(name, decode_impl="materialize", decode_block_size=8, prefill_q_block_size=4)
    _, params = init_params(cfg)
    chunk = 10
    outs = {}
    for impl in ("materialize", "flash"):
        logits_of = tpa_jax.logits_fn(dataclasses.replace(cfg, decode_impl=impl))
        step = jax.jit(lambda p, t, c, v: logits_of(p, t, cache=c, valid_lengths=v))
        cache, outs[impl] = init_cache(cfg, 2, 40, dtype="float32"), []
        for seed, valid in ((0, (6, chunk)), (1, (chunk, 3)), (2, (1, 1))):
            t = chunk if seed < 2 else 1
            logits, cache = step(params, tokens(cfg, 2, t, seed=seed), cache, jnp.array(valid))
            outs[impl] += [np.asarray(logits[b, :min(n, t)]) for b, n in enumerate(valid)]
        np.testing.assert_array_equal(cache["lengths"], [17, 14])
    for got, want in zip(outs["flash"], outs["materialize"]):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["tpa", "tpa_kvonly"])
def test_flash_prefill_never_builds_per_head_keys(name):
    """A 16-token chunk against a 256-row cache: the materialising path forms K (B S H D numbers),
    the flash path nothing that large."""
    b, s, t = 2, 256, 16
    cfg = cfg_of(name, max_seq_len=s, decode_block_size=32)
    params = tpa_jax.model.abstract_params(cfg)  # only traced: shapes suffice, no init to compile
    sizes = {}
    for impl in ("flash", "materialize"):
        logits_of = tpa_jax.logits_fn(dataclasses.replace(cfg, decode_impl=impl))
        sizes[impl] = largest_intermediate(lambda p, x, c: logits_of(p, x, cache=c), params,
                                           jnp.zeros((b, t), jnp.int32), init_cache(cfg, b, s, dtype="float32"))
    per_head_kv = b * s * cfg.n_head * cfg.head_dim
    assert sizes["materialize"] >= per_head_kv > sizes["flash"]
