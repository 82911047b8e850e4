"""tpa_jax.parallel: meshes, the logical-axis rules with their divisibility fallback, and sharded
initialisation / forward passes on 8 fake CPU devices (conftest.py)."""
import functools
import logging
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

import tpa_jax
from tpa_jax import configs, parallel

from _util import cfg_of

# The rule table, restated independently: logical axis -> the one mesh axis it may use on params.
PARAM_AXIS = {"embed": "fsdp", "heads": "tensor", "kv_heads": "tensor", "mlp": "tensor", "vocab": "tensor"}
MESHES = {"2x2x2": (2, 2, 2), "1x1x8": (1, 1, 8)}


@functools.lru_cache(maxsize=None)
def mesh_of(shape):
    return parallel.make_mesh(*shape)


@functools.lru_cache(maxsize=None)
def abstract_params(name):
    cfg = configs.get(name)
    return jax.eval_shape(tpa_jax.Transformer(cfg).init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))


def spec_axes(entry):
    """Mesh axes of one PartitionSpec entry as a tuple."""
    if entry is None:
        return ()
    return (entry,) if isinstance(entry, str) else tuple(entry)


def padded(spec, ndim):
    return tuple(spec) + (None,) * (ndim - len(spec))


# ------------------------------------------------------------------------------------------ make_mesh
@pytest.mark.parametrize("args, shape", [((8, 1, 1), (8, 1, 1, 1)), ((2, 2, 2), (2, 2, 1, 2)), ((1, -1, 2), (1, 4, 1, 2)),
                                         ((-1, 1, 1), (8, 1, 1, 1)), ((2, 2, -1), (2, 2, 1, 2)),
                                         ((1, 2, 1, 4), (1, 2, 4, 1)), ((2, 1, 2, -1), (2, 1, 2, 2)),
                                         ((1, 1, 1, -1), (1, 1, 8, 1))])
def test_make_mesh_shapes(args, shape):
    """(data, fsdp, tensor[, context]) -> the mesh's (data, fsdp, context, tensor) sizes; -1 fills."""
    mesh = parallel.make_mesh(*args)
    assert mesh.axis_names == parallel.MESH_AXES == ("data", "fsdp", "context", "tensor")
    assert tuple(mesh.shape[a] for a in mesh.axis_names) == shape
    assert mesh.devices.size == 8
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


@pytest.mark.parametrize("args", [(3, -1, 1), (2, 2, 1), (4, 4, 1), (-1, -1, 2), (0, 8, 1), (1, 16, 1), (1, 2.0, 4),
                                  (1, -1, 1, 3), (1, 1, 1, 0), (1, -1, 1, -1)])
def test_make_mesh_rejects_bad_shapes(args):
    with pytest.raises(ValueError, match="make_mesh") as exc:
        parallel.make_mesh(*args)
    assert "\n" not in str(exc.value)


def test_make_mesh_on_a_subset_of_devices():
    mesh = parallel.make_mesh(data=2, fsdp=-1, devices=jax.devices()[:4])
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "context": 1, "tensor": 1}


# ------------------------------------------------------------------------------------------ the rules
def test_rule_table_has_every_logical_axis_once():
    names = [n for n, _ in parallel.LOGICAL_AXIS_RULES]
    assert len(names) == len(set(names))
    assert set(names) == {"batch", "length", "embed", "heads", "kv_heads", "head_dim", "value_dim", "factor_dim",
                          "rank", "latent", "rope_dim", "mlp", "vocab", "layers", "cache_length"}
    # the table is in flax's format too
    with nn.logical_axis_rules(parallel.LOGICAL_AXIS_RULES):
        assert nn.logical_to_mesh_axes(("batch", "length", "heads")) == PartitionSpec(("data", "fsdp"), "context", "tensor")


