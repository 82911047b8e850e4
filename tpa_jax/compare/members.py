"""The members of a comparison: the parameter-matched family of one size as TrainConfigs.

Every member of ``configs.family(size)`` gets the same TrainConfig except its model: same data
(same shuffled order, same seed), same schedule, batch, sequence length and validation split.
``build_members`` resolves the command-line options into that shared dict plus one TrainConfig per
member and the ``options`` a rerun into the same OUT must agree with; ``describe_model`` is the
accounting the table shows for a member; ``data_digests`` hashes the data a member will train and
validate on, so identical data across members can be checked.

Trailing ``key=value`` overrides go to the shared TrainConfig (JSON values, one parser:
``configs.apply_overrides`` / ``configs.parse_value``); ``model.<field>=...`` goes to every
member's ModelConfig (``configs.family``).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Iterable, Optional, Sequence

from .. import accounting, configs
from ..config import DataConfig, TrainConfig
from ..configs import apply_overrides, parse_value

__all__ = ["CompareError", "build_members", "describe_model", "data_digests", "member_name",
           "MECHANISM_ORDER", "SIZES", "TASKS"]

MECHANISM_ORDER = tuple(configs.MECHANISMS)  # t6, t6-kvonly, mha, mqa, gqa, mla
SIZES = {**configs.PAPER_SIZES, **configs.TINY_SIZES}
TASKS = ("corpus", "recall")
ALIASES = {attention: name for name, attention in configs.MECHANISMS.items()}  # "tpa" -> "t6", ...


class CompareError(ValueError):
    """Bad input or an OUT directory that cannot take this run (one-line message)."""


def one_line(e: BaseException) -> str:
    """An exception's message on one line (its type name when it has none)."""
    return " ".join(str(e).split()) or type(e).__name__


# ====================================================================== defaults and configs
def _defaults(size: str) -> dict:
    """Size-dependent defaults: the CPU families train at a higher learning rate on short windows."""
    if size in configs.TINY_SIZES:
        spec = configs.TINY_SIZES[size]
        return dict(batch=16, seq_len=min(128, spec.get("max_seq_len", 1024)), lr=3e-3)
    return dict(batch=16, seq_len=1024, lr=6e-4)  # App. H.1 peak learning rate


def member_name(mechanism: str, size: str) -> str:
    """The member's configs name and directory in OUT, e.g. ``t6-tiny``."""
    return f"{mechanism}-{size}"


def _mechanisms(names: Optional[Iterable[str]]) -> list[str]:
    if names is None:
        return list(MECHANISM_ORDER)
    out = []
    for n in names:
        m = ALIASES.get(n, n)
        if m not in configs.MECHANISMS:
            raise CompareError(f"unknown mechanism {n!r}; expected some of {list(MECHANISM_ORDER)}")
        if m not in out:
            out.append(m)
    if not out:
        raise CompareError("no mechanisms given")
    return sorted(out, key=MECHANISM_ORDER.index)


def _data_config(task: str, seq_len: int, data_path: Optional[str], recall_pairs: Optional[int],
                 recall_queries: Optional[int]) -> DataConfig:
    if task == "corpus":
        if recall_pairs is not None or recall_queries is not None:
            raise CompareError("--recall-pairs / --recall-queries apply to --task recall only")
        if data_path:
            if not os.path.exists(data_path):
                raise CompareError(f"--data-path {data_path!r} does not exist")
            return DataConfig(source="manifest", path=os.path.abspath(data_path), seq_len=seq_len)
        return DataConfig(source="embedded", seq_len=seq_len)
    if data_path:
        raise CompareError("--data-path applies to --task corpus only (the recall task is generated)")
    fields: dict = dict(source="recall", seq_len=seq_len)
    if recall_pairs is not None:
        fields["recall_pairs"] = recall_pairs
    if recall_queries is not None:
        fields["recall_queries"] = recall_queries
    try:
        return DataConfig(**fields)
    except (TypeError, ValueError) as e:  # a DataConfig without the recall source or its fields
        raise CompareError(f"the recall task is not available here: {one_line(e)}") from None


def _split_overrides(overrides: Sequence[str]) -> tuple[dict, list[str]]:
    """``model.<field>=v`` -> ModelConfig overrides for the whole family; the rest stays dotted."""
    model, rest = {}, []
    for item in overrides:
        if "=" not in item:
            raise CompareError(f"override {item!r}: expected key=value (e.g. optim.warmup_steps=10)")
        key, value = item.split("=", 1)
        key = key.strip()
        if key in ("model", "run_dir"):
            raise CompareError(f"override {key!r} is set per member by the comparison; use model.<field>=...")
        if key.startswith("model."):
            field = key[len("model."):]
            if "." in field or not field:
                raise CompareError(f"override {item!r}: expected model.<field>=value")
            model[field] = parse_value(value)
        else:
            rest.append(f"{key}={value}")
    return model, rest


