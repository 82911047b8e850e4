"""Parameter, KV-cache and FLOP accounting for every attention mechanism and TPA variant.

Notation (paper Table 1): ``M = d_model``, ``h`` query heads, ``d_h`` head dim, ``G`` KV heads,
``R_Q, R_K, R_V`` TPA ranks, MLA's ``d'_c`` (``q_lora_rank``), ``d_c`` (``kv_lora_rank``) and
``d^R_h`` (``rope_head_dim``).  Every function takes a :class:`~tpa_jax.config.ModelConfig`
(except :func:`matched_n_head`, which searches over configs) and returns exact integers for
parameters and cache sizes.

Two parameter counts exist for one attention layer:

* :func:`attention_params` counts what the code creates: every weight of the layer including
  ``W_O`` and the norm gains the layer owns (MLA's ``q_norm``/``kv_norm`` scales, the per-head
  ``attn_out_norm`` scale).  It equals the leaf count under ``params["blocks"]["attn"]`` / n_layer.
* :func:`attention_params_table1` is Table 1's formula exactly as printed (no norm gains); it is
  defined only for the rows Table 1 lists.  For MLA the two differ by ``d'_c + d_c``.
"""
from __future__ import annotations

import math
from typing import NamedTuple

from .config import ModelConfig
from .model.attention import cache_spec
from .model.attention.quant import INT8, cache_dtype

__all__ = [
    "attention_params", "attention_params_table1", "attention_norm_params", "kv_cache_per_token",
    "kv_cache_bytes_per_token",
    "mlp_params", "embedding_params", "norm_params", "model_params", "matmul_params_per_token",
    "flops_per_token", "DecodeCost", "decode_flops_per_token", "matched_n_head", "table1_applies",
]


# ---------------------------------------------------------------------------------------------
# helpers
def _tpa_ranks(cfg: ModelConfig) -> dict[str, int]:
    """The factorised tensors of a TPA layer and their ranks (TPA-KVonly has no Q factors)."""
    ranks = {"q": cfg.q_rank} if cfg.attention == "tpa" else {}
    ranks.update(k=cfg.k_rank, v=cfg.v_rank)
    return ranks


def _tpa_b_tensors(cfg: ModelConfig) -> list[str]:
    """Tensors owning a B (and, third order, a C) factor: with ``shared_kv_b`` V reuses K's."""
    return [n for n in _tpa_ranks(cfg) if not (cfg.shared_kv_b and n == "v")]


def _tpa_factor_weights(cfg: ModelConfig) -> tuple[int, int]:
    """(contextual factor-projection weights, learned constant factors) of one TPA layer.

    Per tensor of rank R:  A: M*R*h (contextual) or R*h (constant);  B: M*R*d_b or R*d_b;
    third order adds C: M*R*d_c (always contextual, config forbids the mixture).
    """
    m, h, db = cfg.d_model, cfg.n_head, cfg.b_dim
    dc = cfg.tpa_c_dim if cfg.tpa_order == 3 else 0
    ranks = _tpa_ranks(cfg)
    contextual = constant = 0
    for r in ranks.values():
        if cfg.contextual_a:
            contextual += m * r * h
        else:
            constant += r * h
    for n in _tpa_b_tensors(cfg):
        r = ranks[n]
        if cfg.contextual_b:
            contextual += m * r * db
        else:
            constant += r * db
        contextual += m * r * dc
    return contextual, constant


def attention_norm_params(cfg: ModelConfig) -> int:
    """Norm gains owned by one attention layer: MLA's d'_c + d_c, plus E for ``attn_out_norm``.

    The per-head output RMSNorm normalises each head's E = value_dim vector with one gain vector
    shared by all heads (its ``scale`` is [E]).
    """
    n = cfg.q_lora_rank + cfg.kv_lora_rank if cfg.attention == "mla" else 0
    if cfg.attn_out_norm:
        n += cfg.value_dim
    return n