def test_every_annotation_names_a_rule():
    """Every logical axis a parameter (any mechanism, any variant) or a decode cache carries has a
    rule, so nothing falls back to the "no rule" replication silently."""
    names = {n for n, _ in parallel.LOGICAL_AXIS_RULES}
    is_axes = lambda x: isinstance(x, tuple)
    for variant in ("tpa", "tpa_nonctx_a", "tpa_nonctx_b", "tpa_order3", "tpa_kvonly_outnorm_weighted", "gqa", "mla"):
        cfg = cfg_of(variant)
        boxed = jax.eval_shape(tpa_jax.Transformer(cfg).init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
        axes = jax.tree.leaves(parallel.logical_axes_of(boxed), is_leaf=is_axes)
        assert len(axes) == len(jax.tree.leaves(parallel.unbox(boxed))) > 0  # every parameter is annotated
        cache_axes = jax.tree.leaves(tpa_jax.inference.cache_logical_axes(cfg), is_leaf=is_axes)
        used = {a for t in axes + cache_axes for a in t}
        assert used <= names, (variant, used - names)


def test_spec_divisible_dims_are_sharded():
    mesh = mesh_of((2, 2, 2))
    spec = parallel.logical_to_spec(("layers", "embed", "rank", "heads"), (12, 768, 6, 34), mesh)
    assert padded(spec, 4) == (None, "fsdp", None, "tensor")
    assert parallel.logical_to_spec(("batch", "length"), (8, 16), mesh) == PartitionSpec(("data", "fsdp"))


@pytest.mark.parametrize("tensor", [4, 8])
def test_spec_indivisible_heads_fall_back_to_replicated(tensor):
    mesh = mesh_of((1, 8 // tensor, tensor))
    for heads in (34, 47, 61, 78):
        spec = parallel.logical_to_spec(("layers", "embed", "rank", "heads"), (12, 768, 6, heads), mesh)
        expect_embed = "fsdp" if 8 // tensor > 1 else None
        assert padded(spec, 4) == (None, expect_embed, None, None), (heads, spec)
    spec = parallel.logical_to_spec(("heads", "head_dim", "embed"), (48, 64, 768), mesh)
    assert padded(spec, 3)[0] == "tensor"  # 48 divides 4 and 8


def test_spec_partial_fallback_and_no_mesh_axis_twice():
    mesh = mesh_of((2, 4, 1))
    # batch -> (data, fsdp) = 8: a batch of 4 keeps the largest dividing subset (fsdp = 4), 2 -> data
    assert padded(parallel.logical_to_spec(("batch", "length"), (4, 3), mesh), 2) == ("fsdp", None)
    assert padded(parallel.logical_to_spec(("batch", "length"), (2, 3), mesh), 2) == ("data", None)
    assert padded(parallel.logical_to_spec(("batch", "length"), (3, 3), mesh), 2) == (None, None)
    # activations [B, T, M]: batch takes fsdp first, embed may not reuse it
    spec = parallel.logical_to_spec(("batch", "length", "embed"), (8, 4, 64), mesh)
    assert padded(spec, 3) == (("data", "fsdp"), None, None)
    # ... but when batch cannot use fsdp, embed can
    spec = parallel.logical_to_spec(("batch", "length", "embed"), (2, 4, 64), mesh)
    assert padded(spec, 3) == ("data", None, "fsdp")


def test_spec_rejects_rank_mismatch():
    with pytest.raises(ValueError, match="rank"):
        parallel.logical_to_spec(("embed",), (4, 4), mesh_of((2, 2, 2)))


def test_batch_sharding():
    mesh = mesh_of((2, 2, 2))
    assert parallel.batch_sharding(mesh).spec == PartitionSpec(("data", "fsdp"))
    assert padded(parallel.batch_sharding(mesh, batch_size=6).spec, 2) == ("data", None)
    assert parallel.batch_sharding(mesh_of((1, 1, 8))).spec == PartitionSpec()


def test_fallback_is_logged_once(caplog, monkeypatch):
    monkeypatch.setattr(parallel, "_LOGGED", set())
    mesh = mesh_of((1, 2, 4))
    with caplog.at_level(logging.WARNING, logger="tpa_jax.parallel"):
        for _ in range(3):
            parallel.logical_to_sharding(("embed", "heads"), (768, 34), mesh)
        parallel.logical_to_sharding(("embed", "heads"), (768, 47), mesh)  # a different size: a new message
        parallel.logical_to_sharding(("embed", "heads"), (768, 36), mesh)  # divisible: no message
    msgs = [r.getMessage() for r in caplog.records if r.name == "tpa_jax.parallel"]
    assert len(msgs) == 2, msgs
    assert "'heads'" in msgs[0] and "34" in msgs[0] and "tensor" in msgs[0] and "replicat" in msgs[0]
    assert "47" in msgs[1]


# ------------------------------------------------------------------------------------------ every config
@pytest.mark.parametrize("mesh_name", list(MESHES))
@pytest.mark.parametrize("name", configs.names())
def test_param_shardings_every_config(name, mesh_name):
    cfg = configs.get(name)
    mesh_shape = MESHES[mesh_name]
    mesh = mesh_of(mesh_shape)
    sizes = dict(mesh.shape)
    abstract = abstract_params(name)
    shardings = parallel.param_shardings(abstract, mesh)
    axes = parallel.logical_axes_of(abstract)
    shapes = jax.tree.map(lambda x: x.shape, parallel.unbox(abstract))

    flat_sh = jax.tree.leaves(shardings)
    flat_axes = jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, tuple))
    flat_shapes = jax.tree.leaves(shapes, is_leaf=lambda x: isinstance(x, tuple))
    assert len(flat_sh) == len(flat_axes) == len(flat_shapes) > 0
    n_embed_sharded = 0
    for sh, names, shape in zip(flat_sh, flat_axes, flat_shapes):
        assert isinstance(sh, NamedSharding) and sh.mesh == mesh
        spec = padded(sh.spec, len(shape))
        used = [a for e in spec for a in spec_axes(e)]
        assert len(used) == len(set(used)), (names, spec)  # no mesh axis twice
        for logical, size, entry in zip(names, shape, spec):
            prod = math.prod(sizes[a] for a in spec_axes(entry))
            assert size % prod == 0, (name, names, shape, spec)  # it would compile
            # independent restatement of the rule + fallback
            want = PARAM_AXIS.get(logical)
            expected = want if (want and sizes[want] > 1 and size % sizes[want] == 0) else None
            assert entry == expected, (name, names, shape, spec)
        n_embed_sharded += "embed" in names and spec[names.index("embed")] == "fsdp"
    if mesh_shape == (2, 2, 2):
        # d_model (64 .. 1600) divides fsdp=2: every parameter with an embed dim is sharded on it
        assert n_embed_sharded == sum("embed" in a for a in flat_axes) > 0
    # the shardings match the abstract shapes (jit would accept them as out_shardings)
    jax.tree.map(lambda s, x: s.shard_shape(x.shape), shardings, parallel.unbox(abstract))


def test_paper_heads_fall_back_but_embed_stays_sharded():
    abstract = abstract_params("t6-small")
    for mesh_shape, heads_entry in (((2, 2, 2), "tensor"), ((1, 2, 4), None), ((1, 1, 8), None)):
        sh = parallel.param_shardings(abstract, mesh_of(mesh_shape))["params"]["blocks"]["attn"]
        assert padded(sh["w_aq"].spec, 4) == (None, "fsdp" if mesh_shape[1] > 1 else None, None, heads_entry)
        assert padded(sh["w_o"].spec, 4)[1] == heads_entry
    sh = parallel.param_shardings(abstract, mesh_of((1, 8, 1)))["params"]
    assert padded(sh["blocks"]["mlp"]["w1"].spec, 3) == (None, "fsdp", None)  # 768 / 8
    assert padded(sh["embed"]["embedding"].spec, 2) == (None, "fsdp")


# ------------------------------------------------------------------------------------------ sharded runs
def test_shard_params_initialises_sharded():
    cfg = configs.get("mha-tiny", compute_dtype="float32")  # fewest parameters: init compiles fastest
    mesh = mesh_of((2, 2, 2))
    model = tpa_jax.Transformer(cfg)
    tokens = jnp.zeros((2, 8), jnp.int32)
    key = jax.random.key(0)
    params = parallel.shard_params(model, cfg, mesh, key, tokens)
    expected = parallel.param_shardings(jax.eval_shape(model.init, key, tokens), mesh)["params"]
    for p, s in zip(jax.tree.leaves(params), jax.tree.leaves(expected)):
        assert isinstance(p, jax.Array) and p.sharding.is_equivalent_to(s, p.ndim), (p.sharding, s)
    w_q = params["blocks"]["attn"]["w_q"]  # [layers, embed 64, heads 4, head_dim]: 4 distinct shards
    assert w_q.addressable_shards[0].data.shape == (2, 32, 2, 16)
    # the same values as a single-device init with the same key
    plain = jax.jit(lambda k: parallel.unbox(model.init(k, tokens)["params"]))(key)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), params, plain)


