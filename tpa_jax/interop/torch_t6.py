"""Load checkpoints of the official PyTorch TPA code (github.com/tensorgi/TPA) into this project.

    cfg, params = convert(state_dict, official_config, arch)
    logits = tpa_jax.logits_fn(cfg)(params, input_ids)

``arch`` names the official model file the checkpoint was trained with:

    "T6"         model/T6.py          -> attention="tpa"
    "T6_kvonly"  model/T6_kvonly.py   -> attention="tpa_kvonly"
    "llama-mha"  model/llama-mha.py   -> attention="mha"  (head_dim = n_embd // n_head)
    "llama-gqa"  model/llama-gqa.py   -> attention="gqa"  (n_kv_head = n_head // group_size;
                                         the official MQA runs are llama-gqa with group_size = n_head)
    "llama-mla"  model/llama-mla.py   -> attention="mla"

``state_dict`` maps official key names to arrays (anything ``np.asarray`` accepts, e.g. CPU torch
tensors); torch itself is not needed.  The ``_orig_mod.`` (torch.compile) and ``module.`` (DDP)
prefixes are stripped.  The tied output head may be present as ``transformer.wte.weight``,
``lm_head.weight`` or both (then they must be equal).

``official_config`` holds the official ``GPTConfig`` fields as its saved config.json does; fields
it lacks take the official class defaults (``OFFICIAL_DEFAULTS``), unknown fields are ignored.
``bias``, ``dropout`` and ``scale_attn_by_inverse_layer_idx`` do not affect the official forward
pass (every Linear is hard-coded bias-free, no dropout layers are built) and are ignored.

The returned config reproduces the official numerics: weight-free block/final RMSNorm with
eps = float32 machine epsilon, bf16-rounded RoPE tables with the official rotation sign, per-head
output RMSNorm (eps 1e-5, weight ``subln.weight``) when ``using_groupnorm``, MLA inner norms with
eps 1e-6, float32 compute and parameters.  The returned params are plain float32 NumPy arrays in
exactly the tree ``tpa_jax.init_params(cfg, rng)`` returns; ``convert`` checks this itself.  Every
problem is reported as a one-line ``ValueError``.
"""
from __future__ import annotations

import math
import re
from typing import Any, Dict, Mapping, Tuple

import jax
import numpy as np

from ..config import FLOAT32_EPS, ModelConfig
from ..model import abstract_params

ARCHS = ("T6", "T6_kvonly", "llama-mha", "llama-gqa", "llama-mla")

_COMMON_DEFAULTS = {
    "vocab_size": 50304,
    "n_layer": 12,
    "n_embd": 768,
    "block_size": 1024,
    "bias": False,
    "dropout": 0.0,
    "scale_attn_by_inverse_layer_idx": False,
    "using_groupnorm": False,
}

# Class attributes of each official GPTConfig (commit 3d7f51deb97b8f51cd799c632fe2e417a3c2662c).
OFFICIAL_DEFAULTS: Dict[str, Dict[str, Any]] = {
    "T6": {**_COMMON_DEFAULTS, "n_head": 22, "head_dim": 64, "rank": 2, "q_rank": 6},
    "T6_kvonly": {**_COMMON_DEFAULTS, "n_head": 22, "head_dim": 64, "rank": 2, "q_rank": 12},
    "llama-mha": {**_COMMON_DEFAULTS, "n_head": 6, "head_dim": 128, "rank": 1, "q_rank": 1},
    "llama-gqa": {**_COMMON_DEFAULTS, "n_head": 24, "head_dim": 64, "rank": 1, "q_rank": 1, "group_size": 4},
    "llama-mla": {**_COMMON_DEFAULTS, "n_head": 13, "head_dim": 64, "rank": 1, "q_rank": 1,
                  "q_lora_rank": 512, "qk_rope_head_dim": 32, "kv_lora_rank": 256, "v_head_dim": 64},
}

