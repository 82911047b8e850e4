"""The model configuration, validated on construction (one-line errors).

`ModelConfig` is the single object that flows down the model: modules receive it whole and read
derived sizes from its properties.  Every invalid value raises ``ValueError`` naming the field and
what was expected; ``dataclasses.replace(cfg, ...)`` re-runs the checks.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import math
from typing import Any, Mapping, Optional

ATTENTIONS = ("tpa", "tpa_kvonly", "mha", "mqa", "gqa", "mla")
DTYPES = ("float32", "bfloat16", "float16")
HEAD_FACTOR_ACTIVATIONS = ("none", "sigmoid", "softmax")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
FACTOR_INITS = ("official", "xavier")
DECODE_IMPLS, ATTENTION_IMPLS = ("flash", "pallas", "materialize"), ("auto", "xla", "blocked", "cudnn", "splash")
CONTEXT_IMPLS, CONTEXT_LAYOUTS = ("ring", "allgather"), ("striped", "contiguous")
FLOAT32_EPS = 1.1920928955078125e-07  # torch.finfo(torch.float32).eps, the official norm epsilon


def _err(field: str, expected: str, got: Any) -> ValueError:
    return ValueError(f"ModelConfig.{field}: expected {expected}, got {got!r}")


def _from_dict(cls, d: Mapping[str, Any]):
    """Build a config dataclass from a dict, naming any unknown field in a one-line error."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        near = difflib.get_close_matches(unknown[0], known, 1)
        hint = f"did you mean {near[0]!r}?" if near else f"known fields are {sorted(known)}"
        raise ValueError(f"{cls.__name__}: unknown field(s) {unknown}; {hint}")
    return cls(**dict(d))