def _attention_matmul_params(cfg: ModelConfig) -> int:
    """Weights of one attention layer that multiply activations (everything but gains/constants)."""
    m, h, d, e = cfg.d_model, cfg.n_head, cfg.head_dim, cfg.value_dim
    w_o = h * e * m
    if cfg.attention in ("mha", "mqa", "gqa"):
        return m * h * d + 2 * m * cfg.kv_heads * d + w_o
    if cfg.attention == "mla":
        dq, dc, dr = cfg.q_lora_rank, cfg.kv_lora_rank, cfg.rope_head_dim
        # W^DQ, W^DKV, W^KR, W^UQ, W^QR, W^UK, W^UV, W^O
        return m * dq + m * dc + m * dr + dq * h * d + dq * h * dr + dc * h * d + dc * h * e + w_o
    contextual, _ = _tpa_factor_weights(cfg)
    w_q = m * h * d if cfg.attention == "tpa_kvonly" else 0
    return contextual + w_q + w_o


def _attention_constants(cfg: ModelConfig) -> int:
    return _tpa_factor_weights(cfg)[1] if cfg.is_tpa else 0


# ---------------------------------------------------------------------------------------------
# parameters
def attention_params(cfg: ModelConfig) -> int:
    """Parameters of one attention layer as built by ``tpa_jax.model``, including W_O and gains.

    Per mechanism (M = d_model, E = value_dim, W_O = h E M):

    * MHA/MQA/GQA: ``M h d_h + 2 M G d_h + W_O`` (G = h, 1, n_kv_head) -- Table 1 rows 1-3.
    * MLA: ``d'_c(M + h d_h + h d^R_h) + d_c(M + h d_h + h E) + M d^R_h + W_O + d'_c + d_c``
      (Table 1's row with E = d_h, plus the q_norm / kv_norm gains).
    * TPA / TPA-KVonly: each factorised tensor of rank R has A (``M R h``, or the ``R h`` constant
      when non-contextual A), B (``M R d_b``, or the ``R d_b`` constant when non-contextual B;
      d_b = d_h except third order) and, third order, C (``M R d_c``); ``shared_kv_b`` drops V's
      B; TPA-KVonly adds ``W_Q = M h d_h``.  With everything contextual and second order this is
      Table 1's ``M(R_Q+R_K+R_V)(h+d_h) + M h d_h`` (KVonly: ``M(R_K+R_V)(h+d_h) + 2 M h d_h``).
    * ``attn_out_norm`` adds E (one gain vector shared across heads).
    """
    return _attention_matmul_params(cfg) + _attention_constants(cfg) + attention_norm_params(cfg)


def table1_applies(cfg: ModelConfig) -> bool:
    """Whether ``cfg``'s attention layer is one of Table 1's rows (with d_v = d_h for MLA).

    Table 1 lists MHA, MQA, GQA, MLA, TPA, TPA-KVonly and (full TPA) non-contextual A or B;
    shared B, third-order TPA and the other combinations have no row.
    """
    if cfg.attention == "mla":
        return cfg.value_dim == cfg.head_dim
    if not cfg.is_tpa:
        return True
    if cfg.shared_kv_b or cfg.tpa_order != 2:
        return False
    if cfg.contextual_a and cfg.contextual_b:
        return True
    return cfg.attention == "tpa" and (cfg.contextual_a != cfg.contextual_b)


def attention_params_table1(cfg: ModelConfig) -> int:
    """Table 1's "# PARAMETERS" column exactly as printed (includes W_O, no norm gains).

    ======================  ================================================================
    MHA                     4 M h d_h
    MQA                     2 M d_h (h + 1)
    GQA                     2 M d_h (h + G)
    MLA                     d'_c(M + h d_h + h d^R_h) + d_c(M + 2 h d_h) + M(h d_h + d^R_h)
    TPA                     M(R_Q+R_K+R_V)(h + d_h) + M h d_h
    TPA (KVonly)            M(R_K+R_V)(h + d_h) + 2 M h d_h
    TPA (Non-contextual A)  (R_Q+R_K+R_V)(M d_h + h) + M h d_h
    TPA (Non-contextual B)  (R_Q+R_K+R_V)(M h + d_h) + M h d_h
    ======================  ================================================================

    Raises ``ValueError`` for configurations Table 1 does not list (see :func:`table1_applies`).
    """
    if not table1_applies(cfg):
        raise ValueError(f"Table 1 has no row for this attention layer ({_describe(cfg)})")
    m, h, d = cfg.d_model, cfg.n_head, cfg.head_dim
    a = cfg.attention
    if a == "mha":
        return 4 * m * h * d
    if a == "mqa":
        return 2 * m * d * (h + 1)
    if a == "gqa":
        return 2 * m * d * (h + cfg.n_kv_head)
    if a == "mla":
        dq, dc, dr = cfg.q_lora_rank, cfg.kv_lora_rank, cfg.rope_head_dim
        return dq * (m + h * d + h * dr) + dc * (m + 2 * h * d) + m * (h * d + dr)
    rk, rv = cfg.k_rank, cfg.v_rank
    if a == "tpa_kvonly":
        return m * (rk + rv) * (h + d) + 2 * m * h * d
    r = cfg.q_rank + rk + rv
    if not cfg.contextual_a:
        return r * (m * d + h) + m * h * d
    if not cfg.contextual_b:
        return r * (m * h + d) + m * h * d
    return m * r * (h + d) + m * h * d


