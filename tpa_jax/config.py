"""Frozen configuration dataclasses with one-line validation errors.

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


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of a T6 (TPA) model or one of the paper's baselines: every size, mechanism,
    TPA variant, dtype and decode option, validated on construction.

    The fields are public API (configs, checkpoints and the command lines name them); each is
    documented inline.  Derived sizes are properties (``kv_heads``, ``value_dim``, ``b_dim`` ...).
    """

    vocab_size: int = 256
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

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        if self.attention not in ATTENTIONS:
            raise _err("attention", f"one of {ATTENTIONS}", self.attention)
        _positive_int("vocab_size", self.vocab_size, 2)
        for name in ("n_layer", "d_model", "n_head", "head_dim", "max_seq_len", "decode_block_size",
                     "attention_block_size", "prefill_q_block_size"):
            _positive_int(name, getattr(self, name))
        for name, allowed in (("compute_dtype", DTYPES), ("param_dtype", DTYPES), ("remat_policy", REMAT_POLICIES),
                              ("decode_impl", DECODE_IMPLS), ("attention_impl", ATTENTION_IMPLS)):
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


# ====================================================================== training configs
def _check(cls_name: str, field: str, ok: bool, expected: str, got: Any) -> None:
    if not ok:
        raise ValueError(f"{cls_name}.{field}: expected {expected}, got {got!r}")


