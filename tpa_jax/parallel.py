"""Device meshes, the logical-axis rule table, and shardings for parameters, batches and any
pytree with logical axes (decode caches).

    mesh = tpa_jax.parallel.make_mesh(data=1, fsdp=-1, tensor=2)     # -1: all remaining devices
    mesh = tpa_jax.parallel.make_mesh(fsdp=2, context=4)             # the sequence split over 4 devices
    params = tpa_jax.parallel.shard_params(model, cfg, mesh, jax.random.key(0), tokens)
    step = jax.jit(train_step, in_shardings=(param_shardings(...), batch_sharding(mesh)), ...)

Every parameter carries logical axis names (``nn.with_logical_partitioning``); ``LOGICAL_AXIS_RULES``
maps them to mesh axes.  ``logical_to_sharding`` turns (names, shape) into a ``NamedSharding`` with a
*divisibility fallback*: the paper's head counts (34, 47, 61, 78) and some SwiGLU widths (2730) do
not divide typical tensor-parallel sizes, so such a dimension gets the largest subset of its mesh
axes whose size product divides it (usually: none, i.e. it is replicated) instead of failing at
compile time.  Each distinct fallback is logged once.  A mesh axis is never used twice in one spec
(the first dimension that asks for it gets it).

Why our own resolver rather than ``nn.logical_to_mesh_sharding``: flax's rules know names but not
sizes, so they cannot fall back on divisibility.  The table below is still in flax's format
(``((logical, mesh_axes), ...)``), so it can be passed to ``nn.logical_axis_rules`` for activation
constraints where sizes are known to divide.
"""
from __future__ import annotations

import contextlib
import itertools
import logging
import math
from typing import Any, Iterator, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from .config import MeshConfig, ModelConfig

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "context", "tensor")

# One table.  Choices:
#  * batch -> (data, fsdp): FSDP is data parallelism with sharded parameters, so the batch is
#    split over both; parameters are gathered over fsdp per layer, gradients reduce-scattered.
#  * embed -> fsdp: d_model is in every weight matrix (768/1024/1280/1600 all divide 2..64), so
#    sharding it is what gives ZeRO-3-style memory savings for every parameter.
#  * heads / kv_heads / mlp / vocab -> tensor: Megatron column/row split of the attention heads,
#    the SwiGLU hidden width and the vocabulary of the tied embedding/head.  Head counts that do
#    not divide (34 heads on tensor=4) fall back to replicated; embed keeps its fsdp shard.
#  * head_dim (D), value_dim (E), factor_dim (a TPA B or c factor's feature axis), rank, rope_dim
#    (MLA's d^R_h) -> None: tiny (64; R = 2..6; 32), and contraction axes of the per-token factor
#    products and attention scores, so sharding them would add an all-reduce per einsum for no
#    memory gain.
#  * latent -> None: MLA's d_c / d'_c is the contraction axis of the up-projections (latent,
#    heads, head_dim); sharding it would take `tensor` away from `heads` (first dim wins) and turn
#    column-parallel matmuls into row-parallel ones with an all-reduce of [B, T, H, D].
#  * layers -> None: nn.scan slices one layer per step; sharding the stacked axis would make each
#    step fetch a whole layer from one device (a pipeline without a schedule).
#  * length / cache_length -> context: context parallelism.  length is the sequence axis of
#    activations and token batches (attention exchanges key/value items over the axis:
#    model/attention/context.py), cache_length a decode cache's (decoding merges per-shard partial
#    softmaxes).  With context = 1 (the default) nothing changes.
Rules = tuple[tuple[str, Any], ...]  # ((logical axis, mesh axis | tuple of mesh axes | None), ...)

LOGICAL_AXIS_RULES: Rules = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("head_dim", None),
    ("value_dim", None),
    ("factor_dim", None),
    ("rank", None),
    ("latent", None),
    ("rope_dim", None),
    ("layers", None),
    ("length", "context"),
    ("cache_length", "context"),
)

# Activations (inside jit): the residual stream's embed axis stays whole on every device (as in
# Megatron / MaxText tensor parallelism); batch, heads and mlp follow the parameter rules.
ACTIVATION_RULES: Rules = tuple((name, None if name == "embed" else axes) for name, axes in LOGICAL_AXIS_RULES)

_LOGGED: set[str] = set()  # fallback messages already logged (each is logged once per process)


def _log_once(msg: str) -> None:
    if msg not in _LOGGED:
        _LOGGED.add(msg)
        log.warning(msg)