def _describe(cfg: ModelConfig) -> str:
    bits = [f"attention={cfg.attention!r}"]
    if cfg.is_tpa:
        bits += [f"contextual_a={cfg.contextual_a}", f"contextual_b={cfg.contextual_b}",
                 f"shared_kv_b={cfg.shared_kv_b}", f"tpa_order={cfg.tpa_order}"]
    if cfg.attention == "mla":
        bits += [f"v_head_dim={cfg.value_dim} != head_dim={cfg.head_dim}"]
    return ", ".join(bits)


def mlp_params(cfg: ModelConfig) -> int:
    """SwiGLU W1, W2 (M x F) and W3 (F x M): ``3 M F``, F = ffn_dim (default floor(8 M / 3))."""
    return 3 * cfg.d_model * cfg.ffn_dim


def embedding_params(cfg: ModelConfig) -> int:
    """Token embedding ``V x M``; tied with the output head, so counted once."""
    return cfg.vocab_size * cfg.d_model


def norm_params(cfg: ModelConfig) -> int:
    """Block (2 per layer) and final RMSNorm gains: ``(2 L + 1) M`` when ``norm_weight``, else 0.

    The official T6 block norms are weight-free.  Norms inside attention (MLA, attn_out_norm)
    belong to :func:`attention_params`.
    """
    return (2 * cfg.n_layer + 1) * cfg.d_model if cfg.norm_weight else 0


def model_params(cfg: ModelConfig) -> int:
    """All parameters: embedding (tied head) + L (attention + MLP) + block/final norm gains."""
    return (embedding_params(cfg) + cfg.n_layer * (attention_params(cfg) + mlp_params(cfg))
            + norm_params(cfg))


# ---------------------------------------------------------------------------------------------
# KV cache
def kv_cache_per_token(cfg: ModelConfig) -> int:
    """Numbers cached per token per layer (Table 1's "KV CACHE" column and its extensions).

    * MHA ``2 h d_h``; MQA ``2 d_h``; GQA ``2 G d_h``; MLA ``d_c + d^R_h``.
    * TPA, TPA-KVonly: ``(R_K + R_V)(h + d_h)`` -- A_K, pre-rotated B_K, A_V, B_V (Sec. 3.3).
    * Non-contextual A: ``(R_K + R_V) d_h`` (A is a constant of the layer, only B is cached).
    * Non-contextual B: ``(R_K + R_V) h`` (only A is cached).
    * Shared B: ``(R_K + R_V) h + R_K d_h`` (one B for K and V; RoPE is applied to it for K at use,
      which the position alone determines).
    * Third order: ``(R_K + R_V)(h + d_b + d_c)`` (A, B and C factors, App. C).

    Combinations follow the same rule: cache every contextual factor of K and V once.  The
    count is read off the cache layout the attention family declares (``cache_spec``), which is
    also what ``tpa_jax.inference.init_cache`` allocates.
    """
    return sum(math.prod(leaf.shape) for leaf in cache_spec(cfg).values())


