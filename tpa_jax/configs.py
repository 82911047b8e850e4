"""Named configs and the one place names are resolved.

Owns the paper's model sizes x mechanisms (Tables 9, 10; App. H.1), the CPU-sized tiny/mini
families, and the reading of training configs from JSON plus dotted ``key=value`` overrides, where
a ``"model"`` entry may be a name:

    tpa_jax.configs.get("t6-small")      # also t6-kvonly-*, mha-*, mqa-*, gqa-*, mla-*
    tpa_jax.configs.get("t6-tiny", compute_dtype="float32")   # field overrides
    tpa_jax.configs.load_train_config("t6-small", ["model=mha-small", "optim.lr=1e-3"])

Training configs ship inside the package (``tpa_jax/train_configs/*.json``, read with
``importlib.resources``), so an installed ``tpa-train`` behaves the same from any working directory:
``train_config_names()`` lists them, ``load_train_config`` takes a packaged name or a JSON file
path, and no config at all means the packaged ``DEFAULT_TRAIN_CONFIG`` (t6-tiny).  The dataclass
defaults of ``TrainConfig`` equal that default run (``TrainConfig() == load_train_config()``; a test
holds them together), so Python and the command line start from the same numbers.

Vocabulary: a model named in a training config leaves ``vocab_size`` unset (None), and training
fills it from the data's tokenizer, rounded up to a multiple of 128 (``tpa_jax.train.resolve_data``;
byte data gives 256, GPT-2's 50257 gives the paper's 50304).  ``model.vocab_size=N`` (or a model
written out as a dict) sets it explicitly; data whose vocabulary exceeds it is then refused.
"""
from __future__ import annotations

import dataclasses
import difflib
import importlib.resources
import json
import math
import os
import typing
from typing import Any, Mapping, Optional, Sequence

from .config import ModelConfig, TrainConfig

MECHANISMS = {  # name prefix -> attention field
    "t6": "tpa",
    "t6-kvonly": "tpa_kvonly",
    "mha": "mha",
    "mqa": "mqa",
    "gqa": "gqa",
    "mla": "mla",
}

# Table 9: layers, d_model.  Table 10: heads per mechanism, MLA d_c and d'_c.  H.1: head_dim 64,
# GQA 2 KV heads, MLA d^R_h 32, TPA ranks R_Q 6, R_K = R_V 2.  GPT-2 vocabulary padded to 50304.
PAPER_SIZES = {
    "small": dict(n_layer=12, d_model=768, heads=dict(mha=12, mqa=23, gqa=22, mla=12, tpa_kvonly=22, tpa=34),
                  kv_lora_rank=256, q_lora_rank=512),
    "medium": dict(n_layer=24, d_model=1024, heads=dict(mha=16, mqa=31, gqa=30, mla=23, tpa_kvonly=29, tpa=47),
                   kv_lora_rank=512, q_lora_rank=1024),
    "large": dict(n_layer=36, d_model=1280, heads=dict(mha=20, mqa=39, gqa=38, mla=34, tpa_kvonly=37, tpa=61),
                  kv_lora_rank=512, q_lora_rank=1024),
    "xl": dict(n_layer=48, d_model=1600, heads=dict(mha=25, mqa=49, gqa=48, mla=49, tpa_kvonly=47, tpa=78),
               kv_lora_rank=512, q_lora_rank=1024),
}

# CPU-sized members of the same parameter-matched family (byte vocabulary; head_dim 16 / 32).
# Head counts chosen as Table 10 does: attention parameters closest to MHA's 4 d_model^2.
TINY_SIZES = {
    "tiny": dict(n_layer=2, d_model=64, heads=dict(mha=4, mqa=7, gqa=6, mla=3, tpa_kvonly=5, tpa=4),
                 kv_lora_rank=32, q_lora_rank=48, head_dim=16, rope_head_dim=8, vocab_size=256, max_seq_len=256),
    "mini": dict(n_layer=4, d_model=128, heads=dict(mha=4, mqa=7, gqa=6, mla=3, tpa_kvonly=6, tpa=5),
                 kv_lora_rank=64, q_lora_rank=96, head_dim=32, rope_head_dim=16, vocab_size=256, max_seq_len=512),
}


