"""The int8 decode cache (``init_cache(..., dtype="int8")``, ``generate(..., cache_dtype="int8")``):
its layout and measured bytes against ``accounting.kv_cache_bytes_per_token``, decode logits close to
the float32 cache's for every mechanism, a one-token decode equal to a prefill of the same tokens
(every token is attended as the cache holds it), FlashTPA's int8 decode against an explicit float64
softmax, no float copy of the whole cache inside it, generation, shardings, the Pallas kernel's int8
blocks and the errors."""
import contextlib
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tpa_jax
from tpa_jax import accounting, parallel
from tpa_jax.inference import cache_bytes_per_token, cache_logical_axes, cache_shardings, init_cache
from tpa_jax.model.attention import flashtpa, quant
from tpa_jax.model.attention.kernels import flashtpa_decode_pallas

from _util import VARIANTS, cfg_of, init_params, largest_intermediate, tokens

ACCOUNTED = ["tpa", "tpa_kvonly", "tpa_shared_b", "tpa_nonctx_a", "tpa_nonctx_b", "tpa_order3", "mha", "mqa", "gqa",
             "mla", "tpa_shared_b_nonctx_b"]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int8"])
@pytest.mark.parametrize("name", ACCOUNTED)
def test_measured_bytes_equal_the_accounting(name, dtype):
    cfg = cfg_of(name)
    cache = init_cache(cfg, 2, 8, dtype=dtype)
    assert cache_bytes_per_token(cache) == accounting.kv_cache_bytes_per_token(cfg, dtype)
    assert accounting.kv_cache_bytes_per_token(cfg, dtype) == (
        accounting.kv_cache_per_token(cfg) * cfg.n_layer * jnp.dtype(dtype).itemsize
        + (4 * cfg.n_layer * sum(int(np.prod(x.shape[3:])) for n, x in cache["layers"].items() if n.endswith("_scale"))
           if dtype == "int8" else 0))


def test_int8_layout_scales_per_row():
    """Scales: per token and factor row for TPA's A and B, per token and head for K/V, per token for MLA."""
    layers = init_cache(cfg_of("tpa"), 2, 8, dtype="int8")["layers"]
    cfg = cfg_of("tpa")
    assert layers["a_k"].dtype == jnp.int8 and layers["a_k"].shape == (2, 2, 8, cfg.k_rank, cfg.n_head)
    assert layers["a_k_scale"].shape == layers["b_k_scale"].shape == (2, 2, 8, cfg.k_rank)
    assert layers["a_v_scale"].dtype == jnp.float32 and layers["b_v_scale"].shape == (2, 2, 8, cfg.v_rank)
    gqa = init_cache(cfg_of("gqa"), 2, 8, dtype="int8")["layers"]
    assert gqa["k_scale"].shape == gqa["v_scale"].shape == (2, 2, 8, 3)
    mla = init_cache(cfg_of("mla"), 2, 8, dtype="int8")["layers"]
    assert mla["c_kv_scale"].shape == mla["k_r_scale"].shape == (2, 2, 8)
    axes = cache_logical_axes(cfg, "int8")["layers"]
    assert axes["a_k_scale"] == ("layers", "batch", "cache_length", "rank") and set(axes) == set(layers)


DECODED = ["tpa", "tpa_kvonly", "tpa_order3", "tpa_shared_b", "tpa_nonctx_b", "mha", "gqa", "mla"]
PROMPT, STEPS = 8, 3


@functools.lru_cache(maxsize=None)
def decode_logits(name, dtype, at_once=False, **kw):
    """Logits [B, PROMPT + STEPS, V] of a prefill then one-token steps, and (with ``at_once``; None
    otherwise, sparing a compile) of one prefill of all tokens."""
    cfg = cfg_of(name, **dict(kw))
    _, params = init_params(cfg)
    forward = jax.jit(tpa_jax.logits_fn(cfg))
    tok = tokens(cfg, 2, PROMPT + STEPS, seed=3)
    logits, cache = forward(params, tok[:, :PROMPT], cache=init_cache(cfg, 2, 16, dtype=dtype))
    out = [logits]
    for i in range(PROMPT, PROMPT + STEPS):
        logits, cache = forward(params, tok[:, i:i + 1], cache=cache)
        out.append(logits)
    if not at_once:
        return np.concatenate([np.asarray(x) for x in out], axis=1), None
    at_once, _ = forward(params, tok, cache=init_cache(cfg, 2, 16, dtype=dtype))
    return np.concatenate([np.asarray(x) for x in out], axis=1), np.asarray(at_once)