def kv_cache_bytes_per_token(cfg: ModelConfig, dtype: str = "bfloat16") -> int:
    """Bytes cached per token over all layers in a cache of ``dtype`` (float32, bfloat16, float16 or
    int8): the numbers of :func:`kv_cache_per_token` at the dtype's size, and for int8 one float32
    scale per row of each cached leaf (its per-token shape without the last axis: per factor row
    for TPA's A and B, per head for K and V, one per leaf for MLA's c_KV and k_R).  Equals the
    measured ``tpa_jax.inference.cache_bytes_per_token`` of ``init_cache(cfg, ..., dtype)``."""
    d = cache_dtype(dtype)
    per_layer = 0
    for leaf in cache_spec(cfg).values():
        per_layer += math.prod(leaf.shape) * d.itemsize
        if d == INT8:
            per_layer += math.prod(leaf.shape[:-1]) * 4
    return cfg.n_layer * per_layer


# ---------------------------------------------------------------------------------------------
# FLOPs (training / prefill)
def matmul_params_per_token(cfg: ModelConfig) -> int:
    """Weights every token multiplies once in a forward pass: all attention projections
    (W_O included, TPA constants and norm gains excluded), the MLPs, and the tied output head
    ``V M`` (the embedding *lookup* itself is free)."""
    return cfg.n_layer * (_attention_matmul_params(cfg) + mlp_params(cfg)) + embedding_params(cfg)


def _tpa_contraction_flops(cfg: ModelConfig) -> int:
    """Per token per layer: ``(1/R) A^T B`` is 2 R h d_h FLOPs for each of Q (TPA only), K, V;
    third order first forms vec(b (x) c): R d_b d_c = R d_h multiplies per tensor."""
    if not cfg.is_tpa:
        return 0
    ranks = _tpa_ranks(cfg)
    f = sum(2 * r * cfg.n_head * cfg.head_dim for r in ranks.values())
    if cfg.tpa_order == 3:
        f += sum(ranks[t] * cfg.head_dim for t in _tpa_b_tensors(cfg))
    return f


def flops_per_token(cfg: ModelConfig, seq_len: int, training: bool = False) -> float:
    """Forward (or training = 3x forward) FLOPs per token, the PaLM / nanoGPT MFU convention.

    forward = 2 * matmul_params_per_token(cfg)                    (one multiply-add per weight)
            + L * TPA factor contraction  (2 R h d_h per Q/K/V; third order + R d_h per b (x) c)
            + L * (2 T h qk_dim + 2 T h value_dim)                 (scores Q K^T and P V)

    with T = ``seq_len``.  The attention term charges every query the *full* sequence length
    (not the causal average T/2), exactly as PaLM's appendix B and nanoGPT's ``estimate_mfu``
    (``6N + 12 L H Q T`` for training) do, so MFU numbers are comparable with theirs.
    Element-wise work (RoPE, norms, softmax, SiLU, the 1/R scales) is not counted.  For MLA
    qk_dim = d_h + d^R_h (the non-absorbed training path).  Training = 3 x forward (backward =
    2 x forward).
    """
    if seq_len < 0:
        raise ValueError(f"seq_len: expected an integer >= 0, got {seq_len!r}")
    per_layer = _tpa_contraction_flops(cfg) + 2 * seq_len * cfg.n_head * (cfg.qk_dim + cfg.value_dim)
    fwd = 2.0 * matmul_params_per_token(cfg) + cfg.n_layer * per_layer
    return 3.0 * fwd if training else fwd


# ---------------------------------------------------------------------------------------------
# decoding (App. A.4)
class DecodeCost(NamedTuple):
    """Cost of decoding one token in one attention layer, in App. A.4's unit.

    A.4 counts one multiply-accumulate as one "FLOP": its MHA attention term ``2 M H d_h =
    4096 M`` (H=32, d_h=64) is H d_h MACs for the scores q.k plus H d_h MACs for alpha.v per cached
    token.  ``hardware_flops`` doubles it (2 FLOPs per MAC, the convention of
    :func:`flops_per_token`).
    """

    projection: int  # per-step cost independent of the cache length
    attention: int  # cache-interaction cost: context_len * attention_per_cached_token
    attention_per_cached_token: int

    @property
    def total(self) -> int:
        return self.projection + self.attention

    @property
    def hardware_flops(self) -> int:
        return 2 * self.total