# Official fields that each architecture's forward pass actually reads.
_USED_INT_FIELDS = {
    "T6": ("vocab_size", "n_layer", "n_embd", "n_head", "head_dim", "rank", "q_rank", "block_size"),
    "T6_kvonly": ("vocab_size", "n_layer", "n_embd", "n_head", "head_dim", "rank", "block_size"),
    "llama-mha": ("vocab_size", "n_layer", "n_embd", "n_head", "block_size"),
    "llama-gqa": ("vocab_size", "n_layer", "n_embd", "n_head", "head_dim", "group_size", "block_size"),
    "llama-mla": ("vocab_size", "n_layer", "n_embd", "n_head", "head_dim", "qk_rope_head_dim", "q_lora_rank",
                  "kv_lora_rank", "v_head_dim", "block_size"),
}

_PREFIXES = ("_orig_mod.", "module.")
_EMBED_KEYS = ("transformer.wte.weight", "lm_head.weight")


def _fail(msg: str) -> ValueError:
    return ValueError(f"torch_t6.convert: {msg}")


# ---------------------------------------------------------------------------------------- config
def official_defaults(arch: str) -> Dict[str, Any]:
    """The official GPTConfig class defaults of ``arch`` (a copy)."""
    _check_arch(arch)
    return dict(OFFICIAL_DEFAULTS[arch])


def _check_arch(arch: Any) -> None:
    if arch not in ARCHS:
        raise _fail(f"unknown arch {arch!r}; expected one of {ARCHS}")


def _resolve_official(official_config: Mapping[str, Any], arch: str) -> Dict[str, Any]:
    if not isinstance(official_config, Mapping):
        raise _fail(f"official_config: expected a mapping of GPTConfig fields, got {type(official_config).__name__}")
    oc = {**OFFICIAL_DEFAULTS[arch], **dict(official_config)}
    for name in _USED_INT_FIELDS[arch]:
        v = oc[name]
        if isinstance(v, float) and v.is_integer():
            v = oc[name] = int(v)
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise _fail(f"official_config[{name!r}]: expected an integer >= 1 for arch {arch!r}, got {v!r}")
        oc[name] = int(v)
    g = oc["using_groupnorm"]
    if g is None:
        g = False
    if not isinstance(g, (bool, np.bool_)):
        raise _fail(f"official_config['using_groupnorm']: expected a bool, got {g!r}")
    oc["using_groupnorm"] = bool(g)
    return oc