def _positive_int(name: str, value: Any, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise _err(name, f"an integer >= {minimum}", value)


def _check(cls_name: str, field: str, ok: bool, expected: str, got: Any) -> None:
    if not ok:
        raise ValueError(f"{cls_name}.{field}: expected {expected}, got {got!r}")


def _int_ge(v: Any, minimum: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= minimum


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of a T6 (TPA) model or one of the paper's baselines: every size, mechanism,
    TPA variant, dtype and decode option, validated on construction.

    The fields are public API (configs, checkpoints and the command lines name them); each is
    documented inline.  Derived sizes are properties (``kv_heads``, ``value_dim``, ``b_dim`` ...).
    """

    vocab_size: Optional[int] = 256  # None: the training data's tokenizer's, rounded up to 128 (train fills it)
    n_layer: int = 2
    d_model: int = 64
    n_head: int = 4
    head_dim: int = 16
    attention: str = "tpa"  # "tpa" | "tpa_kvonly" | "mha" | "mqa" | "gqa" | "mla"
    # TPA ranks (R_Q is unused by tpa_kvonly).
    q_rank: int = 6
    k_rank: int = 2
    v_rank: int = 2
    # MQA / GQA: number of key/value heads (MQA: 1 or None; MHA: n_head or None).
    n_kv_head: Optional[int] = None
    # MLA (DeepSeek-V2): d'_c, d_c, d^R_h and the value head dim (defaults to head_dim).
    q_lora_rank: Optional[int] = None
    kv_lora_rank: Optional[int] = None
    rope_head_dim: Optional[int] = None
    v_head_dim: Optional[int] = None
    compute_dtype: str = "bfloat16"
    param_dtype: str = "float32"
    # --- TPA variants (paper App. C and G) ---
    contextual_a: bool = True  # False: A factors are learned constants (non-contextual A)
    contextual_b: bool = True  # False: B factors are learned constants (non-contextual B)
    shared_kv_b: bool = False  # K and V share one B factor (needs k_rank == v_rank)
    tpa_order: int = 2  # 2: A (x) B;  3: A (x) vec(B (x) C) (App. C)
    tpa_c_dim: Optional[int] = None  # d_c of third-order TPA; d_b = head_dim // tpa_c_dim
    head_factor_activation: str = "none"  # applied element-wise to the A factors' h entries
    attn_out_norm: bool = False  # per-head RMSNorm on the attention output ("using_groupnorm")
    attn_out_norm_eps: float = 1e-5
    factor_init: str = "official"  # "official": xavier on the (M,H,R)/(M,R,D) views; "xavier": App. G
    # --- transformer ---
    mlp_hidden: Optional[int] = None  # default floor(8/3 * d_model)
    max_seq_len: int = 1024
    rope_theta: float = 10000.0
    rope_bf16_tables: bool = False  # reproduce the official bf16-rounded cos/sin tables
    norm_weight: bool = False  # official T6: weight-free RMSNorm
    norm_eps: float = FLOAT32_EPS
    mla_norm_eps: float = 1e-6  # MLA's two inner (weighted) norms
    scan_layers: bool = True  # False: the same layer stack, fully unrolled
    remat_policy: str = "none"  # "none" | "full" | "dots" | "dots_no_batch"
    # --- cached decoding ---
    # How cached steps read the cache: "flash" (TPA: FlashTPA, Alg. 2 to decode, Alg. 1 to prefill; MLA decode
    # in the latent space; MHA/MQA/GQA read K, V), "pallas" (attention="tpa": decode by the Pallas kernel, Mosaic
    # on TPU, interpreted on CPU, "flash" elsewhere), "materialize" (rebuild K and V: the reference).
    decode_impl: str = "flash"
    decode_block_size: int = 512  # cache rows per online-softmax block (decode and FlashTPA prefill)
    prefill_q_block_size: int = 128  # query rows per tile of a FlashTPA cached prefill (Alg. 1)
    # --- T > 1 queries (training, forward, cached prefill): "xla" (einsum, dense mask: the reference),
    # "blocked" (jnp online softmax over key blocks, O(T * block) memory), "cudnn" (GPU), "splash" (Pallas
    # TPU kernel; interpreted on CPU), "auto" (cudnn / splash / blocked from T = 2048 / xla: see dispatch.py)
    attention_impl: str = "auto"
    attention_block_size: int = 512  # query and key block of "blocked" (splash: rounded to 128s)
    # --- context parallelism (a mesh with context > 1; model/attention/context.py): how the key/value items
    # (TPA: factors) travel -- "ring" (ppermute, online softmax) or "allgather" -- and which tokens a shard
    # holds: "striped" (t, t + C, ...: causal work balanced) or "contiguous" (one chunk per shard)
    context_impl: str = "ring"
    context_layout: str = "striped"

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        if self.attention not in ATTENTIONS:
            raise _err("attention", f"one of {ATTENTIONS}", self.attention)
        None if self.vocab_size is None else _positive_int("vocab_size", self.vocab_size, 2)
        for name in ("n_layer", "d_model", "n_head", "head_dim", "max_seq_len", "decode_block_size",
                     "attention_block_size", "prefill_q_block_size"):
            _positive_int(name, getattr(self, name))
        for name, allowed in (("compute_dtype", DTYPES), ("param_dtype", DTYPES), ("remat_policy", REMAT_POLICIES),
                              ("decode_impl", DECODE_IMPLS), ("attention_impl", ATTENTION_IMPLS),
                              ("context_impl", CONTEXT_IMPLS), ("context_layout", CONTEXT_LAYOUTS)):
            if getattr(self, name) not in allowed:
                raise _err(name, f"one of {allowed}", getattr(self, name))
        for name in ("norm_eps", "mla_norm_eps", "attn_out_norm_eps", "rope_theta"):
            if not (_num(getattr(self, name)) and getattr(self, name) > 0):
                raise _err(name, "a finite number > 0", getattr(self, name))
        if self.mlp_hidden is not None:
            _positive_int("mlp_hidden", self.mlp_hidden)
        if self.decode_impl == "pallas" and self.attention != "tpa":
            raise _err("decode_impl", f"'flash' or 'materialize' for attention={self.attention!r} "
                       "(the Pallas kernel covers attention='tpa' only)", self.decode_impl)
        if self.decode_impl == "pallas" and self.decode_block_size % 8:
            raise _err("decode_block_size", "a multiple of 8 with decode_impl='pallas' (TPU tiling)",
                       self.decode_block_size)
        if self.attention != "mla" and self.head_dim % 2:
            raise _err("head_dim", "an even number (RoPE rotates pairs)", self.head_dim)

        is_tpa = self.attention in ("tpa", "tpa_kvonly")
        if is_tpa:
            ranks = ("q_rank", "k_rank", "v_rank") if self.attention == "tpa" else ("k_rank", "v_rank")
            for name in ranks:
                _positive_int(name, getattr(self, name))
            if self.shared_kv_b and self.k_rank != self.v_rank:
                raise _err("shared_kv_b", f"k_rank == v_rank for a shared B (k_rank={self.k_rank})", self.v_rank)
            if self.tpa_order not in (2, 3):
                raise _err("tpa_order", "2 or 3", self.tpa_order)
            if self.tpa_order == 3:
                if self.attention != "tpa":
                    raise _err("tpa_order", "2 for tpa_kvonly (third order factorises Q, K and V)", 3)
                c = self.tpa_c_dim
                if c is None or isinstance(c, bool) or not isinstance(c, int) or c < 1 or self.head_dim % c:
                    raise _err("tpa_c_dim", f"a divisor of head_dim={self.head_dim} for third-order TPA", c)
                if (self.head_dim // c) % 2:
                    raise _err("tpa_c_dim", "a value leaving an even d_b = head_dim // tpa_c_dim (RoPE)", c)
                if not (self.contextual_a and self.contextual_b) or self.shared_kv_b:
                    raise _err("tpa_order", "2 when non-contextual or shared-B variants are used", 3)
            if self.head_factor_activation not in HEAD_FACTOR_ACTIVATIONS:
                raise _err("head_factor_activation", f"one of {HEAD_FACTOR_ACTIVATIONS}", self.head_factor_activation)
            if self.factor_init not in FACTOR_INITS:
                raise _err("factor_init", f"one of {FACTOR_INITS}", self.factor_init)
        else:
            defaults = {"contextual_a": True, "contextual_b": True, "shared_kv_b": False, "tpa_order": 2,
                        "head_factor_activation": "none"}
            for name, default in defaults.items():
                if getattr(self, name) != default:
                    raise _err(name, f"the default {default!r} (TPA-only option, attention={self.attention!r})",
                               getattr(self, name))

        if self.attention == "mha" and self.n_kv_head not in (None, self.n_head):
            raise _err("n_kv_head", f"None or n_head={self.n_head} for mha", self.n_kv_head)
        if self.attention == "mqa" and self.n_kv_head not in (None, 1):
            raise _err("n_kv_head", "None or 1 for mqa", self.n_kv_head)
        if self.attention == "gqa":
            _positive_int("n_kv_head", self.n_kv_head)
            if self.n_head % self.n_kv_head:
                raise _err("n_kv_head", f"a divisor of n_head={self.n_head}", self.n_kv_head)
        if self.attention == "mla":
            for name in ("q_lora_rank", "kv_lora_rank", "rope_head_dim"):
                _positive_int(name, getattr(self, name))
            if self.rope_head_dim % 2:
                raise _err("rope_head_dim", "an even number (RoPE rotates pairs)", self.rope_head_dim)
            if self.v_head_dim is not None:
                _positive_int("v_head_dim", self.v_head_dim)
        elif self.v_head_dim not in (None, self.head_dim):
            raise _err("v_head_dim", f"None or head_dim={self.head_dim} (only MLA has its own)", self.v_head_dim)

    # ------------------------------------------------------------------ derived sizes
    @property
    def ffn_dim(self) -> int:
        return self.mlp_hidden if self.mlp_hidden is not None else int(8 * self.d_model / 3)

    @property
    def kv_heads(self) -> int:
        """Number of distinct key/value heads (TPA and MLA: n_head)."""
        return {"mqa": 1, "gqa": self.n_kv_head}.get(self.attention, self.n_head)

    @property
    def value_dim(self) -> int:
        """Per-head value dimension E."""
        return self.v_head_dim if (self.attention == "mla" and self.v_head_dim) else self.head_dim

    @property
    def qk_dim(self) -> int:
        """Per-head query/key dimension (MLA: d_h + d^R_h)."""
        return self.head_dim + (self.rope_head_dim if self.attention == "mla" else 0)

    @property
    def b_dim(self) -> int:
        """Length of a TPA B factor: head_dim, or d_b for third-order TPA."""
        return self.head_dim // self.tpa_c_dim if self.tpa_order == 3 else self.head_dim

    @property
    def rope_dim(self) -> int:
        """Dimension RoPE rotates: head_dim, d_b (third-order TPA) or d^R_h (MLA)."""
        return self.rope_head_dim if self.attention == "mla" else self.b_dim if self.is_tpa else self.head_dim

    @property
    def attn_scale(self) -> float:
        return 1.0 / math.sqrt(self.qk_dim)

    @property
    def is_tpa(self) -> bool:
        return self.attention in ("tpa", "tpa_kvonly")

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=True)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ModelConfig":
        return _from_dict(cls, d)

    @classmethod
    def from_json(cls, text: str) -> "ModelConfig":
        return cls.from_dict(json.loads(text))