# ---------------------------------------------------------------------------------------------- mesh
def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1, context: int = 1,
              devices: Optional[Sequence] = None) -> Mesh:
    """A ("data", "fsdp", "context", "tensor") mesh with Auto axis types; one size may be -1 (= the rest).

    The sizes are validated by ``MeshConfig`` (the one place for that rule); what depends on the
    devices present is checked here."""
    try:
        MeshConfig(data=data, fsdp=fsdp, tensor=tensor, context=context)
    except ValueError as e:
        raise ValueError(f"make_mesh: {e}") from None
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    sizes = {"data": data, "fsdp": fsdp, "context": context, "tensor": tensor}
    fill = [k for k, v in sizes.items() if v == -1]
    known = math.prod(v for v in sizes.values() if v != -1)
    if fill:
        if n % known:
            raise ValueError(f"make_mesh: {sizes} leaves no integer size for {fill[0]!r}: "
                             f"{known} does not divide the device count {n}")
        sizes[fill[0]] = n // known
    elif known != n:
        raise ValueError(f"make_mesh: data*fsdp*context*tensor = {known} must equal the device count {n} ({sizes})")
    shape = tuple(sizes[a] for a in MESH_AXES)
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def mesh_from_config(mesh_cfg: Any, devices: Optional[Sequence] = None) -> Mesh:
    """Mesh from any object with ``data`` / ``fsdp`` / ``tensor`` / ``context`` attributes (e.g. a MeshConfig)."""
    return make_mesh(getattr(mesh_cfg, "data", 1), getattr(mesh_cfg, "fsdp", -1), getattr(mesh_cfg, "tensor", 1),
                     getattr(mesh_cfg, "context", 1), devices=devices)


# ---------------------------------------------------------------------------------------------- rules
def _rule(name: str, rules: Rules) -> tuple[str, ...]:
    for logical, mesh_axes in rules:
        if logical == name:
            if mesh_axes is None:
                return ()
            return (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)
    _log_once(f"parallel: logical axis {name!r} has no rule in the table; replicating it")
    return ()


def _best_subset(axes: tuple[str, ...], size: int, mesh_shape: Mapping[str, int]) -> tuple[str, ...]:
    """Order-preserving subset of ``axes`` with the largest size product dividing ``size``."""
    best, best_prod = (), 1
    for k in range(len(axes), 0, -1):
        for sub in itertools.combinations(axes, k):
            p = math.prod(mesh_shape[a] for a in sub)
            if size % p == 0 and p > best_prod:
                best, best_prod = sub, p
    return best


def logical_to_spec(logical_axes: Optional[Sequence[Optional[str]]], shape: Sequence[int], mesh: Mesh,
                    rules: Rules = LOGICAL_AXIS_RULES, log_fallbacks: bool = True) -> PartitionSpec:
    """PartitionSpec for an array of ``shape`` whose dimensions carry ``logical_axes`` (see module doc);
    fallbacks are logged once each unless ``log_fallbacks`` is False (activations: expected)."""
    say = _log_once if log_fallbacks else (lambda msg: None)
    shape = tuple(int(s) for s in shape)
    if logical_axes is None:
        return PartitionSpec()
    logical_axes = tuple(logical_axes)
    if len(logical_axes) != len(shape):
        raise ValueError(f"logical axes {logical_axes} do not match the array rank of shape {shape}")
    mesh_shape = dict(mesh.shape)
    used: set[str] = set()
    spec = []
    for name, size in zip(logical_axes, shape):
        if name is None:
            spec.append(None)
            continue
        # size-1 axes and axes this mesh lacks change nothing: drop them silently
        wanted = tuple(a for a in _rule(name, rules) if mesh_shape.get(a, 1) > 1)
        free = tuple(a for a in wanted if a not in used)
        if free != wanted:
            say(f"parallel: logical axis {name!r} (size {size}) cannot use mesh axes "
                      f"{tuple(a for a in wanted if a in used)} already taken by another dimension of "
                      f"{logical_axes}; using {free or 'none (replicated)'}")
        chosen = _best_subset(free, size, mesh_shape)
        if chosen != free:
            sizes = "x".join(str(mesh_shape[a]) for a in free)
            say(f"parallel: logical axis {name!r} of size {size} is not divisible by mesh axes "
                      f"{free} (size {sizes}); "
                      + (f"sharding it over {chosen} only" if chosen else "replicating it"))
        used.update(chosen)
        spec.append(None if not chosen else chosen[0] if len(chosen) == 1 else chosen)
    while spec and spec[-1] is None:
        spec.pop()
    return PartitionSpec(*spec)


def constrain(x: jax.Array, logical_axes: Sequence[Optional[str]]) -> jax.Array:
    """Pin an activation's layout inside ``jit`` under the ambient mesh (``mesh_context``): its
    dimensions carry ``logical_axes``, mapped by ``ACTIVATION_RULES`` (with the same divisibility
    fallback as parameters), so that XLA keeps the intended layout under fsdp and tensor
    parallelism.  Without an ambient mesh, or on one device, ``x`` is returned as it is."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return x
    spec = logical_to_spec(logical_axes, x.shape, mesh, ACTIVATION_RULES, log_fallbacks=False)
    manual = {a for a, kind in zip(mesh.axis_names, mesh.axis_types) if kind == AxisType.Manual}
    if manual:  # inside shard_map (e.g. context-parallel attention): only the automatic axes remain
        keep = lambda axes: tuple(a for a in ((axes,) if isinstance(axes, str) else axes) if a not in manual)
        spec = PartitionSpec(*[None if d is None else (keep(d) or None) for d in spec])
    return jax.lax.with_sharding_constraint(x, spec)


def logical_to_sharding(logical_axes: Optional[Sequence[Optional[str]]], shape: Sequence[int], mesh: Mesh,
                        rules: Rules = LOGICAL_AXIS_RULES) -> NamedSharding:
    """NamedSharding for ``shape`` with the divisibility fallback (see module doc)."""
    return NamedSharding(mesh, logical_to_spec(logical_axes, shape, mesh, rules))


# ---------------------------------------------------------------------------------------------- params
def _is_box(x: Any) -> bool:
    return isinstance(x, nn.LogicallyPartitioned)


def logical_axes_of(params_boxed: Any) -> Any:
    """Pytree (unboxed structure) of each parameter's logical axis names (None when unannotated)."""
    return jax.tree.map(lambda b: tuple(b.names) if _is_box(b) else None, params_boxed, is_leaf=_is_box)