def _build(mechanism: str, size: str, **overrides) -> ModelConfig:
    spec = {**PAPER_SIZES, **TINY_SIZES}[size]
    attention = MECHANISMS[mechanism]
    head_dim = spec.get("head_dim", 64)
    fields = dict(
        vocab_size=spec.get("vocab_size", 50304),
        n_layer=spec["n_layer"],
        d_model=spec["d_model"],
        n_head=spec["heads"][attention],
        head_dim=head_dim,
        attention=attention,
        q_rank=6,
        k_rank=2,
        v_rank=2,
        max_seq_len=spec.get("max_seq_len", 1024),
    )
    if attention == "gqa":
        fields["n_kv_head"] = 2
    if attention == "mla":
        fields.update(q_lora_rank=spec["q_lora_rank"], kv_lora_rank=spec["kv_lora_rank"],
                      rope_head_dim=spec.get("rope_head_dim", 32), v_head_dim=head_dim)
    fields.update(overrides)
    return ModelConfig(**fields)


def names() -> list[str]:
    """Every named config: ``{mechanism}-{size}`` for the paper's sizes, then tiny and mini."""
    return [f"{m}-{s}" for s in (*PAPER_SIZES, *TINY_SIZES) for m in MECHANISMS]


def get(name: str, **overrides: Any) -> ModelConfig:
    """The named config, with optional field overrides (validated)."""
    for mechanism in sorted(MECHANISMS, key=len, reverse=True):
        prefix = mechanism + "-"
        if name.startswith(prefix) and name[len(prefix):] in {**PAPER_SIZES, **TINY_SIZES}:
            return _build(mechanism, name[len(prefix):], **overrides)
    raise ValueError(f"unknown model config {name!r}; expected one of {names()}")


def family(size: str, **overrides: Any) -> dict[str, ModelConfig]:
    """The parameter-matched family of one size: {mechanism name: config}."""
    return {m: get(f"{m}-{size}", **overrides) for m in MECHANISMS}


def replace(cfg: ModelConfig, **changes: Any) -> ModelConfig:
    """``cfg`` with fields changed (re-validated)."""
    return dataclasses.replace(cfg, **changes)


# ====================================================================== training configs
DEFAULT_MODEL = "t6-tiny"  # the model of a training config that names none
DEFAULT_TRAIN_CONFIG = "t6-tiny"  # the packaged training config used when none is given
_PACKAGED = "train_configs"  # package-data folder of tpa_jax holding the named training configs


def train_config_names() -> list[str]:
    """The training configs shipped with the package (``--config NAME``)."""
    folder = importlib.resources.files("tpa_jax").joinpath(_PACKAGED)
    return sorted(f.name[: -len(".json")] for f in folder.iterdir() if f.name.endswith(".json"))


def _read_config_text(path: Optional[str]) -> tuple[str, str]:
    """(what to call it in errors, JSON text) of a config file path or a packaged config name."""
    name = path or DEFAULT_TRAIN_CONFIG
    if os.path.isfile(name):
        with open(name) as f:
            return f"config file {name!r}", f.read()
    stem, packaged = name[: -len(".json")] if name.endswith(".json") else name, train_config_names()
    is_name = stem in packaged and "/" not in name and os.sep not in name
    if os.path.isdir(name) and not is_name:
        raise ValueError(f"config file {name!r} is a directory; expected a JSON file")
    if not is_name:
        raise FileNotFoundError(f"config {name!r}: no such file, and not a packaged config (packaged: "
                                f"{', '.join(packaged)})")
    text = importlib.resources.files("tpa_jax").joinpath(_PACKAGED, stem + ".json").read_text()
    return f"packaged config {stem!r}", text


# TrainConfig fields holding a group of fields; a dotted override cannot reach inside the others
_GROUPS = {f.name for f in dataclasses.fields(TrainConfig)
           if f.name == "model" or dataclasses.is_dataclass(f.default)}
_SCALARS = {f.name: f.default for f in dataclasses.fields(TrainConfig) if f.name not in _GROUPS}


