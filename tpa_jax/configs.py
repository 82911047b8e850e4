"""Named model configs: the paper's sizes x mechanisms (Tables 9, 10; App. H.1) and tiny ones.

    tpa_jax.configs.get("t6-small")      # also t6-kvonly-*, mha-*, mqa-*, gqa-*, mla-*
    tpa_jax.configs.get("t6-tiny", compute_dtype="float32")   # field overrides
"""
from __future__ import annotations

import dataclasses

from .config import ModelConfig

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
    return [f"{m}-{s}" for s in (*PAPER_SIZES, *TINY_SIZES) for m in MECHANISMS]


def get(name: str, **overrides) -> ModelConfig:
    """The named config, with optional field overrides (validated)."""
    for mechanism in sorted(MECHANISMS, key=len, reverse=True):
        prefix = mechanism + "-"
        if name.startswith(prefix) and name[len(prefix):] in {**PAPER_SIZES, **TINY_SIZES}:
            return _build(mechanism, name[len(prefix):], **overrides)
    raise ValueError(f"unknown model config {name!r}; expected one of {names()}")


def family(size: str, **overrides) -> dict[str, ModelConfig]:
    """The parameter-matched family of one size: {mechanism name: config}."""
    return {m: get(f"{m}-{size}", **overrides) for m in MECHANISMS}


def replace(cfg: ModelConfig, **changes) -> ModelConfig:
    return dataclasses.replace(cfg, **changes)
