"""Context parallelism: the sequence split over the mesh's ``context`` axis, devices exchanging each
mechanism's per-token items (TPA's factors, K/V, MLA's c_KV/k_R).  The loss and every parameter
gradient equal one device's (float32, 1e-5) for every mechanism and variant, on the 8-device fake
meshes (context 8), (context 4 x fsdp 2) and (context 2 x tensor 2 x data 2), with ragged targets
and explicit RoPE positions; the blocked kernel's (o, lse) form equals a dense reference, its lse
gradient included."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tpa_jax
from tpa_jax import configs, parallel
from tpa_jax.model.attention import blocked, context
from tpa_jax.model.transformer import cross_entropy

BATCH, SEQ = 4, 32
HEADS = {"mqa": 4, "mla": 4, "t6-kvonly": 4, "mha": 4, "gqa": 4}  # tensor=2 divides these

# mesh (data, fsdp, tensor, context)
MESHES = {"c8": (1, 1, 1, 8), "c4f2": (1, 2, 1, 4), "c2t2d2": (2, 1, 2, 2)}

VARIANTS = {  # name -> (preset, overrides)
    "t6": ("t6", {}),
    "t6-kvonly": ("t6-kvonly", {}),
    "t6-nonctx-b": ("t6", {"contextual_b": False}),
    "mha": ("mha", {}),
    "mqa": ("mqa", {}),
    "gqa": ("gqa", {}),
    "mla": ("mla", {}),
}


def cfg_of(variant, **extra):
    preset, over = VARIANTS[variant]
    heads = {"n_head": HEADS[preset]} if preset in HEADS else {}
    fields = dict(compute_dtype="float32", attention_block_size=8, n_layer=1, **heads, **over)
    return configs.get(f"{preset}-tiny", **{**fields, **extra})


@functools.lru_cache(maxsize=None)
def setup(variant):
    """Perturbed parameters (so no factor is trivially zero), tokens, ragged targets (-1 past each
    row's length, as packed or padded batches give) and explicit positions starting at 3."""
    cfg = cfg_of(variant)
    params = tpa_jax.init_params(cfg, jax.random.key(1))
    noise = lambda p: p + 0.02 * jax.random.normal(jax.random.key(2), p.shape, p.dtype)
    params = jax.jit(lambda ps: jax.tree.map(noise, ps))(params)  # one program, not one per leaf shape
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, cfg.vocab_size, (BATCH, SEQ + 1))
    targets = tokens[:, 1:].copy()
    for b, n in enumerate((SEQ, SEQ - 5, 17, 9)):
        targets[b, n:] = -1
    positions = np.broadcast_to(np.arange(SEQ) + 3, (BATCH, SEQ))
    return params, jnp.asarray(tokens[:, :-1], jnp.int32), jnp.asarray(targets, jnp.int32), jnp.asarray(positions)


def loss_of(cfg):
    logits = tpa_jax.logits_fn(cfg)
    return lambda params, tokens, targets, positions: cross_entropy(logits(params, tokens, positions=positions), targets)


@functools.lru_cache(maxsize=None)
def reference(variant):
    params, tokens, targets, positions = setup(variant)
    return jax.device_get(jax.jit(jax.value_and_grad(loss_of(cfg_of(variant))))(params, tokens, targets, positions))


def run_sharded(variant, mesh_name, **cfg_extra):
    cfg = cfg_of(variant, **cfg_extra)
    params, tokens, targets, positions = setup(variant)
    mesh = parallel.make_mesh(*MESHES[mesh_name])
    abstract = jax.eval_shape(tpa_jax.model.model_of(cfg).init, jax.random.key(0), tokens)
    with jax.set_mesh(mesh):
        params = jax.device_put(params, parallel.param_shardings(abstract, mesh)["params"])
        batch = parallel.batch_sharding(mesh, BATCH, seq_len=SEQ)
        assert batch.spec[1] == "context"  # the token batch's length axis is split
        tokens, targets, positions = (jax.device_put(x, batch) for x in (tokens, targets, positions))
        compiled = jax.jit(jax.value_and_grad(loss_of(cfg))).lower(params, tokens, targets, positions).compile()
        out = compiled(params, tokens, targets, positions)
    return jax.device_get(out), compiled.as_text()