@pytest.mark.parametrize("name", DECODED)
def test_int8_decode_is_close_to_the_float32_cache(name):
    """max |logits_int8 - logits_f32| <= 4% of max |logits| (measured 0.6-2.0%, random tiny models);
    and the int8 decode steps equal one int8 prefill of the same tokens (1e-5): a decode step
    attends to its own token as the cache holds it."""
    want, _ = decode_logits(name, "float32")
    got, at_once = decode_logits(name, "int8", at_once=True)
    assert np.abs(got - want).max() <= 0.04 * np.abs(want).max()
    assert np.abs(got - want).max() > 0  # the cache really is quantised
    np.testing.assert_allclose(got, at_once, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["tpa", "mla"])
def test_int8_materializing_decode_equals_the_default(name):
    """decode_impl="materialize" (K and V rebuilt from the dequantised cache) gives the logits of
    FlashTPA's block-wise dequantisation (TPA) and of MLA's absorbed decode (1e-5)."""
    got, _ = decode_logits(name, "int8", decode_impl="materialize")
    np.testing.assert_allclose(got, decode_logits(name, "int8")[0], rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- FlashTPA
def int8_factors(b, s, r, u, h, d, e, seed=0):
    """Random int8 factors (a_k, b_k, a_v, b_v) and float32 row scales [B, S, rank]."""
    rng = np.random.default_rng(seed)
    shapes = [(b, s, r, h), (b, s, r, d), (b, s, u, h), (b, s, u, e)]
    kv = tuple(jnp.asarray(rng.integers(-127, 128, sh), jnp.int8) for sh in shapes)
    scales = tuple(jnp.asarray(rng.uniform(0.001, 0.03, sh[:3]), jnp.float32) for sh in shapes)
    return kv, scales


def reference(q_BHD, kv, scales, lengths, scale, ranks):
    """float64 softmax over the dequantised factors: K = A_K^T B_K / R_K, V = A_V^T B_V / R_V."""
    a_k, b_k, a_v, b_v = (np.asarray(x, np.float64) * np.asarray(s, np.float64)[..., None] for x, s in zip(kv, scales))
    k = np.einsum("bsrh,bsrd->bshd", a_k, b_k) / ranks[0]
    v = np.einsum("bsuh,bsue->bshe", a_v, b_v) / ranks[1]
    logits = np.einsum("bhd,bshd->bhs", q_BHD, k) * scale
    logits = np.where(np.arange(k.shape[1])[None, None, :] < np.asarray(lengths)[:, None, None], logits, -np.inf)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    return np.einsum("bhs,bshe->bhe", p / p.sum(-1, keepdims=True), v)


@pytest.mark.parametrize("s_len", [24, 20])
@pytest.mark.parametrize("one_pass", [True, False])
@pytest.mark.parametrize("plain_q", [False, True])
def test_flashtpa_int8_decode_equals_float64_softmax(s_len, one_pass, plain_q):
    b, p, r, u, h, d, e, scale = 2, 3, 2, 3, 4, 8, 6, 0.35
    kv, scales = int8_factors(b, s_len, r, u, h, d, e)
    lengths = jnp.asarray([s_len - 3, 5], jnp.int32)  # rows past a length hold random (finite) int8
    rng = np.random.default_rng(1)
    kw = dict(k_rank=r, v_rank=u, scale=scale, block_size=8, one_pass=one_pass, scales=scales)
    # jitted: one compiled program rather than many eagerly dispatched ops
    if plain_q:
        q = rng.standard_normal((b, h, d))
        got = jax.jit(lambda *a: flashtpa.flashtpa_decode_plain_q(*a, **kw))(jnp.asarray(q, jnp.float32), *kv,
                                                                             lengths)
    else:
        a_q, b_q = rng.standard_normal((b, p, h)), rng.standard_normal((b, p, d))
        q = np.einsum("bph,bpd->bhd", a_q, b_q) / p
        got = jax.jit(lambda *a: flashtpa.flashtpa_decode(*a, q_rank=p, **kw))(
            jnp.asarray(a_q, jnp.float32), jnp.asarray(b_q, jnp.float32), *kv, lengths)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), reference(q, kv, scales, lengths, scale, (r, u)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("one_pass", [True, False])
def test_flashtpa_int8_decode_never_dequantises_the_whole_cache(one_pass):
    """Every float array of the int8 decode is smaller than the smallest cache leaf (1024 numbers
    here): blocks / pieces are dequantised one at a time.  The float cache's one pass does build
    arrays of a whole leaf's size, so the check can see one."""
    b, s_len, r, h, d = 1, 64, 2, 8, 8
    kv, scales = int8_factors(b, s_len, r, r, h, d, d)
    smallest_leaf = min(int(np.prod(x.shape)) for x in kv)
    rng = np.random.default_rng(2)
    a_q, b_q = (jnp.asarray(rng.standard_normal(sh), jnp.float32) for sh in ((b, 2, h), (b, 2, d)))
    lengths = jnp.asarray([s_len], jnp.int32)
    kw = dict(q_rank=2, k_rank=r, v_rank=r, scale=0.3, block_size=16, one_pass=one_pass)
    int8_fn = lambda *kv: flashtpa.flashtpa_decode(a_q, b_q, *kv, lengths, scales=scales, **kw)
    assert largest_intermediate(int8_fn, *kv, floating_only=True) < smallest_leaf
    dequantised = tuple(quant.dequantize(x, sc) for x, sc in zip(kv, scales))
    float_fn = lambda *kv: flashtpa.flashtpa_decode(a_q, b_q, *kv, lengths, **{**kw, "one_pass": True})
    assert largest_intermediate(float_fn, *dequantised, floating_only=True) >= smallest_leaf


@pytest.mark.parametrize("attention", ["tpa", "tpa_kvonly"])
def test_donated_int8_decode_step_updates_in_place(attention):
    """A donated int8 decode step (FlashTPA, one pass over pieces on a CPU) copies no cache stack,
    aliases every stack (scales included) to its output and needs far less scratch than the cache."""
    cfg = tpa_jax.ModelConfig(vocab_size=64, n_layer=4, d_model=64, n_head=4, head_dim=16, attention=attention,
                              q_rank=4, k_rank=2, v_rank=2, compute_dtype="float32", max_seq_len=512, mlp_hidden=16)
    params = tpa_jax.init_params(cfg, jax.random.key(0))
    layers = init_cache(cfg, 2, 512, dtype="int8")["layers"]

    def step(params, layers, lengths, tok):
        out, new = tpa_jax.logits_fn(cfg)(params, tok, cache={"lengths": lengths, "layers": layers})
        return out, new["layers"]

    jitted = jax.jit(step, donate_argnums=(1,), compiler_options=tpa_jax.inference.decode_compiler_options())
    compiled = jitted.lower(params, layers, jnp.full((2,), 256, jnp.int32), jnp.zeros((2, 1), jnp.int32)).compile()
    hlo = compiled.as_text()
    stacks = {tuple(x.shape) for x in layers.values()}
    copied = {tuple(int(n) for n in m.group(1).split(","))
              for m in re.finditer(r"= (?:s8|f32)\[([\d,]+)\]\{[\d,]*\} copy\(", hlo)}
    assert not stacks & copied
    cache_bytes = sum(x.nbytes for x in layers.values())
    assert compiled.memory_analysis().alias_size_in_bytes >= cache_bytes
    assert compiled.memory_analysis().temp_size_in_bytes < cache_bytes / 2


# ----------------------------------------------------------------------------- generate, shardings, errors
@pytest.mark.parametrize("name", ["tpa", "gqa"])
def test_generate_with_an_int8_cache(name):
    """Greedy tokens through the int8 cache mostly match the float32 cache's (a tiny random model,
    whose top logits are often near ties: at least the first half of each row matches)."""
    cfg = cfg_of(name)
    _, params = init_params(cfg)
    prompts = [[5, 9, 2, 41, 7], [3, 3, 60]]
    want = tpa_jax.generate(params, cfg, prompts, 8, cache_dtype="float32")
    got = tpa_jax.generate(params, cfg, prompts, 8, cache_dtype="int8")
    assert got.tokens.shape == want.tokens.shape == (2, 8)
    np.testing.assert_array_equal(got.tokens[:, :4], want.tokens[:, :4])


def test_int8_cache_shardings_cover_the_scales():
    cfg = cfg_of("tpa")
    mesh = parallel.make_mesh(2, 1, 1, 4)
    cache = init_cache(cfg, 2, 16, dtype="int8", mesh=mesh)
    shardings = cache_shardings(cfg, cache, mesh)
    assert set(shardings["layers"]) == set(cache["layers"]) and "a_k_scale" in shardings["layers"]
    for name, leaf in cache["layers"].items():
        assert leaf.sharding.spec[:3] == shardings["layers"][name].spec[:3]
        assert leaf.sharding.spec[2] == "context"


def test_int8_decode_on_a_context_mesh_equals_one_device():
    """A cache split over the ``context`` axis (each shard dequantises its rows) gives the unsharded
    int8 cache's logits."""
    cfg = cfg_of("tpa")
    _, params = init_params(cfg)
    forward = jax.jit(tpa_jax.logits_fn(cfg))
    tok = tokens(cfg, 2, 6, seed=4)

    def run(mesh):
        with parallel.mesh_context(mesh) if mesh is not None else contextlib.nullcontext():
            logits, cache = forward(params, tok[:, :5], cache=init_cache(cfg, 2, 16, dtype="int8", mesh=mesh))
            step, _ = forward(params, tok[:, 5:], cache=cache)
        return np.concatenate([np.asarray(logits), np.asarray(step)], axis=1)

    np.testing.assert_allclose(run(parallel.make_mesh(1, 1, 1, 8)), run(None), rtol=1e-5, atol=1e-5)


def test_bad_cache_dtype_is_a_one_line_error():
    cfg = cfg_of("tpa")
    with pytest.raises(ValueError, match="cache dtype 'int4' is not supported") as e:
        init_cache(cfg, 1, 8, dtype="int4")
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="cache dtype 'uint8' is not supported"):
        tpa_jax.generate(init_params(cfg)[1], cfg, [[1, 2]], 2, cache_dtype="uint8")
    with pytest.raises(ValueError, match="cache dtype 'int16' is not supported"):
        accounting.kv_cache_bytes_per_token(cfg, "int16")


