"""A donated decode step updates its cache in place: the stacked cache travels through the layer
loop without a copy of the whole stack, and each layer writes only its new rows."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tpa_jax import ModelConfig
from tpa_jax.inference import init_cache
from tpa_jax.model import init_params, logits_fn
from tpa_jax.model.attention.core import LayerCache, read_cache, write_cache

S, L = 128, 4


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
    return jax.jit(step, donate_argnums=(1,)).lower(params, cache["layers"], lengths, tokens).compile(), cache


@pytest.mark.parametrize("attention", ["mha", "gqa", "mla", "tpa"])
def test_donated_decode_step_copies_no_cache_stack(attention):
    kw = dict(n_kv_head=2) if attention == "gqa" else {}
    compiled, cache = _compiled_step(_cfg(attention, **kw))
    stacks = {tuple(leaf.shape) for leaf in jax.tree_util.tree_leaves(cache["layers"])}
    hlo = compiled.as_text()
    copied = {tuple(int(n) for n in m.group(1).split(","))
              for m in re.finditer(r"= f32\[([\d,]+)\]\{[\d,]*\} copy\(", hlo)}
    assert not stacks & copied, f"the decode step copies a whole cache stack: {stacks & copied}"
    cache_bytes = sum(leaf.nbytes for leaf in jax.tree_util.tree_leaves(cache["layers"]))
    # every stack is donated and aliased to its output; scratch stays below one copy of the cache
    assert compiled.memory_analysis().alias_size_in_bytes >= cache_bytes
    assert compiled.memory_analysis().temp_size_in_bytes < cache_bytes


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
