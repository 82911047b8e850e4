"""ModelConfig.attention_impl through the whole model: for every mechanism, "blocked" and "splash"
(the Pallas interpreter on CPU) give the logits and parameter gradients of "xla" (the einsum
reference) in the full forward (T not a multiple of the block), in a cached prefill with per-row
lengths, and on the sharded (2, 2, 2) fake mesh."""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tpa_jax
from tpa_jax import parallel
from tpa_jax.inference import init_cache
from tpa_jax.model import cross_entropy

from _util import cfg_of, init_params

MECHANISMS = ["tpa", "tpa_kvonly", "mha", "mqa", "gqa", "mla"]
BLOCK = 5  # queries per tile and keys per block of "blocked": T = 12 is not a multiple
TOL = dict(rtol=1e-5, atol=1e-5)


def cfg_for(name, impl):
    # decode_impl="materialize": TPA's cached prefill then runs through attention_impl (with "flash" it
    # runs FlashTPA's Alg. 1, tested against materialize in tests/model/attention/test_flashtpa.py)
    return cfg_of(name, attention_impl=impl, attention_block_size=BLOCK, decode_impl="materialize")


@functools.lru_cache(maxsize=None)
def setup(name, seq=12):
    """Parameters and a batch of 4 (the sharded mesh splits it over (data, fsdp)); the full forward
    runs on all 4 rows, so one-device and sharded runs share one reference program."""
    _, params = init_params(cfg_for(name, "xla"), seed=3)
    tokens = jax.random.randint(jax.random.key(7), (4, seq), 0, 97, jnp.int32)
    return params, tokens


def full_loss(cfg, params, tokens):
    """(loss, logits) of the full forward: the training path."""
    logits = tpa_jax.logits_fn(cfg)(params, tokens)
    return cross_entropy(logits[:, :-1], tokens[:, 1:]), logits


def prefill_loss(cfg, params, tokens):
    """Two cached prefills of the first 2 rows: 5 tokens with valid lengths (5, 3), then 4 more, so the
    second chunk's rows start at positions 5 and 3 and see 9 and 7 keys of a 16-row cache."""
    tokens = tokens[:2]
    apply = tpa_jax.logits_fn(cfg)
    cache = init_cache(cfg, tokens.shape[0], 16, dtype="float32")
    logits1, cache = apply(params, tokens[:, :5], cache=cache, valid_lengths=jnp.asarray([5, 3]))
    logits2, cache = apply(params, tokens[:, 5:9], cache=cache)
    w = jnp.cos(jnp.arange(logits2.shape[-1], dtype=jnp.float32))  # fixed weights: every logit counts
    return jnp.mean(logits1[:, :3] * w) + jnp.mean(logits2 * w), (logits1[:, :3], logits2)


@functools.lru_cache(maxsize=None)
def reference(name, path):
    params, tokens = setup(name)
    fn = {"full": full_loss, "prefill": prefill_loss}[path]
    out = jax.jit(jax.value_and_grad(functools.partial(fn, cfg_for(name, "xla")), has_aux=True))(params, tokens)
    return jax.device_get(out)


def check_same(got, want):
    (_, aux_got), grads_got = got
    (_, aux_want), grads_want = want
    for a, b in zip(jax.tree.leaves(aux_got), jax.tree.leaves(aux_want)):
        np.testing.assert_allclose(a, b, **TOL)
    for path, a in jax.tree_util.tree_leaves_with_path(grads_got):
        b = dict(jax.tree_util.tree_leaves_with_path(grads_want))[path]
        np.testing.assert_allclose(a, b, err_msg=jax.tree_util.keystr(path), **TOL)
    assert max(float(np.abs(g).max()) for g in jax.tree.leaves(grads_want)) > 1e-2


def run(name, impl, path):
    params, tokens = setup(name)
    fn = {"full": full_loss, "prefill": prefill_loss}[path]
    return jax.jit(jax.value_and_grad(functools.partial(fn, cfg_for(name, impl)), has_aux=True))(params, tokens)


@pytest.mark.parametrize("name", MECHANISMS)
def test_blocked_full_forward_matches_xla(name):
    check_same(run(name, "blocked", "full"), reference(name, "full"))


@pytest.mark.slow
@pytest.mark.parametrize("name", MECHANISMS)
def test_blocked_cached_prefill_with_ragged_lengths_matches_xla(name):
    check_same(run(name, "blocked", "prefill"), reference(name, "prefill"))


# the Pallas interpreter's programs take a while to compile on CPU: every mechanism in the full
# forward, the cached prefill for the three attention modules (TPA, grouped heads, MLA's E != D)
@pytest.mark.slow
@pytest.mark.parametrize("name", MECHANISMS)
def test_splash_full_forward_matches_xla(name):
    check_same(run(name, "splash", "full"), reference(name, "full"))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tpa", "gqa", "mla"])
def test_splash_cached_prefill_with_ragged_lengths_matches_xla(name):
    check_same(run(name, "splash", "prefill"), reference(name, "prefill"))


@functools.lru_cache(maxsize=None)
def mesh_222():
    return parallel.make_mesh(2, 2, 2)


def run_sharded(name, impl):
    """The full-forward loss and gradients on the (2, 2, 2) mesh: params sharded by their logical
    axes, the batch of 4 over (data, fsdp)."""
    cfg = cfg_for(name, impl)
    params, tokens = setup(name)
    mesh = mesh_222()
    model = tpa_jax.model.model_of(cfg)
    abstract = jax.eval_shape(model.init, jax.random.key(0), tokens)
    shardings = parallel.param_shardings(abstract, mesh)["params"]
    with jax.set_mesh(mesh):
        params = jax.device_put(params, shardings)
        tokens = jax.device_put(tokens, parallel.batch_sharding(mesh, 4))
        out = jax.jit(jax.value_and_grad(functools.partial(full_loss, cfg), has_aux=True))(params, tokens)
    assert len(out[0][1].sharding.device_set) == 8
    return jax.device_get(out)


# blocked is plain jnp partitioned by XLA; splash runs per shard in shard_map: heads and kv heads
# split (tpa), query heads split with the one kv head replicated (mqa), heads replicated (gqa: 3
# kv heads on tensor=2); the batch of 4 is split over (data, fsdp)
@pytest.mark.slow
@pytest.mark.parametrize("name, impl", [("tpa", "blocked"), ("mla", "blocked"),
                                        ("tpa", "splash"), ("mqa", "splash"), ("gqa", "splash")])
def test_sharded_matches_xla(name, impl):
    check_same(run_sharded(name, impl), reference(name, "full"))


def test_config_field():
    cfg = cfg_of("tpa")
    assert cfg.attention_impl == "auto" and cfg.attention_block_size == 512
    for bad in ({"attention_impl": "flash"}, {"attention_block_size": 0}, {"attention_block_size": True}):
        with pytest.raises(ValueError, match=f"ModelConfig.{next(iter(bad))}") as exc:
            dataclasses.replace(cfg, **bad)
        assert "\n" not in str(exc.value)