@pytest.mark.parametrize("block", [8, 64])
def test_pallas_int8_decode_equals_float64_softmax(block):
    """The Pallas kernel (interpreter) reads int8 blocks beside their scale blocks: equal to the
    explicit float64 softmax over the dequantised factors (1e-5)."""
    b, p, r, u, h, d, e, s_len, scale = 2, 3, 2, 3, 4, 8, 6, 24, 0.35
    kv, scales = int8_factors(b, s_len, r, u, h, d, e, seed=5)
    lengths = jnp.asarray([s_len - 3, 9], jnp.int32)
    rng = np.random.default_rng(6)
    a_q, b_q = rng.standard_normal((b, p, h)), rng.standard_normal((b, p, d))
    pallas = jax.jit(lambda *a: flashtpa_decode_pallas(*a, q_rank=p, k_rank=r, v_rank=u, scale=scale,
                                                       block_size=block, interpret=True, scales=scales))
    got = pallas(jnp.asarray(a_q, jnp.float32), jnp.asarray(b_q, jnp.float32), *kv, lengths)
    q = np.einsum("bph,bpd->bhd", a_q, b_q) / p
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), reference(q, kv, scales, lengths, scale, (r, u)), rtol=1e-5, atol=1e-5)


def test_pallas_int8_model_decode_equals_flash():
    """decode_impl="pallas" with an int8 cache gives the logits of the default int8 decode (1e-5)."""
    got, _ = decode_logits("tpa", "int8", decode_impl="pallas", decode_block_size=8)
    np.testing.assert_allclose(got, decode_logits("tpa", "int8")[0], rtol=1e-5, atol=1e-5)


