"""Decoding over a cache whose length axis is split over the mesh's ``context`` axis: each device
attends to its own rows (FlashTPA's partial for TPA, the blocked kernel for the baselines) and the
partial softmaxes are merged by their log-sum-exps.  Prefill and one-token decode logits equal the
unsharded cache's (float32, 1e-5) with ragged prompts, so that some shards hold no filled row."""
import contextlib
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tpa_jax
from tpa_jax import configs, parallel
from tpa_jax.inference import init_cache

MAX_LEN, LENGTHS = 32, (3, 11, 7, 1)  # 8 shards of 4 rows: rows 16..31 stay empty on every shard
MESHES = {"c8": (1, 1, 1, 8), "c4f2": (1, 2, 1, 4)}


def cfg_of(name, **kw):
    heads = {"n_head": 4} if name in ("mha", "gqa", "mla") else {}
    return configs.get(f"{name}-tiny", compute_dtype="float32", n_layer=1, max_seq_len=64, decode_block_size=2,
                       attention_block_size=2, **heads, **kw)


@functools.lru_cache(maxsize=None)
def setup(name):
    cfg = cfg_of(name)
    params = tpa_jax.init_params(cfg, jax.random.key(0))
    noise = lambda p: p + 0.02 * jax.random.normal(jax.random.key(3), p.shape, p.dtype)
    params = jax.jit(lambda ps: jax.tree.map(noise, ps))(params)  # one program, not one per leaf shape
    rng = np.random.default_rng(0)
    prompts = rng.integers(0, cfg.vocab_size, (len(LENGTHS), max(LENGTHS)))
    steps = rng.integers(0, cfg.vocab_size, (3, len(LENGTHS), 1))
    return cfg, params, jnp.asarray(prompts, jnp.int32), jnp.asarray(LENGTHS, jnp.int32), jnp.asarray(steps, jnp.int32)


def run(name, mesh=None, **kw):
    """Logits of the ragged prefill and of three one-token decode steps."""
    _, params, prompts, lengths, steps = setup(name)
    cfg = cfg_of(name, **kw)
    forward = jax.jit(tpa_jax.logits_fn(cfg))
    out = []
    with parallel.mesh_context(mesh) if mesh is not None else contextlib.nullcontext():
        cache = init_cache(cfg, len(LENGTHS), MAX_LEN, mesh=mesh)
        if mesh is not None:
            assert cache["layers"][next(iter(cache["layers"]))].sharding.spec[2] == "context"
        logits, cache = forward(params, prompts, cache=cache, valid_lengths=lengths)
        out.append(logits[jnp.arange(len(LENGTHS)), lengths - 1])
        for tok in steps:
            logits, cache = forward(params, tok, cache=cache)
            out.append(logits[:, 0])
    return np.asarray(jnp.stack(out))


@functools.lru_cache(maxsize=None)
def unsharded(name):
    """``run(name)`` on one device, computed once per mechanism (the reference of every mesh)."""
    return run(name)


@pytest.mark.parametrize("name, mesh_name", [("t6", "c8"), ("t6", "c4f2"), ("t6-kvonly", "c8"), ("gqa", "c8"),
                                             ("mha", "c4f2"), ("mla", "c8")])
def test_sharded_cache_decode_equals_unsharded(name, mesh_name):
    want = unsharded(name)
    got = run(name, parallel.make_mesh(*MESHES[mesh_name]))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_tpa_materialize_path():
    """TPA's materialising path (K and V rebuilt from the sharded factors, partitioned by XLA) agrees too."""
    mesh = parallel.make_mesh(*MESHES["c8"])
    np.testing.assert_allclose(run("t6", mesh, decode_impl="materialize"), unsharded("t6"), rtol=1e-5, atol=1e-5)


def test_generate_on_a_context_mesh_equals_one_device():
    cfg, params, prompts, lengths, _ = setup("t6")
    rows = [list(np.asarray(p[:n])) for p, n in zip(prompts, lengths)]
    want = tpa_jax.generate(params, cfg, rows, 6, max_len=MAX_LEN)
    got = tpa_jax.generate(params, cfg, rows, 6, max_len=MAX_LEN, mesh=parallel.make_mesh(*MESHES["c8"]))
    np.testing.assert_array_equal(got.tokens, want.tokens)


def test_indivisible_cache_length_is_one_line_error():
    cfg = cfg_of("t6")
    mesh = parallel.make_mesh(*MESHES["c8"])
    with pytest.raises(ValueError, match="max_len=30 is not divisible by the mesh's context axis 8") as e:
        init_cache(cfg, 2, 30, mesh=mesh)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="max_len=20 is not divisible by the mesh's context axis 8"):
        tpa_jax.generate(setup("t6")[1], cfg, [[1, 2]], 4, max_len=20, mesh=mesh)