def decode_flops_per_token(cfg: ModelConfig, context_len: int) -> DecodeCost:
    """One-layer decode cost for one query token against ``context_len`` = M cached tokens (App. A.4).

    Projection (current token; W_O is excluded, as in every A.4 worked example):

    * MHA/MQA/GQA: ``M_d d_h (H + 2 G)`` (G = H, 1, n_kv_head); MHA = ``3 M_d H d_h``.
    * MLA: ``M_d d'_c + d'_c H (d_h + d^R_h) + M_d (d_c + d^R_h) + H d_c d_h`` (the last term is the
      one absorbed up-projection A.4 keeps; it omits a second one for W^UV).
    * TPA: the factor projections, ``M_d (R_Q + R_K + R_V)(H + d_h)`` for plain TPA; variants count
      their own contextual factor weights (constants are free), KVonly adds ``M_d H d_h`` for W_Q.

    Attention per cached token:

    * MHA/MQA/GQA: ``2 H d_h`` (``H qk_dim + H value_dim``; identical for all three).
    * MLA (absorbed): ``H (2 d_c + d^R_h)``.
    * TPA, Algorithm 2 (FlashTPA decoding): ``R_Q R_K D + H R_Q R_K + H R_V E`` with D = E = d_h.
      Extensions: TPA-KVonly (full query, no R_Q) ``H R_K D + H R_K + H R_V E``; third order forms
      the B.C dots as ``(b_q.b_k)(c_q.c_k)``, i.e. D -> d_b + d_c + 1.  Non-contextual and
      shared-B variants run Algorithm 2 unchanged (RoPE makes constant B_K position-dependent).
    """
    if context_len < 0:
        raise ValueError(f"context_len: expected an integer >= 0, got {context_len!r}")
    md, h, d, e = cfg.d_model, cfg.n_head, cfg.head_dim, cfg.value_dim
    a = cfg.attention
    if a in ("mha", "mqa", "gqa"):
        proj = md * d * (h + 2 * cfg.kv_heads)
        per = h * cfg.qk_dim + h * e
    elif a == "mla":
        dq, dc, dr = cfg.q_lora_rank, cfg.kv_lora_rank, cfg.rope_head_dim
        proj = md * dq + dq * h * (d + dr) + md * (dc + dr) + h * dc * d
        per = h * (2 * dc + dr)
    else:
        proj = _tpa_factor_weights(cfg)[0] + (md * h * d if a == "tpa_kvonly" else 0)
        rk, rv = cfg.k_rank, cfg.v_rank
        dd = cfg.b_dim + cfg.tpa_c_dim + 1 if cfg.tpa_order == 3 else d
        if a == "tpa":
            rq = cfg.q_rank
            per = rq * rk * dd + h * rq * rk + h * rv * e
        else:
            per = h * rk * d + h * rk + h * rv * e
    return DecodeCost(projection=proj, attention=context_len * per, attention_per_cached_token=per)


# ---------------------------------------------------------------------------------------------
# parameter matching (Table 10)
def _params_without_gains(cfg: ModelConfig) -> int:
    return attention_params_table1(cfg) if table1_applies(cfg) else (
        attention_params(cfg) - attention_norm_params(cfg))


def matched_n_head(attention: str, d_model: int, head_dim: int, **cfg_fields) -> int:
    """Head count whose attention parameters are closest to MHA's ``4 d_model^2`` (Table 10's rule).

    Parameters are Table 1's formula (:func:`attention_params_table1`, no norm gains); for layers
    Table 1 does not list, the built layer's count without gains.  ``cfg_fields`` are further
    :class:`ModelConfig` fields (ranks, ``n_kv_head``, MLA dims, variants); head counts the config
    rejects (e.g. GQA's n_head not divisible by n_kv_head) are skipped.  Ties go to fewer heads.
    Every formula is increasing in h, so the search stops once past the target.
    """
    target = 4 * d_model * d_model
    best = None  # (distance, h)
    error = None
    # W_O alone is d_model * h * E >= d_model * h, so no h above 4 d_model + 1 can be closer.
    for h in range(1, 4 * d_model + 2):
        try:
            cfg = ModelConfig(attention=attention, d_model=d_model, head_dim=head_dim, n_head=h, **cfg_fields)
        except ValueError as exc:
            error = exc
            continue
        p = _params_without_gains(cfg)
        dist = abs(p - target)
        if best is None or dist < best[0]:
            best = (dist, h)
        if p >= target:
            break
    if best is None:
        raise ValueError(f"matched_n_head: no valid head count for attention={attention!r}: {error}")
    return best[1]