def unbox(params_boxed: Any) -> Any:
    """Strip LogicallyPartitioned boxes without applying sharding constraints."""
    return jax.tree.map(lambda b: b.value if _is_box(b) else b, params_boxed, is_leaf=_is_box)


def param_shardings(boxed_or_abstract_params: Any, mesh: Mesh, rules: Rules = LOGICAL_AXIS_RULES) -> Any:
    """NamedSharding per parameter, for params from ``model.init`` or ``jax.eval_shape(model.init, ...)``.

    The result has the unboxed structure (that of ``nn.meta.unbox(params)``).  Leaves without a
    LogicallyPartitioned box are replicated.
    """

    def one(x: Any) -> NamedSharding:
        if _is_box(x):
            return logical_to_sharding(x.names, x.value.shape, mesh, rules)
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree.map(one, boxed_or_abstract_params, is_leaf=_is_box)


def shard_params(model: nn.Module, cfg: ModelConfig, mesh: Mesh, rng: jax.Array,
                 example_tokens: Optional[jax.Array] = None, rules: Rules = LOGICAL_AXIS_RULES) -> Any:
    """Initialise ``model``'s params directly sharded on ``mesh`` (no host copy); returns them unboxed.

    ``example_tokens`` only fixes shapes; by default a [1, min(8, max_seq_len)] batch of zeros.
    """
    if example_tokens is None:
        example_tokens = jnp.zeros((1, min(8, cfg.max_seq_len)), jnp.int32)
    example_tokens = jax.ShapeDtypeStruct(tuple(example_tokens.shape), jnp.int32)

    def init(key: jax.Array) -> Any:
        return model.init(key, jnp.zeros(example_tokens.shape, example_tokens.dtype))["params"]

    abstract = jax.eval_shape(init, rng)
    shardings = param_shardings(abstract, mesh, rules)
    return jax.jit(lambda key: unbox(init(key)), out_shardings=shardings)(rng)


def batch_sharding(mesh: Mesh, batch_size: Optional[int] = None, rules: Rules = LOGICAL_AXIS_RULES,
                   seq_len: int = 1) -> NamedSharding:
    """Sharding of [B, T] token batches: B over the batch rule's mesh axes; T over ``context`` when
    ``seq_len`` (T) is given, else replicated.

    With ``batch_size`` given, the divisibility fallback applies (e.g. batch 2 on data=2, fsdp=4).
    """
    if batch_size is None:
        axes = tuple(a for a in _rule("batch", rules) if dict(mesh.shape).get(a, 1) > 1)
        if not axes:
            return NamedSharding(mesh, PartitionSpec())
        return NamedSharding(mesh, PartitionSpec(axes[0] if len(axes) == 1 else axes))
    return logical_to_sharding(("batch", "length"), (batch_size, seq_len), mesh, rules)


def tree_shardings(logical_axes_tree: Any, abstract_tree: Any, mesh: Mesh, rules: Rules = LOGICAL_AXIS_RULES) -> Any:
    """NamedShardings for any pytree (e.g. a decode cache) given its logical-axes tree (tuples as
    leaves) and a matching tree of arrays / ShapeDtypeStructs."""
    is_axes = lambda x: x is None or (isinstance(x, tuple) and all(a is None or isinstance(a, str) for a in x))
    return jax.tree.map(lambda axes, a: logical_to_sharding(axes, a.shape, mesh, rules),
                        logical_axes_tree, abstract_tree, is_leaf=is_axes)


__all__ = ["MESH_AXES", "LOGICAL_AXIS_RULES", "make_mesh", "mesh_from_config", "logical_to_spec",
           "logical_to_sharding", "logical_axes_of", "unbox", "param_shardings", "shard_params",
           "batch_sharding", "tree_shardings", "mesh_context"]


@contextlib.contextmanager
def mesh_context(mesh: Mesh) -> Iterator[None]:
    """Make ``mesh`` the ambient mesh (``jax.set_mesh``; ``with mesh`` on older jax)."""
    if hasattr(jax, "set_mesh"):
        with jax.set_mesh(mesh):
            yield
    else:  # pragma: no cover - older jax
        with mesh:
            yield
