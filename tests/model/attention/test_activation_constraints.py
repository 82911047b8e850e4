"""Sharding constraints inside attention: under a (data, fsdp, tensor) mesh the lowered program pins
Q, K, V and the attention output (every mechanism), TPA's contextual factors and MLA's latents to
their logical layouts -- batch over (data, fsdp), heads over tensor -- and the sharded gradients
still equal one device's."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tpa_jax
from tpa_jax import configs, parallel

HEADS = {"mqa": 8, "mla": 4, "t6-kvonly": 4}  # head counts the tensor axis (2) divides
BATCH, SEQ = 4, 16
BATCH_SPEC = '{"data", "fsdp"}'


def _cfg(mechanism):
    extra = {"n_head": HEADS[mechanism]} if mechanism in HEADS else {}
    return configs.get(f"{mechanism}-tiny", compute_dtype="float32", **extra)


def _constraints(cfg):
    """(shape, per-dimension mesh axes) of every sharding constraint in the lowered forward."""
    params = jax.eval_shape(lambda: tpa_jax.init_params(cfg, jax.random.key(0)))  # only lowered: no init to run
    tokens = jnp.zeros((BATCH, SEQ), jnp.int32)
    with jax.set_mesh(parallel.make_mesh(2, 2, 2)):
        text = jax.jit(tpa_jax.logits_fn(cfg)).lower(params, tokens).as_text()
    out = []
    for m in re.finditer(r"sharding_constraint %\S+ <@mesh, \[(.*?)\]> : tensor<([0-9x]+)x\w+>", text):
        dims = tuple(re.findall(r"\{[^}]*\}", m.group(1)))
        out.append((tuple(int(d) for d in m.group(2).split("x")), dims))
    return out


@pytest.mark.parametrize("mechanism", list(configs.MECHANISMS))
def test_qkv_and_output_are_pinned_heads_over_tensor(mechanism):
    cfg = _cfg(mechanism)
    found = _constraints(cfg)
    h, kv = cfg.n_head, cfg.kv_heads
    heads, kv_split = '{"tensor"}', ('{"tensor"}' if kv % 2 == 0 else "{}")  # MQA's one KV head stays whole
    want = {"q": ((BATCH, SEQ, h, cfg.qk_dim), heads), "k": ((BATCH, SEQ, kv, cfg.qk_dim), kv_split),
            "v": ((BATCH, SEQ, kv, cfg.value_dim), kv_split), "out": ((BATCH, SEQ, h, cfg.value_dim), heads)}
    for name, (shape, spec) in want.items():
        assert (shape, (BATCH_SPEC, "{}", spec, "{}")) in found, (name, found)


@pytest.mark.parametrize("mechanism,n_a", [("t6", 3), ("t6-kvonly", 2)])
def test_tpa_factors_are_pinned(mechanism, n_a):
    cfg = _cfg(mechanism)
    found = _constraints(cfg)
    ranks = {cfg.q_rank, cfg.k_rank, cfg.v_rank}
    a = [s for s, d in found if len(s) == 4 and s[2] in ranks and s[3] == cfg.n_head and d[3] == '{"tensor"}'
         and d[0] == BATCH_SPEC]
    b = [s for s, d in found if len(s) == 4 and s[2] in ranks and s[3] == cfg.head_dim and d[0] == BATCH_SPEC
         and d[1:] == ("{}", "{}", "{}")]
    assert len(a) == n_a and len(b) == n_a, found  # A_Q, A_K, A_V (A_K, A_V for KV-only) and their B


def test_third_order_tpa_c_factors_are_pinned():
    cfg = configs.get("t6-tiny", compute_dtype="float32", tpa_order=3, tpa_c_dim=2)
    found = _constraints(cfg)
    ranks = (cfg.q_rank, cfg.k_rank, cfg.v_rank)
    # b [B, T, rank, d_b] and c [B, T, rank, d_c]: batch over (data, fsdp), the rest whole
    for dim in (cfg.b_dim, cfg.tpa_c_dim):
        got = sorted(s[2] for s, d in found if len(s) == 4 and s[3] == dim and s[2] in ranks
                     and d == (BATCH_SPEC, "{}", "{}", "{}"))
        assert got == sorted(ranks), (dim, found)


def test_mla_latents_are_pinned():
    cfg = _cfg("mla")
    found = _constraints(cfg)
    latents = sorted(s[2] for s, d in found if len(s) == 3 and d == (BATCH_SPEC, "{}", "{}")
                     and s[2] in (cfg.q_lora_rank, cfg.kv_lora_rank))
    assert latents == sorted([cfg.q_lora_rank, cfg.kv_lora_rank]), found


@pytest.mark.parametrize("mechanism", ["t6", "gqa", "mla"] + [pytest.param(m, marks=pytest.mark.slow)
                                                               for m in ("t6-kvonly", "mha", "mqa")])
def test_sharded_gradients_equal_one_device(mechanism):
    cfg = _cfg(mechanism)
    params = tpa_jax.init_params(cfg, jax.random.key(1))
    noise = lambda p: p + 0.02 * jax.random.normal(jax.random.key(2), p.shape, p.dtype)
    params = jax.jit(lambda ps: jax.tree.map(noise, ps))(params)  # one program, not one per leaf shape
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (BATCH, SEQ + 1)), jnp.int32)
    grad = jax.jit(jax.grad(tpa_jax.loss_fn(cfg)))
    ref = grad(params, tokens[:, :-1], tokens[:, 1:])
    mesh = parallel.make_mesh(2, 2, 2)
    with jax.set_mesh(mesh):
        # the shardings init_params(cfg, key, mesh) gives, without compiling a sharded init
        layout = jax.tree.map(lambda x: x.sharding, tpa_jax.model.abstract_params(cfg, mesh))
        sharded = jax.device_put(params, layout)
        assert any(len(x.sharding.device_set) == 8 and not x.sharding.is_fully_replicated
                   for x in jax.tree_util.tree_leaves(sharded))
        got = grad(sharded, tokens[:, :-1], tokens[:, 1:])
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(ref)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
