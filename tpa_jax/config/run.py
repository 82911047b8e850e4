"""The training run's configuration: data, optimiser, device mesh and the run itself (each
validated on construction, one-line errors naming the field)."""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

from .model import ModelConfig, _check, _from_dict, _int_ge, _num


@dataclasses.dataclass(frozen=True)
class DataConfig:
    # "embedded" (stdlib sources), "manifest" (prepared shards at `path`) or "recall" (synthetic
    # multi-query associative recall, tpa_jax.data.recall; examples are seq_len tokens long)
    source: str = "embedded"
    path: Optional[str] = None  # manifest file or directory for source="manifest"
    tokenizer: str = "byte"  # the embedded corpus's; a run's saved config names the tokenizer it used
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
    """Device mesh axes; -1 fills with the remaining devices.  ``context`` shards the sequence
    (context parallelism: see ``ModelConfig.context_impl``)."""

    data: int = 1
    fsdp: int = -1
    tensor: int = 1
    context: int = 1

    def __post_init__(self):
        sizes = {f: getattr(self, f) for f in ("data", "fsdp", "context", "tensor")}
        for f, v in sizes.items():
            _check("MeshConfig", f, isinstance(v, int) and not isinstance(v, bool) and (v >= 1 or v == -1),
                   "an integer >= 1 or -1", v)
        _check("MeshConfig", "fsdp", list(sizes.values()).count(-1) <= 1, "at most one axis set to -1",
               tuple(sizes.values()))


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    model: ModelConfig = dataclasses.field(default_factory=lambda: ModelConfig(vocab_size=None, max_seq_len=256))
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
        _check("TrainConfig", "data.seq_len", self.mesh.context < 1 or self.data.seq_len % self.mesh.context == 0,
               f"a multiple of mesh.context={self.mesh.context} (the sequence is split over it)", self.data.seq_len)
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