def _random_params(model, tokens, seed, scale=0.1):
    """Host params of the model's shapes, N(0, scale^2) (init's zero W_O / W3 would hide attention)."""
    abstract = parallel.unbox(jax.eval_shape(model.init, jax.random.key(0), tokens)["params"])
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: (scale * rng.standard_normal(x.shape)).astype(x.dtype), abstract)


def _check_sharded_forward(cfg, mesh, batch=4, seq=16):
    model = tpa_jax.Transformer(cfg)
    tokens = jax.random.randint(jax.random.key(3), (batch, seq), 0, cfg.vocab_size, jnp.int32)
    host = _random_params(model, tokens, seed=1)
    ref = jax.jit(model.apply)({"params": jax.device_put(host, jax.devices()[0])}, tokens)

    shardings = parallel.param_shardings(jax.eval_shape(model.init, jax.random.key(0), tokens), mesh)["params"]
    with jax.set_mesh(mesh):
        params = jax.device_put(host, shardings)
        sharded_tokens = jax.device_put(tokens, parallel.batch_sharding(mesh, batch))
        out = jax.jit(model.apply)({"params": params}, sharded_tokens)
    assert sharded_tokens.sharding.spec == PartitionSpec(("data", "fsdp"))
    assert len(out.sharding.device_set) == 8
    assert float(jnp.std(ref)) > 1e-2  # attention and MLP are live
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5, rtol=1e-5)
    return params