def check_same(got, want):
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-5)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got[1]), jax.tree_util.tree_leaves(want[1])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=jax.tree_util.keystr(path))


# Every mechanism (and TPA's non-contextual-B form) on (context 4 x fsdp 2) with the defaults (ring,
# striped); TPA's KV-only form, the other meshes, the all-gather form and the contiguous layout
# on a spread of them (each case compiles a fresh 8-device program, so the grid is not complete).
@pytest.mark.parametrize("variant", ["t6", "t6-nonctx-b", "mha", "gqa", "mla"])
def test_every_mechanism_equals_one_device(variant):
    got, text = run_sharded(variant, "c4f2")
    assert "collective-permute" in text  # the ring passed the items on
    check_same(got, reference(variant))


@pytest.mark.parametrize("variant, mesh_name, impl, layout", [
    ("t6", "c8", "ring", "striped"),
    ("t6", "c2t2d2", "ring", "striped"),
    ("mla", "c2t2d2", "ring", "contiguous"),
    ("mqa", "c8", "allgather", "striped"),
    ("t6-kvonly", "c2t2d2", "allgather", "contiguous"),
    pytest.param("t6", "c4f2", "ring", "contiguous", marks=pytest.mark.slow),
])
def test_meshes_impls_and_layouts_equal_one_device(variant, mesh_name, impl, layout):
    got, text = run_sharded(variant, mesh_name, context_impl=impl, context_layout=layout)
    assert ("all-gather" in text) if impl == "allgather" else ("collective-permute" in text)
    check_same(got, reference(variant))