def _int_ge(v: Any, minimum: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= minimum


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclasses.dataclass(frozen=True)
class DataConfig:
    # "embedded" (stdlib sources), "manifest" (prepared shards at `path`) or "recall" (synthetic
    # multi-query associative recall, tpa_jax.data.recall; examples are seq_len tokens long)
    source: str = "embedded"
    path: Optional[str] = None  # manifest file or directory for source="manifest"
    tokenizer: str = "byte"  # tokenizer for the embedded corpus
    cache_dir: Optional[str] = None  # where embedded shards are written (default: ~/.cache/tpa_jax/...)
    seq_len: int = 128
    # source="recall" only.  Ids: 0 filler, keys 1..recall_keys, values after the keys (byte vocab: <= 256 ids)
    recall_pairs: int = 8  # key-value pairs at the start of every example (distinct keys)
    recall_queries: Optional[int] = None  # keys queried later in the example (distinct); None: recall_pairs
    recall_keys: int = 127  # size of the key id range
    recall_values: int = 128  # size of the value id range
    recall_noise: bool = False  # positions outside pairs and queries: False: filler id 0, True: random key/value ids
    recall_seed: int = 0  # generator seed (TrainConfig.seed only shuffles); train and val are separate streams
    recall_train_examples: int = 100_000  # size of the random-access train split
    recall_val_examples: int = 1024  # size of the held-out split

    def __post_init__(self):
        _check("DataConfig", "source", self.source in ("embedded", "manifest", "recall"),
               "'embedded', 'manifest' or 'recall'", self.source)
        _check("DataConfig", "path", self.source != "manifest" or bool(self.path),
               "a manifest path when source='manifest'", self.path)
        _check("DataConfig", "seq_len", _int_ge(self.seq_len, 1), "an integer >= 1", self.seq_len)
        for f in ("path", "tokenizer", "cache_dir"):
            v = getattr(self, f)
            _check("DataConfig", f, isinstance(v, str) or (v is None and f != "tokenizer"), "a string", v)
        for f, lo in (("recall_pairs", 1), ("recall_keys", 1), ("recall_values", 1), ("recall_seed", 0),
                      ("recall_train_examples", 1), ("recall_val_examples", 1)):
            _check("DataConfig", f, _int_ge(getattr(self, f), lo), f"an integer >= {lo}", getattr(self, f))
        q = self.recall_pairs if self.recall_queries is None else self.recall_queries
        _check("DataConfig", "recall_queries", _int_ge(q, 1) and q <= self.recall_pairs,
               f"None or an integer in [1, recall_pairs={self.recall_pairs}]", self.recall_queries)
        _check("DataConfig", "recall_noise", isinstance(self.recall_noise, bool), "a bool", self.recall_noise)
        if self.source == "recall":
            _check("DataConfig", "recall_pairs", self.recall_pairs <= self.recall_keys,
                   f"<= recall_keys={self.recall_keys} (keys are distinct)", self.recall_pairs)
            _check("DataConfig", "recall_keys", 1 + self.recall_keys + self.recall_values <= 256,
                   f"1 + recall_keys + recall_values <= 256 (byte vocabulary; recall_values={self.recall_values})",
                   self.recall_keys)
            _check("DataConfig", "seq_len", self.seq_len + 1 >= 2 * (self.recall_pairs + q),
                   f">= 2*(recall_pairs + queries) - 1 = {2 * (self.recall_pairs + q) - 1} "
                   f"({self.recall_pairs} pairs, {q} queries)", self.seq_len)


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW, linear warmup then cosine decay to min_lr (defaults: the t6-tiny run's; App. H.1: t6-small..xl)."""

    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 30
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1  # on >= 2-D weights only
    grad_clip: float = 1.0  # global-norm clipping; 0 disables
    accum_steps: int = 1  # gradient accumulation micro-steps per update

    def __post_init__(self):
        for f, lo in (("lr", 0), ("b1", 0), ("b2", 0), ("eps", 0), ("min_lr", None), ("weight_decay", None),
                      ("grad_clip", None)):
            v = getattr(self, f)
            _check("OptimConfig", f, _num(v) and (v > 0 if lo == 0 else v >= 0),
                   f"a finite number {'>' if lo == 0 else '>='} 0", v)
        _check("OptimConfig", "min_lr", self.min_lr <= self.lr, f"<= lr={self.lr}", self.min_lr)
        _check("OptimConfig", "warmup_steps", _int_ge(self.warmup_steps, 0), "an integer >= 0", self.warmup_steps)
        _check("OptimConfig", "accum_steps", _int_ge(self.accum_steps, 1), "an integer >= 1", self.accum_steps)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh axes; -1 fills with the remaining devices."""

    data: int = 1
    fsdp: int = -1
    tensor: int = 1

    def __post_init__(self):
        for f in ("data", "fsdp", "tensor"):
            v = getattr(self, f)
            _check("MeshConfig", f, isinstance(v, int) and not isinstance(v, bool) and (v >= 1 or v == -1),
                   "an integer >= 1 or -1", v)
        _check("MeshConfig", "fsdp", [self.data, self.fsdp, self.tensor].count(-1) <= 1,
               "at most one axis set to -1", (self.data, self.fsdp, self.tensor))


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    model: ModelConfig = dataclasses.field(default_factory=lambda: ModelConfig(max_seq_len=256))  # = get("t6-tiny")
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
    mesh: MeshConfig = MeshConfig()
    run_dir: str = "runs/t6-tiny"
    steps: int = 600
    batch_size: int = 16  # global batch (sequences per optimizer update, across all micro-steps)
    seed: int = 0
    log_every: int = 10
    eval_every: int = 200
    eval_batches: int = 8
    save_every: int = 200
    keep: int = 3  # keep the last N checkpoints
    keep_every: Optional[int] = None  # additionally keep every K-th step
    nan_policy: str = "stop"  # "stop": raise on a non-finite loss; "skip": drop that update
    profile_steps: Optional[tuple] = None  # (start, stop) step range for a jax.profiler trace
    sample_tokens: int = 160  # greedy sample length printed at the end (0: none)
    sample_prompt: str = "def "
    # resuming with a changed model / data / seed / batch_size: "refuse" (one-line error) or "allow" (logged)
    resume_changes: str = "refuse"
    peak_flops: Optional[float] = None  # FLOP/s per device for MFU (default: the chip's bf16 peak; none on CPU)

    def __post_init__(self):
        if isinstance(self.model, Mapping):
            object.__setattr__(self, "model", ModelConfig.from_dict(self.model))
        _check("TrainConfig", "model", isinstance(self.model, ModelConfig),
               "a ModelConfig or a dict of its fields (named configs: tpa_jax.configs.get)", self.model)
        for f, sub in (("data", DataConfig), ("optim", OptimConfig), ("mesh", MeshConfig)):
            v = getattr(self, f)
            if isinstance(v, Mapping):
                object.__setattr__(self, f, _from_dict(sub, v))
        for f, lo in (("steps", 1), ("batch_size", 1), ("log_every", 1), ("eval_every", 1), ("eval_batches", 1),
                      ("save_every", 1), ("keep", 1), ("seed", 0), ("sample_tokens", 0)):
            _check("TrainConfig", f, _int_ge(getattr(self, f), lo), f"an integer >= {lo}", getattr(self, f))
        _check("TrainConfig", "seed", self.seed < 2**32, "an integer in [0, 2**32 - 1]", self.seed)
        _check("TrainConfig", "keep_every", self.keep_every is None or _int_ge(self.keep_every, 1),
               "None or an integer >= 1", self.keep_every)
        for f in ("run_dir", "sample_prompt"):
            _check("TrainConfig", f, isinstance(getattr(self, f), str), "a string", getattr(self, f))
        _check("TrainConfig", "batch_size", self.batch_size % self.optim.accum_steps == 0,
               f"a multiple of optim.accum_steps={self.optim.accum_steps}", self.batch_size)
        _check("TrainConfig", "nan_policy", self.nan_policy in ("stop", "skip"), "'stop' or 'skip'", self.nan_policy)
        _check("TrainConfig", "resume_changes", self.resume_changes in ("refuse", "allow"), "'refuse' or 'allow'",
               self.resume_changes)
        _check("TrainConfig", "peak_flops", self.peak_flops is None or (_num(self.peak_flops) and self.peak_flops > 0),
               "None or a finite number > 0", self.peak_flops)
        _check("TrainConfig", "data.seq_len", self.data.seq_len <= self.model.max_seq_len,
               f"<= the model's max_seq_len={self.model.max_seq_len}", self.data.seq_len)
        if self.profile_steps is not None:
            ps = self.profile_steps
            _check("TrainConfig", "profile_steps", isinstance(ps, (list, tuple)) and len(ps) == 2
                   and all(_int_ge(v, 0) for v in ps) and ps[0] < ps[1], "None or [start, stop], 0 <= start < stop", ps)
            object.__setattr__(self, "profile_steps", tuple(ps))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TrainConfig":
        return _from_dict(cls, d)