def model_config(official_config: Mapping[str, Any], arch: str) -> ModelConfig:
    """The ``ModelConfig`` equivalent to an official GPTConfig (missing fields: official defaults)."""
    _check_arch(arch)
    oc = _resolve_official(official_config, arch)
    n_embd, n_head = oc["n_embd"], oc["n_head"]
    fields: Dict[str, Any] = dict(
        vocab_size=oc["vocab_size"],
        n_layer=oc["n_layer"],
        d_model=n_embd,
        n_head=n_head,
        max_seq_len=oc["block_size"],
        mlp_hidden=math.floor(8 / 3 * n_embd),  # official MLP: floor(8/3 * n_embd)
        compute_dtype="float32",
        param_dtype="float32",
        rope_theta=10000.0,
        rope_bf16_tables=True,
        norm_weight=False,
        norm_eps=FLOAT32_EPS,
        attn_out_norm=oc["using_groupnorm"],
        attn_out_norm_eps=1e-5,
        mla_norm_eps=1e-6,
    )
    if arch == "T6":
        fields.update(attention="tpa", head_dim=oc["head_dim"], q_rank=oc["q_rank"], k_rank=oc["rank"],
                      v_rank=oc["rank"])
    elif arch == "T6_kvonly":
        fields.update(attention="tpa_kvonly", head_dim=oc["head_dim"], k_rank=oc["rank"], v_rank=oc["rank"])
    elif arch == "llama-mha":
        if n_embd % n_head:
            raise _fail(f"official_config['n_head']: expected a divisor of n_embd={n_embd} for llama-mha, got {n_head}")
        fields.update(attention="mha", head_dim=n_embd // n_head)  # the config's head_dim is ignored
    elif arch == "llama-gqa":
        g = oc["group_size"]
        if n_head % g:
            raise _fail(f"official_config['group_size']: expected a divisor of n_head={n_head}, got {g}")
        fields.update(attention="gqa", head_dim=oc["head_dim"], n_kv_head=n_head // g)
    else:  # llama-mla
        dn, dr, dv = oc["head_dim"], oc["qk_rope_head_dim"], oc["v_head_dim"]
        if oc["using_groupnorm"] and dv != dn + dr:
            raise _fail(f"official_config['using_groupnorm']: llama-mla's subln has size head_dim + qk_rope_head_dim"
                        f" = {dn + dr} but normalises v heads of size v_head_dim={dv} (the official forward fails)")
        fields.update(attention="mla", head_dim=dn, rope_head_dim=dr, v_head_dim=dv,
                      q_lora_rank=oc["q_lora_rank"], kv_lora_rank=oc["kv_lora_rank"])
    if fields["mlp_hidden"] == int(8 * n_embd / 3):
        fields["mlp_hidden"] = None  # the ModelConfig default is the same size
    try:
        return ModelConfig(**fields)
    except ValueError as e:
        raise _fail(f"official_config for arch {arch!r} maps to an invalid ModelConfig: {e}") from None


# ---------------------------------------------------------------------------------------- weights
def _expected_shapes(cfg: ModelConfig, arch: str) -> Dict[str, Tuple[int, ...]]:
    """Official per-layer key suffix (after 'transformer.h.{i}.') -> torch weight shape."""
    m, h, d, f = cfg.d_model, cfg.n_head, cfg.head_dim, cfg.ffn_dim
    shapes: Dict[str, Tuple[int, ...]] = {
        "mlp.c_fc1.weight": (f, m),
        "mlp.c_fc2.weight": (f, m),
        "mlp.c_proj.weight": (m, f),
    }
    if arch in ("T6", "T6_kvonly"):
        r = cfg.k_rank
        p = "attn.c_qkv."
        if arch == "T6":
            rq = cfg.q_rank
            shapes[p + "W_A_q.weight"] = (h * rq, m)
            shapes[p + "W_B_q.weight"] = (rq * d, m)
        else:
            shapes[p + "c_q.weight"] = (h * d, m)
        shapes[p + "W_A_k.weight"] = (h * r, m)
        shapes[p + "W_A_v.weight"] = (h * r, m)
        shapes[p + "W_B_k.weight"] = (r * d, m)
        shapes[p + "W_B_v.weight"] = (r * d, m)
        shapes["attn.c_proj.weight"] = (m, h * d)
    elif arch in ("llama-mha", "llama-gqa"):
        kv = cfg.kv_heads
        shapes["attn.c_q.weight"] = (h * d, m)
        shapes["attn.c_k.weight"] = (kv * d, m)
        shapes["attn.c_v.weight"] = (kv * d, m)
        shapes["attn.c_proj.weight"] = (m, h * d)
    else:
        dr, dv, dq, dc = cfg.rope_head_dim, cfg.value_dim, cfg.q_lora_rank, cfg.kv_lora_rank
        shapes.update({
            "attn.q_a_proj.weight": (dq, m),
            "attn.q_a_layernorm.weight": (dq,),
            "attn.q_b_proj.weight": (h * (d + dr), dq),
            "attn.kv_a_proj_with_mqa.weight": (dc + dr, m),
            "attn.kv_a_layernorm.weight": (dc,),
            "attn.kv_b_proj.weight": (h * (d + dv), dc),
            "attn.c_proj.weight": (m, h * dv),
        })
    if cfg.attn_out_norm:
        # official subln = RMSNorm(head_dim) (MLA: head_dim + rope dim, only valid when equal to v_head_dim)
        shapes["attn.subln.weight"] = (cfg.value_dim,)
    return shapes


def _as_float32(key: str, value: Any) -> np.ndarray:
    try:
        arr = np.asarray(value)
        if arr.dtype.kind in ("b", "O", "S", "U", "M", "m"):
            raise TypeError(f"dtype {arr.dtype} is not a floating-point weight")
        return np.asarray(arr, dtype=np.float32)
    except Exception as e:  # noqa: BLE001 - report any conversion failure on one line
        raise _fail(f"state_dict[{key!r}]: expected a numeric array ({type(e).__name__}: {e})") from None


def _normalise_keys(state_dict: Mapping[str, Any]) -> Dict[str, Any]:
    if not isinstance(state_dict, Mapping):
        raise _fail(f"state_dict: expected a mapping of key name -> array, got {type(state_dict).__name__}")
    out: Dict[str, Any] = {}
    for key, value in state_dict.items():
        if not isinstance(key, str):
            raise _fail(f"state_dict: expected string keys, got {key!r}")
        name = key
        changed = True
        while changed:
            changed = False
            for p in _PREFIXES:
                if name.startswith(p):
                    name, changed = name[len(p):], True
        if name in out:
            raise _fail(f"state_dict: key {key!r} duplicates {name!r} after stripping {_PREFIXES} prefixes")
        out[name] = value
    return out


def _embedding(sd: Dict[str, Any], cfg: ModelConfig) -> np.ndarray:
    want = (cfg.vocab_size, cfg.d_model)
    present = [k for k in _EMBED_KEYS if k in sd]
    if not present:
        raise _fail(f"missing key 'transformer.wte.weight' (or its tied alias 'lm_head.weight'), expected shape {want}")
    arrays = {}
    for k in present:
        arr = _as_float32(k, sd[k])
        if arr.shape != want:
            raise _fail(f"state_dict[{k!r}]: expected shape {want} (vocab_size, n_embd), got {arr.shape}")
        arrays[k] = arr
    if len(arrays) == 2 and not np.array_equal(*arrays.values()):
        raise _fail("state_dict['lm_head.weight'] differs from 'transformer.wte.weight'; the official model ties "
                    "them and so does this one")
    return arrays[present[0]]


def _layer_params(w: Dict[str, np.ndarray], cfg: ModelConfig, arch: str) -> Dict[str, Any]:
    """One layer's Flax params from its official weights (key suffix -> torch (out, in) array)."""
    m, h, d = cfg.d_model, cfg.n_head, cfg.head_dim
    mlp = {
        "w1": w["mlp.c_fc1.weight"].T,
        "w2": w["mlp.c_fc2.weight"].T,
        "w3": w["mlp.c_proj.weight"].T,
    }
    attn: Dict[str, Any] = {}

    def heads_out(weight, n, dim):  # (n*dim, in) with index j*dim + e -> (in, n, dim)
        return weight.reshape(n, dim, -1).transpose(2, 0, 1)

    def a_factor(weight, rank):  # (H*R, C) with index h*R + r -> ours (C, R, H)
        return weight.reshape(h, rank, m).transpose(2, 1, 0)

    def b_factor(weight, rank):  # (R*D, C) with index r*D + d -> ours (C, R, D)
        return weight.reshape(rank, d, m).transpose(2, 0, 1)

    def out_proj(weight, dim):  # (C, H*dim) with input index h*dim + e -> ours (H, dim, C)
        return weight.reshape(m, h, dim).transpose(1, 2, 0)

    if arch in ("T6", "T6_kvonly"):
        p = "attn.c_qkv."
        r = cfg.k_rank
        if arch == "T6":
            attn["w_aq"] = a_factor(w[p + "W_A_q.weight"], cfg.q_rank)
            attn["w_bq"] = b_factor(w[p + "W_B_q.weight"], cfg.q_rank)
        else:
            attn["w_q"] = heads_out(w[p + "c_q.weight"], h, d)
        attn["w_ak"] = a_factor(w[p + "W_A_k.weight"], r)
        attn["w_av"] = a_factor(w[p + "W_A_v.weight"], r)
        attn["w_bk"] = b_factor(w[p + "W_B_k.weight"], r)
        attn["w_bv"] = b_factor(w[p + "W_B_v.weight"], r)
        attn["w_o"] = out_proj(w["attn.c_proj.weight"], d)
    elif arch in ("llama-mha", "llama-gqa"):
        kv = cfg.kv_heads
        attn["w_q"] = heads_out(w["attn.c_q.weight"], h, d)
        attn["w_k"] = heads_out(w["attn.c_k.weight"], kv, d)
        attn["w_v"] = heads_out(w["attn.c_v.weight"], kv, d)
        attn["w_o"] = out_proj(w["attn.c_proj.weight"], d)
    else:
        dr, dv, dc = cfg.rope_head_dim, cfg.value_dim, cfg.kv_lora_rank
        attn["w_dq"] = w["attn.q_a_proj.weight"].T
        attn["q_norm"] = {"scale": w["attn.q_a_layernorm.weight"]}
        qb = heads_out(w["attn.q_b_proj.weight"], h, d + dr)  # (dq, H, Dn + Dr): nope first, then rope
        attn["w_uq"] = qb[..., :d]
        attn["w_qr"] = qb[..., d:]
        kva = w["attn.kv_a_proj_with_mqa.weight"]  # (dc + Dr, C): latent rows, then the shared k_pe rows
        attn["w_dkv"] = kva[:dc].T
        attn["w_kr"] = kva[dc:].T
        attn["kv_norm"] = {"scale": w["attn.kv_a_layernorm.weight"]}
        kvb = heads_out(w["attn.kv_b_proj.weight"], h, d + dv)  # (dc, H, Dn + Dv): k_nope first, then v
        attn["w_uk"] = kvb[..., :d]
        attn["w_uv"] = kvb[..., d:]
        attn["w_o"] = out_proj(w["attn.c_proj.weight"], dv)
    if cfg.attn_out_norm:
        attn["out_norm"] = {"scale": w["attn.subln.weight"]}
    return {"attn": attn, "mlp": mlp}


def _stack(layers):
    first = layers[0]
    if isinstance(first, dict):
        return {k: _stack([layer[k] for layer in layers]) for k in first}
    return np.ascontiguousarray(np.stack(layers, axis=0), dtype=np.float32)


def expected_param_shapes(cfg: ModelConfig) -> Any:
    """The parameter tree of ``cfg`` as ``ShapeDtypeStruct`` leaves (shapes and dtypes only, no compute)."""
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), abstract_params(cfg))


