"""The attention mechanisms behind one interface, and the einsum alphabet of the model layer.

Every family (``TPAttention``, ``StandardAttention``, ``MLAttention``) is a Flax module built from
the whole ``ModelConfig`` with

* ``__call__(x_BTM, rope, mask, cache=None, key_rope=None, start_B=None) -> (out_BTM, cache)``:
  full attention, or a cached prefill / decode step; ``mask`` is a compact ``AttentionMask`` and
  ``cfg.attention_impl`` picks how T > 1 queries attend (:mod:`.dispatch`);
* ``kv_items(x_BTM, rope)``: what its decode cache stores for T new tokens, ``{leaf: [B, T, ...]}``;
* ``cache_spec(cfg)`` (static): per cached leaf, its shape per token and the logical axes of that
  shape -- the one description of the cache layout (:func:`cache_spec` picks the family).

Einsum alphabet.  One meaning per letter, in every einsum string (lower case) and every
shape-suffixed name (upper case: ``q_BTHD`` is [batch, query positions, heads, head dim]) in
``tpa_jax.model`` and ``tpa_jax.inference``:

    B  batch                              P  query rank R_Q
    T  query positions                    R  key rank R_K
    S  key positions                      U  value rank R_V
    H  (query) heads                      C  MLA latent (d_c or d'_c)
    K  key/value heads                    F  MLA RoPE dim d^R_h
    G  query heads per kv head (group)    X  third-order TPA b-factor length d_b (App. C)
    D  query/key head dim                 J  third-order TPA c-factor length d_c (App. C)
    E  value head dim                     N  page / block index
    M  d_model                            Q  query-tile index
    I  MLP hidden width                   L  layers
    V  vocabulary

Logical axis names (``tpa_jax.parallel.LOGICAL_AXIS_RULES``) are separate words: ``batch``,
``length``, ``embed``, ``heads``, ``kv_heads``, ``head_dim`` (D), ``value_dim`` (E), ``factor_dim``
(a TPA B or c factor's feature axis), ``rank``, ``latent``, ``rope_dim``, ``mlp``, ``vocab``,
``layers``, ``cache_length``.
"""
from __future__ import annotations

from ...config import ModelConfig
from .core import AttentionMask, CacheLeaf, attend, attention_mask
from .dispatch import attention, resolve_impl
from .mla import MLAttention
from .standard import StandardAttention
from .tpa import TPAttention

AttentionClass = type[TPAttention] | type[StandardAttention] | type[MLAttention]


def attention_class(cfg: ModelConfig) -> AttentionClass:
    """The module class of ``cfg.attention``."""
    if cfg.is_tpa:
        return TPAttention
    if cfg.attention == "mla":
        return MLAttention
    return StandardAttention


def cache_spec(cfg: ModelConfig) -> dict[str, CacheLeaf]:
    """One layer's decode-cache layout: ``{leaf name: CacheLeaf(per-token shape, logical axes)}``."""
    return attention_class(cfg).cache_spec(cfg)


__all__ = ["attend", "attention", "attention_mask", "AttentionMask", "resolve_impl", "attention_class", "cache_spec",
           "CacheLeaf", "TPAttention", "StandardAttention", "MLAttention"]