def build_members(size: str = "tiny", steps: int = 1000, *, mechanisms: Optional[Iterable[str]] = None,
                  task: str = "corpus", batch: Optional[int] = None, seq_len: Optional[int] = None,
                  data_path: Optional[str] = None, seed: int = 0, lr: Optional[float] = None,
                  eval_every: Optional[int] = None, recall_pairs: Optional[int] = None,
                  recall_queries: Optional[int] = None, overrides: Sequence[str] = (),
                  out: str = ".") -> tuple[dict, dict[str, TrainConfig]]:
    """(shared options, {member name: TrainConfig}) for one comparison; CompareError on bad input.

    Every TrainConfig is the same dict with only ``model`` and ``run_dir`` (``OUT/<member>``)
    differing.  ``options`` holds what a rerun must agree with."""
    if size not in SIZES:
        raise CompareError(f"unknown size {size!r}; expected one of {list(SIZES)}")
    if task not in TASKS:
        raise CompareError(f"unknown task {task!r}; expected one of {list(TASKS)}")
    for name, v, lo in (("steps", steps, 1), ("seed", seed, 0), ("batch", batch, 1), ("seq_len", seq_len, 1),
                        ("eval_every", eval_every, 1), ("recall_pairs", recall_pairs, 1),
                        ("recall_queries", recall_queries, 1)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < lo):
            raise CompareError(f"{name} must be an integer >= {lo}, got {v!r}")
    if lr is not None and not (isinstance(lr, (int, float)) and lr > 0):
        raise CompareError(f"lr must be a number > 0, got {lr!r}")
    mechs = _mechanisms(mechanisms)
    model_overrides, rest = _split_overrides(overrides)
    d = _defaults(size)
    batch = batch if batch is not None else d["batch"]
    seq_len = seq_len if seq_len is not None else d["seq_len"]
    lr = float(lr if lr is not None else d["lr"])
    data = _data_config(task, seq_len, data_path, recall_pairs, recall_queries)
    base = dict(
        data=dataclasses.asdict(data),
        optim=dict(lr=lr, min_lr=lr / 10, warmup_steps=min(2000, steps // 20)),
        steps=steps, batch_size=batch, seed=seed,
        log_every=1,  # one record per step: training-loss curves and per-step throughput
        eval_every=eval_every if eval_every is not None else max(1, steps // 10),
        save_every=max(1, steps // 4), keep=2, sample_tokens=0,
    )
    try:
        base = apply_overrides(base, rest)
        family = configs.family(size, **model_overrides)
    except (ValueError, TypeError) as e:
        raise CompareError(one_line(e)) from None
    members = {}
    for m in mechs:
        name = member_name(m, size)
        fields = {**base, "model": family[m], "run_dir": os.path.join(os.path.abspath(out), name)}
        try:
            members[name] = TrainConfig.from_dict(fields)
        except (ValueError, TypeError) as e:
            raise CompareError(f"{name}: {one_line(e)}") from None
    shared = next(iter(members.values())).to_dict()
    shared.pop("model"), shared.pop("run_dir")
    options = {"size": size, "task": task, "model_overrides": model_overrides, "train": shared}
    return _jsonable(options), members


def _jsonable(x):
    return json.loads(json.dumps(x))


# ====================================================================== accounting
def _ranks(cfg) -> str:
    if cfg.attention == "tpa":
        return f"R_Q/R_K/R_V={cfg.q_rank}/{cfg.k_rank}/{cfg.v_rank}"
    if cfg.attention == "tpa_kvonly":
        return f"R_K/R_V={cfg.k_rank}/{cfg.v_rank}"
    if cfg.attention == "mla":
        return f"d_c={cfg.kv_lora_rank} d'_c={cfg.q_lora_rank} d^R_h={cfg.rope_head_dim}"
    return "-"


def describe_model(cfg, mha=None) -> dict:
    """Accounting of one member (per layer where it says so); ratios against ``mha`` when given."""
    row = {
        "attention": cfg.attention, "n_head": cfg.n_head, "kv_heads": cfg.kv_heads, "head_dim": cfg.head_dim,
        "heads": f"{cfg.n_head}/{cfg.kv_heads}", "ranks": _ranks(cfg),
        "attention_params": accounting.attention_params(cfg),
        "model_params": accounting.model_params(cfg),
        "kv_cache_per_token": accounting.kv_cache_per_token(cfg),
    }
    if mha is not None:
        row["attention_params_vs_mha"] = row["attention_params"] / accounting.attention_params(mha)
        row["kv_cache_vs_mha"] = row["kv_cache_per_token"] / accounting.kv_cache_per_token(mha)
    return row


# ====================================================================== data identity
def _sha(arrays) -> str:
    import numpy as np

    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(np.asarray(a, np.int64))
        h.update(str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()[:16]


def data_digests(tcfg: TrainConfig) -> dict:
    """Hashes of the first training batch and of the validation batches ``train()`` will use.

    Rebuilds the data exactly as the training loop does (same manifest, iterator, seed, global
    batch; the deterministic eval pass); identical digests across members mean identical data order
    and validation split.  ``None`` entries: this data source cannot be rebuilt outside train()."""
    from ..data import eval_batches, make_iterator, resolve_manifest

    try:
        manifest = resolve_manifest(tcfg.data)
    except (ValueError, FileNotFoundError, TypeError, KeyError, AttributeError):
        return {"first_batch": None, "val": None}
    out = {}
    it = make_iterator(manifest, "train", tcfg.data.seq_len, tcfg.batch_size, tcfg.seed, num_threads=0, prefetch=0)
    first = next(it)
    out["first_batch"] = _sha([first["inputs"], first["targets"]])
    val = list(eval_batches(manifest, tcfg.data.seq_len, tcfg.batch_size // tcfg.optim.accum_steps,
                            tcfg.eval_batches))
    out["val"] = _sha([b[k] for b in val for k in ("inputs", "targets")])
    return out
