"""A donated decode step updates its cache in place: the layer loop only reads the stacked cache,
the new tokens are written after it (``core.write_stack``), and with ``decode_compiler_options``
XLA neither copies the stack nor rewrites it."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tpa_jax import ModelConfig
from tpa_jax.inference import decode_compiler_options, init_cache
from tpa_jax.model import init_params, logits_fn
from tpa_jax.model.attention.core import LayerCache, read_cache, write_cache, write_stack

S, L = 512, 4


def _cfg(attention, **kw):
    extra = {"tpa": dict(q_rank=4, k_rank=2, v_rank=2),
             "mla": dict(q_lora_rank=16, kv_lora_rank=8, rope_head_dim=8)}.get(attention, {})
    return ModelConfig(vocab_size=64, n_layer=L, d_model=64, n_head=4, head_dim=16, attention=attention,
                       compute_dtype="float32", param_dtype="float32", max_seq_len=S, mlp_hidden=16, **extra, **kw)


def _compiled_step(cfg, batch=2):
    params = init_params(cfg, jax.random.PRNGKey(0))
    cache = init_cache(cfg, batch, S)
    logits = logits_fn(cfg)

    def step(params, layers, lengths, tokens):
        out, new = logits(params, tokens, cache={"lengths": lengths, "layers": layers})
        return out, new["layers"]

    lengths = jnp.full((batch,), S // 2, jnp.int32)
    tokens = jnp.zeros((batch, 1), jnp.int32)
    jitted = jax.jit(step, donate_argnums=(1,), compiler_options=decode_compiler_options(cfg))
    return jitted.lower(params, cache["layers"], lengths, tokens).compile(), cache


@pytest.mark.parametrize("attention", ["mha", "gqa", "mla", "tpa", "tpa_kvonly"])
def test_donated_decode_step_copies_no_cache_stack(attention):
    kw = dict(n_kv_head=2) if attention == "gqa" else {}
    compiled, cache = _compiled_step(_cfg(attention, **kw))
    stacks = {tuple(leaf.shape) for leaf in jax.tree_util.tree_leaves(cache["layers"])}
    hlo = compiled.as_text()
    copied = {tuple(int(n) for n in m.group(1).split(","))
              for m in re.finditer(r"= f32\[([\d,]+)\]\{[\d,]*\} copy\(", hlo)}
    assert not stacks & copied, f"the decode step copies a whole cache stack: {stacks & copied}"
    cache_bytes = sum(leaf.nbytes for leaf in jax.tree_util.tree_leaves(cache["layers"]))
    # every stack is donated and aliased to its output; scratch stays far below one copy of the cache
    assert compiled.memory_analysis().alias_size_in_bytes >= cache_bytes
    assert compiled.memory_analysis().temp_size_in_bytes < cache_bytes / 2


def test_layer_cache_writes_only_its_rows():
    """write_cache on a LayerCache sets rows start_B[b] .. + T of its layer and nothing else
    (checked against numpy), and read_cache returns that layer."""
    rng = np.random.default_rng(0)
    stack = rng.standard_normal((L, 2, 10, 3)).astype(np.float32)
    items = rng.standard_normal((2, 2, 3)).astype(np.float32)
    start = np.array([4, 8], np.int32)
    got = write_cache(LayerCache({"x": jnp.asarray(stack)}, jnp.int32(1)), {"x": jnp.asarray(items)},
                      jnp.asarray(start))
    want = stack.copy()
    for b in range(2):
        want[1, b, start[b]:start[b] + 2] = items[b]
    np.testing.assert_array_equal(np.asarray(got.layers["x"]), want)
    np.testing.assert_array_equal(np.asarray(read_cache(got)["x"]), want[1])


@pytest.mark.parametrize("dtype", [np.float32, jnp.bfloat16])
def test_write_stack_sets_one_row_per_sequence_in_every_layer(dtype):
    """write_stack puts new[l, b, 0] at row start_B[b] of layer l (bfloat16 through its bits), nothing else."""
    rng = np.random.default_rng(1)
    stack = rng.standard_normal((L, 3, 10, 2)).astype(np.float32)
    new = rng.standard_normal((L, 3, 1, 2)).astype(np.float32)
    start = np.array([0, 9, 4], np.int32)
    got = write_stack({"x": jnp.asarray(stack, dtype)}, {"x": jnp.asarray(new, dtype)}, jnp.asarray(start))["x"]
    assert got.dtype == jnp.dtype(dtype)
    want = np.array(jnp.asarray(stack, dtype).astype(jnp.float32))
    for b in range(3):
        want[:, b, start[b]] = np.asarray(jnp.asarray(new[:, b, 0], dtype).astype(jnp.float32))
    np.testing.assert_array_equal(np.asarray(got.astype(jnp.float32)), want)


def test_deferred_layer_cache_reads_old_rows_and_records_the_token():
    """A deferred LayerCache: read_cache before write_cache gives the layer's rows as stored; after it,
    the rows with the pending token put in; the stack itself is not written."""
    rng = np.random.default_rng(2)
    stack = rng.standard_normal((L, 2, 6, 3)).astype(np.float32)
    item = rng.standard_normal((2, 1, 3)).astype(np.float32)
    start = np.array([2, 5], np.int32)
    cache = LayerCache({"x": jnp.asarray(stack)}, jnp.int32(3), deferred=True)
    np.testing.assert_array_equal(np.asarray(read_cache(cache)["x"]), stack[3])
    written = write_cache(cache, {"x": jnp.asarray(item)}, jnp.asarray(start))
    np.testing.assert_array_equal(np.asarray(written.layers["x"]), stack)
    np.testing.assert_array_equal(np.asarray(written.pending["x"]), item)
    want = stack[3].copy()
    want[0, 2], want[1, 5] = item[0, 0], item[1, 0]
    np.testing.assert_array_equal(np.asarray(read_cache(written)["x"]), want)


@pytest.mark.parametrize("attention", ["tpa", "gqa"])
def test_decode_under_remat_equals_plain(attention):
    """A config trained with rematerialisation decodes too (the read-only layer loop survives remat),
    and gives the plain config's logits: prefill, then two decode steps."""
    kw = dict(n_kv_head=2) if attention == "gqa" else {}
    plain, rematted = _cfg(attention, **kw), _cfg(attention, remat_policy="full", **kw)
    params = init_params(plain, jax.random.PRNGKey(3))
    tokens = jax.random.randint(jax.random.PRNGKey(4), (2, 5), 0, plain.vocab_size)
    outs = []
    for cfg in (plain, rematted):
        cache, logits, steps = init_cache(cfg, 2, S), jax.jit(logits_fn(cfg)), []
        out, cache = logits(params, tokens[:, :3], cache=cache)
        for i in (3, 4):
            out, cache = logits(params, tokens[:, i:i + 1], cache=cache)
            steps.append(out)
        outs.append(np.asarray(jnp.concatenate(steps, axis=1)))
    np.testing.assert_allclose(outs[1], outs[0], rtol=1e-5, atol=1e-5)


def test_compiler_options_pick_eigen_for_factor_caches():
    """On a CPU the factor and latent caches (TPA, TPA-KVonly, MLA) decode with Eigen's dots, K/V
    caches with the default libraries; every CPU step gets region-analysis copy insertion."""
    for attention in ("tpa", "tpa_kvonly", "mla", "mha", "gqa"):
        options = decode_compiler_options(_cfg(attention, **({"n_kv_head": 2} if attention == "gqa" else {})))
        assert options["xla_cpu_copy_insertion_use_region_analysis"] is True
        eigen = attention in ("tpa", "tpa_kvonly", "mla")
        assert ("xla_cpu_use_xnnpack" in options) == eigen and options.get("xla_cpu_use_xnnpack", False) is False
    assert decode_compiler_options() == {"xla_cpu_copy_insertion_use_region_analysis": True}