def test_shards_use_global_positions():
    """Each shard's RoPE positions and causal mask are the global ones: the context-parallel logits
    equal one device's, and a model fed each shard's *local* positions (0 .. T/C - 1 per shard)
    gives logits far from them -- so the comparison would catch a shard using local positions."""
    cfg = cfg_of("t6")
    params, tokens, _, positions = setup("t6")
    logits = jax.jit(tpa_jax.logits_fn(cfg))
    want = np.asarray(logits(params, tokens, positions=positions))
    for layout in ("striped", "contiguous"):
        c_cfg = cfg_of("t6", context_layout=layout)
        with jax.set_mesh(parallel.make_mesh(1, 1, 1, 8)):
            got = np.asarray(jax.jit(tpa_jax.logits_fn(c_cfg))(params, tokens, positions=positions))
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    local = positions.reshape(BATCH, 8, SEQ // 8) - positions.reshape(BATCH, 8, SEQ // 8)[..., :1]
    wrong = np.asarray(logits(params, tokens, positions=local.reshape(BATCH, SEQ)))
    assert np.abs(wrong - want).max() > 1e-2


def test_indivisible_length_is_one_line_error():
    cfg = cfg_of("t6")
    params, tokens, _, _ = setup("t6")
    with jax.set_mesh(parallel.make_mesh(1, 2, 1, 4)):
        with pytest.raises(ValueError, match="sequence length 30 is not divisible by the mesh's context axis 4") as e:
            jax.jit(tpa_jax.logits_fn(cfg))(params, tokens[:, :30])
    assert "\n" not in str(e.value)


# ------------------------------------------------------------------- the kernel's (o, lse) form
def dense_lse(q, k, v, q_index, kv_len, scale):
    """softmax(scale q k^T) v and the log-sum-exp, keys i <= q_index and i < kv_len, [B, T, H, *]."""
    h, kv = q.shape[2], k.shape[2]
    k, v = jnp.repeat(k, h // kv, axis=2), jnp.repeat(v, h // kv, axis=2)
    s = scale * jnp.einsum("bthd,bshd->bhts", q, k)
    idx = jnp.arange(k.shape[1])
    ok = (idx[None, None, :] <= q_index[:, :, None]) & (idx[None, None, :] < kv_len[:, None, None])
    s = jnp.where(ok[:, None], s, -jnp.inf)
    lse = jax.nn.logsumexp(s, axis=-1)  # [B, H, T]
    p = jnp.where(ok[:, None], jnp.exp(s - jnp.where(jnp.isfinite(lse), lse, 0.0)[..., None]), 0.0)
    return jnp.einsum("bhts,bshe->bthe", p, v), jnp.swapaxes(lse, 1, 2)


def test_blocked_lse_equals_dense_with_gradients():
    """(o, lse) against a dense reference, q positions that skip blocks, a row with no visible key
    (lse = -inf, o = 0), T not a multiple of the block; gradients of a loss using both o and lse."""
    rng = np.random.default_rng(0)
    b, t, s, h, kv, d, e = 2, 12, 20, 4, 2, 8, 6
    q, k, v = (jnp.asarray(rng.normal(size=shape), jnp.float32)
               for shape in ((b, t, h, d), (b, s, kv, d), (b, s, kv, e)))
    q_index = jnp.asarray(np.stack([np.arange(t) * 2 - 1, np.arange(t) + 5]), jnp.int32)  # row 0 pos 0: none
    kv_len = jnp.asarray([20, 11], jnp.int32)
    w_o, w_l = (jnp.asarray(rng.normal(size=shape), jnp.float32) for shape in ((b, t, h, e), (b, t, h)))

    def loss(fn, q, k, v):
        o, lse = fn(q, k, v)
        return jnp.sum(o * w_o) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0) * w_l)

    ours = lambda q, k, v: blocked.blocked_attention_lse(q, k, v, q_index, kv_len, scale=0.3, block_size=8)
    ref = lambda q, k, v: dense_lse(q, k, v, q_index, kv_len, 0.3)
    (o, lse), (o_r, lse_r) = jax.jit(ours)(q, k, v), jax.jit(ref)(q, k, v)
    assert np.isneginf(np.asarray(lse)[0, 0]).all() and not np.asarray(o)[0, 0].any()
    np.testing.assert_allclose(np.asarray(o), np.asarray(o_r), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.isfinite(lse), np.isfinite(lse_r))
    np.testing.assert_allclose(np.where(np.isfinite(lse), lse, 0), np.where(np.isfinite(lse_r), lse_r, 0), rtol=1e-5)
    g = jax.jit(jax.grad(functools.partial(loss, ours), argnums=(0, 1, 2)))(q, k, v)
    g_r = jax.jit(jax.grad(functools.partial(loss, ref), argnums=(0, 1, 2)))(q, k, v)
    for a, r in zip(g, g_r):
        np.testing.assert_allclose(np.asarray(a), np.asarray(r), rtol=1e-4, atol=1e-5)


def test_stripe_round_trip_and_order():
    x = jnp.arange(2 * 12).reshape(2, 12)
    s = context.stripe(x, 4)
    assert s[0, :3].tolist() == [0, 4, 8] and s[0, 3:6].tolist() == [1, 5, 9]  # shard 0: 0, 4, 8
    np.testing.assert_array_equal(context.unstripe(s, 4), x)


@pytest.mark.parametrize("variant, impl", [("mla", "ring"), ("t6-nonctx-b", "ring"), ("t6", "allgather")])
def test_bfloat16_training_step_compiles(variant, impl):
    """MLA's up-projections and TPA's constant factors enter the ring's expansion as closed-over
    weights, and the all-gather's gradient is a reduce-scatter: these sums over the context axis run
    in float32 (``context.varying``, ``context._gather``), which XLA's CPU backend compiles (a
    bfloat16 sum there failed to compile)."""
    cfg = cfg_of(variant, compute_dtype="bfloat16", context_impl=impl)
    params = jax.eval_shape(lambda: tpa_jax.init_params(cfg, jax.random.key(0)))
    mesh = parallel.make_mesh(1, 1, 1, 2, devices=jax.devices()[:2])
    with jax.set_mesh(mesh):
        tokens = jax.ShapeDtypeStruct((1, SEQ), jnp.int32, sharding=parallel.batch_sharding(mesh, 1, seq_len=SEQ))
        text = jax.jit(jax.grad(tpa_jax.loss_fn(cfg))).lower(params, tokens, tokens).compile().as_text()
    assert ("all-gather" if impl == "allgather" else "collective-permute") in text