def parse_value(text: str) -> Any:
    """A command-line value: JSON when it parses (numbers, booleans, null, lists, dicts), else the
    bare string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def resolve_model(value: Any) -> Any:
    """A ``"model"`` entry: a name becomes its config's dict with ``vocab_size`` None (training takes
    the data's tokenizer's vocabulary, rounded up to a multiple of 128, unless a ``model.vocab_size``
    override or a model dict sets it); anything else is returned as is."""
    return get(value, vocab_size=None).to_dict() if isinstance(value, str) else value


def apply_overrides(d: Mapping[str, Any], overrides: Sequence[str]) -> dict:
    """Apply ``a.b.c=value`` overrides (values parsed by :func:`parse_value`) to a nested dict.

    A ``model=NAME`` override is applied first, so ``model.n_layer=4 model=mha-tiny`` means mha-tiny
    with 4 layers; ``model.*`` overrides on a named model edit that config's fields (with no model
    named, those of ``DEFAULT_MODEL``).  A path through a single value (``steps.x=1``) raises a
    one-line ``ValueError``.
    """
    d = json.loads(json.dumps(dict(d)))
    parsed = []
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r}: expected key.path=value")
        key, value = item.split("=", 1)
        parsed.append((key.strip().split("."), parse_value(value)))
    parsed.sort(key=lambda kv: kv[0] != ["model"])  # stable: whole-model replacements first
    for parts, value in parsed:
        node = d
        for p in parts[:-1]:
            if node is d and p == "model":
                node[p] = resolve_model(node.get(p, DEFAULT_MODEL))
            if node is d and p in _SCALARS and not isinstance(node.get(p), dict):
                held = node.get(p, _SCALARS[p])
                raise ValueError(f"override {'.'.join(parts)}: {p!r} holds {held!r}, not a group of fields")
            if not isinstance(node.setdefault(p, {}), dict):
                raise ValueError(f"override {'.'.join(parts)}: {p!r} holds {node[p]!r}, not a group of fields")
            node = node[p]
        node[parts[-1]] = value
    return d


_KINDS = {int: ("an integer", lambda v: isinstance(v, int) and not isinstance(v, bool)),
          float: ("a finite number", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
                  and math.isfinite(v)),
          bool: ("true or false", lambda v: isinstance(v, bool)),
          str: ("a string", lambda v: isinstance(v, str)),
          tuple: ("a list", lambda v: isinstance(v, (list, tuple)))}


def check_fields(cls: type, d: Mapping[str, Any], prefix: str = "") -> None:
    """Check a config dict against dataclass ``cls`` recursively before anything is built: an
    unknown key (with a did-you-mean suggestion) or a value of the wrong kind raises a one-line
    ``ValueError`` naming the full dotted key."""
    hints = typing.get_type_hints(cls)
    for key, value in d.items():
        name = prefix + str(key)
        if key not in hints:
            near = difflib.get_close_matches(str(key), list(hints), 1)
            hint = f"did you mean {prefix + near[0]!r}?" if near else f"known fields are {sorted(hints)}"
            raise ValueError(f"unknown field {name!r}; {hint}")
        kind, args = hints[key], ()
        if typing.get_origin(kind) is typing.Union:
            args = [a for a in typing.get_args(kind) if a is not type(None)]
            if value is None:
                continue
            kind = args[0]
        if dataclasses.is_dataclass(kind):
            if isinstance(value, Mapping):
                check_fields(kind, value, name + ".")
            elif not isinstance(value, kind):
                raise ValueError(f"{name}: expected a group of fields (a JSON object), got {value!r}")
        elif kind in _KINDS and not _KINDS[kind][1](value):
            expected = _KINDS[kind][0] + (" or null" if args else "")
            raise ValueError(f"{name}: expected {expected}, got {value!r}")


def train_config_from_dict(d: Mapping[str, Any]) -> TrainConfig:
    """``TrainConfig`` from a dict whose ``"model"`` may be a name (default: ``DEFAULT_MODEL``),
    checked field by field first (:func:`check_fields`)."""
    d = dict(d)
    d["model"] = resolve_model(d.get("model", DEFAULT_MODEL))
    check_fields(TrainConfig, d)
    return TrainConfig.from_dict(d)


def load_train_config(path: Optional[str] = None, overrides: Sequence[str] = ()) -> TrainConfig:
    """TrainConfig from a JSON file or a packaged config name (default: ``DEFAULT_TRAIN_CONFIG``)
    plus dotted command-line overrides.  A path that exists is read as a file; otherwise a name
    (with or without ``.json``) is looked up among :func:`train_config_names`."""
    what, text = _read_config_text(path)
    try:
        d = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{what}: invalid JSON ({e})") from None
    if not isinstance(d, dict):
        raise ValueError(f"{what}: expected a JSON object, got {type(d).__name__}")
    return train_config_from_dict(apply_overrides(d, overrides))