def _verify(params: Any, cfg: ModelConfig) -> None:
    want = expected_param_shapes(cfg)
    want_flat = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(want)}
    got_flat = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(params)}
    missing = sorted(set(want_flat) - set(got_flat))
    extra = sorted(set(got_flat) - set(want_flat))
    if missing or extra:
        raise _fail(f"converted params do not match the model's parameter tree: missing {missing}, unexpected {extra}")
    for path, spec in want_flat.items():
        got = got_flat[path]
        if tuple(got.shape) != tuple(spec.shape) or np.dtype(got.dtype) != np.dtype(spec.dtype):
            raise _fail(f"converted param {path}: expected {spec.dtype}{tuple(spec.shape)} as the model creates, "
                        f"got {got.dtype}{tuple(got.shape)}")
    if jax.tree_util.tree_structure(params) != jax.tree_util.tree_structure(want):
        raise _fail("converted params: tree structure differs from the model's parameter tree")


def convert(state_dict: Mapping[str, Any], official_config: Mapping[str, Any],
            arch: str) -> Tuple[ModelConfig, Dict[str, Any]]:
    """Official state_dict + GPTConfig fields -> (ModelConfig, params) with identical logits.

    Raises a one-line ``ValueError`` naming the key or field for an unknown ``arch``, a bad config
    field, a missing, unexpected or mis-shaped state_dict key.
    """
    _check_arch(arch)
    cfg = model_config(official_config, arch)
    sd = _normalise_keys(state_dict)

    embedding = _embedding(sd, cfg)
    per_layer = _expected_shapes(cfg, arch)
    expected_keys = set(_EMBED_KEYS)
    layers = []
    for i in range(cfg.n_layer):
        weights = {}
        for suffix, shape in per_layer.items():
            key = f"transformer.h.{i}.{suffix}"
            expected_keys.add(key)
            if key not in sd:
                raise _fail(f"missing key {key!r} (arch {arch!r}, expected shape {shape})")
            arr = _as_float32(key, sd[key])
            if arr.shape != shape:
                raise _fail(f"state_dict[{key!r}]: expected shape {shape} for arch {arch!r} with this config, "
                            f"got {arr.shape}")
            weights[suffix] = arr
        layers.append(_layer_params(weights, cfg, arch))
    unexpected = sorted(set(sd) - expected_keys, key=_natural_key)
    if unexpected:
        more = f" (+{len(unexpected) - 3} more)" if len(unexpected) > 3 else ""
        raise _fail(f"unexpected key(s) {unexpected[:3]}{more} for arch {arch!r} with n_layer={cfg.n_layer}, "
                    f"using_groupnorm={cfg.attn_out_norm}")

    params = {"embed": {"embedding": np.ascontiguousarray(embedding)}, "blocks": _stack(layers)}
    _verify(params, cfg)
    return cfg, params


def _natural_key(s: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


__all__ = ["ARCHS", "OFFICIAL_DEFAULTS", "convert", "expected_param_shapes", "model_config", "official_defaults"]