def test_pallas_int8_kernel_exports_for_tpu():
    """The int8 kernel lowers to one Mosaic kernel for TPU from this host (block-shape checks included)."""
    b, s_len, r, u, h, d, e = 2, 40, 2, 1, 34, 64, 64
    shapes = [(b, s_len, r, h), (b, s_len, r, d), (b, s_len, u, h), (b, s_len, u, e)]
    structs = ([jax.ShapeDtypeStruct((b, 6, h), jnp.float32), jax.ShapeDtypeStruct((b, 6, d), jnp.float32)]
               + [jax.ShapeDtypeStruct(sh, jnp.int8) for sh in shapes] + [jax.ShapeDtypeStruct((b,), jnp.int32)])
    scale_structs = tuple(jax.ShapeDtypeStruct(sh[:3], jnp.float32) for sh in shapes)

    def fn(*args):
        return flashtpa_decode_pallas(*args[:7], q_rank=6, k_rank=r, v_rank=u, scale=0.125, block_size=16,
                                      interpret=False, scales=args[7:])

    exported = jax.export.export(jax.jit(fn), platforms=("tpu",))(*structs, *scale_structs)
    assert exported.mlir_module().count("tpu_custom_call") == 1
    assert exported.out_avals[0].shape == (b, h, e) and exported.out_avals[0].dtype == jnp.float32


assert set(ACCOUNTED) <= set(VARIANTS) and set(DECODED) <= set(VARIANTS)