@pytest.mark.parametrize("mechanism", list(configs.MECHANISMS))
def test_sharded_forward_matches_single_device(mechanism):
    cfg = configs.get(f"{mechanism}-tiny", compute_dtype="float32")
    params = _check_sharded_forward(cfg, mesh_of((2, 2, 2)))
    # the model really ran sharded: embed split over fsdp, the vocabulary over tensor
    assert params["embed"]["embedding"].sharding.spec == PartitionSpec("tensor", "fsdp")


def test_sharded_forward_matches_single_device_third_order_tpa():
    """Third-order TPA (its b and c factors pinned under the mesh) also equals one device."""
    cfg = configs.get("t6-tiny", compute_dtype="float32", tpa_order=3, tpa_c_dim=2)
    _check_sharded_forward(cfg, mesh_of((2, 2, 2)))


@pytest.mark.parametrize("name", ["t6-tiny", "mha-tiny"])
def test_sharded_forward_with_indivisible_heads(name, caplog, monkeypatch):
    monkeypatch.setattr(parallel, "_LOGGED", set())
    cfg = configs.get(name, compute_dtype="float32", n_head=5)
    with caplog.at_level(logging.WARNING, logger="tpa_jax.parallel"):
        params = _check_sharded_forward(cfg, mesh_of((2, 2, 2)))
    assert any("'heads' of size 5" in r.getMessage() for r in caplog.records)
    assert params["blocks"]["attn"]["w_o"].sharding.spec == PartitionSpec(None, None, None, "fsdp")


def test_constrain_pins_activation_layouts_only_under_a_mesh():
    x = jnp.ones((8, 4, 6, 16))
    axes = ("batch", "length", "heads", "head_dim")
    assert parallel.constrain(x, axes) is x  # no ambient mesh: untouched
    mesh = mesh_of((2, 2, 2))
    with jax.set_mesh(mesh):
        text = jax.jit(lambda a: parallel.constrain(a * 2, axes)).lower(x).as_text()
        # embed stays whole for activations even though parameters shard it over fsdp
        assert parallel.logical_to_spec(("batch", "length", "embed"), (8, 4, 64), mesh,
                                        parallel.ACTIVATION_RULES) == PartitionSpec(("data", "fsdp"))
        out = jax.jit(lambda a: parallel.constrain(a * 2, axes))(x)
    assert "sharding_constraint" in text and '"tensor"' in text
    assert out.sharding.spec == PartitionSpec(("data", "fsdp"), None, "tensor")
    np.testing.assert_array_equal(np.asarray(out), 2 * np.asarray(x))
