"""Train the parameter-matched family side by side: the paper's central comparison at small scale.

Figures 3-4 and Table 10 of the paper compare T6 with MHA, MQA, GQA and MLA (and TPA-KVonly) at
equal attention-parameter budgets, trained identically.  This module does that for one size::

    python -m tpa_jax.compare --size tiny --steps 600
    python -m tpa_jax.compare --size tiny --steps 300 --task recall --mechanisms t6 mha
    python -m tpa_jax.compare --size mini --steps 2000 --data-path data/manifest.json model.compute_dtype=float32

Every member of ``configs.family(size)`` gets the same TrainConfig except its model: same data
(same shuffled order, same seed), same schedule, batch, sequence length and validation split.  Each
trains into ``OUT/<member>/`` (``<member>`` is the configs name, e.g. ``t6-tiny``), and OUT receives

* ``compare.json``: one row per member, the resolved TrainConfigs and the command line(s),
* ``compare.md`` (the table, also printed), ``loss_curves.png`` (validation loss against training
  tokens, training loss faintly behind it),
* ``resolved_configs/<member>.json`` (each member's full TrainConfig, also ``OUT/<member>/config.json``),
* ``options.json``: the shared settings, checked on every rerun.

Reruns are resumable: a member whose ``OUT/<member>/result.json`` exists is not trained again; a
member that was interrupted (checkpoints, no result) resumes through ``train()``'s own resume; the
table is rebuilt from all result files in OUT, so members may also be added by later runs with
other ``--mechanisms``.  A rerun whose shared settings differ from the recorded ones is refused
(``--force`` clears OUT's comparison files first).

Trailing ``key=value`` arguments override TrainConfig fields (JSON values): ``optim.warmup_steps=10``,
``eval_batches=4``; ``model.<field>=...`` goes to every member's ModelConfig (``configs.family``).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import json
import os
import shlex
import shutil
import sys
import time
from typing import Callable, Iterable, Mapping, Optional, Sequence

from . import accounting, configs
from .config import DataConfig, TrainConfig
from .configs import apply_overrides, parse_value

__all__ = ["CompareError", "run_comparison", "build_members", "describe_model", "data_digests", "main",
           "MECHANISM_ORDER", "SIZES", "TASKS"]

MECHANISM_ORDER = tuple(configs.MECHANISMS)  # t6, t6-kvonly, mha, mqa, gqa, mla
SIZES = {**configs.PAPER_SIZES, **configs.TINY_SIZES}
TASKS = ("corpus", "recall")
ALIASES = {attention: name for name, attention in configs.MECHANISMS.items()}  # "tpa" -> "t6", ...

OPTIONS_FILE = "options.json"
RESULT_FILE = "result.json"
SEGMENTS_FILE = "segments.json"
THROUGHPUT_SKIP = 2  # per-step records skipped after every (re)start: compilation, warm-up

# Shared settings that may differ between runs into one OUT without changing what is computed
# (device layout, cache locations, tracing).
UNCHECKED = ("mesh", "data.cache_dir", "profile_steps")


class CompareError(ValueError):
    """Bad input or an OUT directory that cannot take this run (one-line message)."""


# ====================================================================== defaults and configs
def _defaults(size: str) -> dict:
    """Size-dependent defaults: the CPU families train at a higher learning rate on short windows."""
    if size in configs.TINY_SIZES:
        spec = configs.TINY_SIZES[size]
        return dict(batch=16, seq_len=min(128, spec.get("max_seq_len", 1024)), lr=3e-3)
    return dict(batch=16, seq_len=1024, lr=6e-4)  # App. H.1 peak learning rate


def member_name(mechanism: str, size: str) -> str:
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
        raise CompareError(f"the recall task is not available here: {_one_line(e)}") from None


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
        raise CompareError(_one_line(e)) from None
    members = {}
    for m in mechs:
        name = member_name(m, size)
        fields = {**base, "model": family[m], "run_dir": os.path.join(os.path.abspath(out), name)}
        try:
            members[name] = TrainConfig.from_dict(fields)
        except (ValueError, TypeError) as e:
            raise CompareError(f"{name}: {_one_line(e)}") from None
    shared = next(iter(members.values())).to_dict()
    shared.pop("model"), shared.pop("run_dir")
    options = {"size": size, "task": task, "model_overrides": model_overrides, "train": shared}
    return _jsonable(options), members


def _jsonable(x):
    return json.loads(json.dumps(x))


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


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
    from .data import eval_batches, make_iterator, resolve_manifest

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


# ====================================================================== metrics
def _records(run_dir: str) -> tuple[dict, dict]:
    """({step: training record}, {step: eval record}); a step logged twice (resume) keeps the last."""
    from .train.metrics import read_metrics

    train_recs, eval_recs = {}, {}
    if not os.path.exists(os.path.join(run_dir, "metrics.jsonl")):
        return train_recs, eval_recs
    for r in read_metrics(run_dir):
        if "loss" in r:
            train_recs[r["step"]] = r
        if "val_loss" in r:
            eval_recs[r["step"]] = r
    return train_recs, eval_recs


def _median_tokens_per_s(train_recs: dict, starts: Sequence[int]) -> Optional[float]:
    import numpy as np

    skip = {s + k for s in starts for k in range(1, THROUGHPUT_SKIP + 1)}
    vals = [r["tokens_per_s"] for s, r in sorted(train_recs.items()) if r.get("tokens_per_s") and s not in skip]
    if not vals:  # too few steps to skip warm-up: use what there is
        vals = [r["tokens_per_s"] for r in train_recs.values() if r.get("tokens_per_s")]
    return float(np.median(vals)) if vals else None


# ====================================================================== files
def _read_json(path: str, default=None):
    if not os.path.exists(path):
        return default
    with open(path) as f:
        return json.load(f)


def _write_json(path: str, obj) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, default=str)
        f.write("\n")
    os.replace(tmp, path)  # atomic: a result file is either complete or absent


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _diff(old, new, prefix="") -> list[str]:
    """Dotted 'key: old -> new' for every differing leaf, leaving out UNCHECKED keys."""
    if prefix in UNCHECKED:
        return []
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new)):
            out += _diff(old.get(k), new.get(k), f"{prefix}.{k}" if prefix else k)
        return out
    return [] if old == new else [f"{prefix}: {old!r} -> {new!r}"]


def _option_diff(recorded: dict, current: dict) -> list[str]:
    top = _diff({k: v for k, v in recorded.items() if k != "train"}, {k: v for k, v in current.items() if k != "train"})
    return top + _diff(recorded.get("train", {}), current.get("train", {}))


def _clear(out: str) -> None:
    """--force: remove what a comparison writes into OUT (member directories included)."""
    names = {member_name(m, s) for m in MECHANISM_ORDER for s in SIZES}
    for entry in os.listdir(out):
        p = os.path.join(out, entry)
        if entry in names and os.path.isdir(p):
            shutil.rmtree(p)
        elif entry == "resolved_configs" and os.path.isdir(p):
            shutil.rmtree(p)
        elif entry in (OPTIONS_FILE, "compare.json", "compare.md", "loss_curves.png"):
            os.remove(p)


def _member_dirs(out: str) -> list[str]:
    names = {member_name(m, s) for m in MECHANISM_ORDER for s in SIZES}
    return sorted(e for e in os.listdir(out) if e in names and os.path.isdir(os.path.join(out, e)))


# ====================================================================== table
def _fmt_int(n) -> str:
    return "-" if n is None else f"{int(n):,}"


def _fmt(x, spec) -> str:
    return "-" if x is None else format(x, spec)


def _table(rows: Sequence[dict], with_results: bool = True, recall: bool = False) -> str:
    cols = [("member", lambda r: r["member"]), ("mechanism", lambda r: r["attention"]),
            ("heads q/kv", lambda r: r["heads"]), ("ranks / latent dims", lambda r: r["ranks"]),
            ("attn params/layer", lambda r: _fmt_int(r["attention_params"])),
            ("vs MHA", lambda r: _fmt(r.get("attention_params_vs_mha"), ".3f")),
            ("total params", lambda r: _fmt_int(r["model_params"])),
            ("KV cache/token/layer", lambda r: _fmt_int(r["kv_cache_per_token"])),
            ("KV vs MHA", lambda r: _fmt(r.get("kv_cache_vs_mha"), ".3f"))]
    if with_results:
        cols += [("val loss", lambda r: _fmt(r.get("val_loss"), ".4f")),
                 ("val ppl", lambda r: _fmt(r.get("val_ppl"), ".2f")),
                 ("tokens/s", lambda r: _fmt(r.get("tokens_per_s"), ",.0f"))]
        if recall:
            cols.append(("recall acc", lambda r: _fmt(r.get("val_recall_acc"), ".3f")))
        cols.append(("status", lambda r: r.get("status", "-")))
    cells = [[h for h, _ in cols]] + [[f(r) for _, f in cols] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    right = {i for i, (h, _) in enumerate(cols) if h not in ("member", "mechanism", "ranks / latent dims", "status")}

    def line(row):
        return "| " + " | ".join(c.rjust(w) if i in right else c.ljust(w)
                                 for i, (c, w) in enumerate(zip(row, widths))) + " |"

    sep = "|" + "|".join(("-" * (w + 1) + ":") if i in right else ("-" * (w + 2))
                         for i, w in enumerate(widths)) + "|"
    return "\n".join([line(cells[0]), sep] + [line(r) for r in cells[1:]])


def _plot(out: str, curves: dict, tokens_per_step: int, path: str) -> None:
    """Validation loss (markers) and training loss (faint) against training tokens, one colour per
    member on shared axes; a second panel with validation recall accuracy when the task has one."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    recall = any("val_recall_acc" in r for _, ev in curves.values() for r in ev.values())
    fig, axes = plt.subplots(1, 2 if recall else 1, figsize=(7, 4.5), dpi=100, squeeze=False,
                             gridspec_kw={"width_ratios": [3, 2]} if recall else None)
    ax = axes[0][0]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (name, (train_recs, eval_recs)) in enumerate(curves.items()):
        c = colors[i % len(colors)]
        if train_recs:
            steps = sorted(train_recs)
            ax.plot([s * tokens_per_step for s in steps], [train_recs[s]["loss"] for s in steps], color=c,
                    alpha=0.25, linewidth=0.8)
        steps = sorted(eval_recs)
        if steps:
            ax.plot([s * tokens_per_step for s in steps], [eval_recs[s]["val_loss"] for s in steps], color=c,
                    marker="o", markersize=3, linewidth=1.6, label=name)
        acc_steps = [s for s in steps if eval_recs[s].get("val_recall_acc") is not None]
        if recall and acc_steps:
            axes[0][1].plot([s * tokens_per_step for s in acc_steps],
                            [eval_recs[s]["val_recall_acc"] for s in acc_steps], color=c, marker="o", markersize=3,
                            linewidth=1.6, label=name)
    later = [r["val_loss"] for _, ev in curves.values() for s, r in ev.items() if s > 0 and "val_loss" in r]
    if later:  # zoom past the step-0 loss so the members' final differences are readable
        lo, hi = min(later), max(later)
        ax.set_ylim(lo - 0.15 * (hi - lo) - 0.02, hi + 0.05 * (hi - lo) + 0.02)
    ax.set_xlabel("training tokens")
    ax.set_ylabel("loss (validation: markers; training: faint)")
    ax.set_title(os.path.basename(os.path.abspath(out)) or "comparison", fontsize=10)
    ax.grid(True, alpha=0.3)
    if curves:
        ax.legend(fontsize=8)
    if recall:
        axes[0][1].set_xlabel("training tokens")
        axes[0][1].set_ylabel("validation recall accuracy")
        axes[0][1].set_ylim(0, 1)
        axes[0][1].grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ====================================================================== the runner
def run_comparison(size: str = "tiny", steps: int = 1000, *, out: Optional[str] = None,
                   mechanisms: Optional[Iterable[str]] = None, task: str = "corpus", batch: Optional[int] = None,
                   seq_len: Optional[int] = None, data_path: Optional[str] = None, seed: int = 0,
                   lr: Optional[float] = None, eval_every: Optional[int] = None, recall_pairs: Optional[int] = None,
                   recall_queries: Optional[int] = None, overrides: Sequence[str] = (), force: bool = False,
                   devices=None, progress: bool = False, stop_at: Optional[Mapping[str, int]] = None,
                   command: Optional[str] = None, log: Optional[Callable[[str], None]] = print) -> dict:
    """Train (or resume, or skip) every requested member, then write the table, JSON and curves.

    ``stop_at``: {member name: step} simulates a SIGTERM during that step of that member (the run
    stops there, as a real one would).  Returns ``{"out", "rows", "interrupted", "trained",
    "resumed", "skipped", "files"}``; ``rows`` covers every member with a result in OUT plus the
    requested ones still pending.  Raises CompareError for bad input or a mismatching OUT."""
    log = log or (lambda s: None)
    out = out or os.path.join("runs", f"compare-{size}-{task}")
    options, members = build_members(size, steps, mechanisms=mechanisms, task=task, batch=batch, seq_len=seq_len,
                                     data_path=data_path, seed=seed, lr=lr, eval_every=eval_every,
                                     recall_pairs=recall_pairs, recall_queries=recall_queries,
                                     overrides=overrides, out=out)
    unknown = sorted(set(stop_at or {}) - set(members))
    if unknown:
        raise CompareError(f"stop_at names members not in this run: {unknown}")
    if os.path.exists(out) and not os.path.isdir(out):
        raise CompareError(f"--out {out!r} exists and is not a directory")
    os.makedirs(out, exist_ok=True)
    opt_path = os.path.join(out, OPTIONS_FILE)
    recorded = _read_json(opt_path)
    if force:
        _clear(out)
        recorded = None
    elif recorded is not None:
        diff = _option_diff(recorded["options"], options)
        if diff:
            shown = "; ".join(diff[:4]) + (f"; ... {len(diff) - 4} more" if len(diff) > 4 else "")
            raise CompareError(f"{out} holds a comparison with other settings ({shown}); "
                               f"use a fresh --out or --force to start over")
    elif _member_dirs(out):
        raise CompareError(f"{out} holds member directories but no {OPTIONS_FILE}; use a fresh --out or --force")
    history = (recorded or {}).get("commands", []) + ([command] if command else [])
    _write_json(opt_path, {"options": options, "commands": history,
                           "created": (recorded or {}).get("created", _now()), "updated": _now()})
    os.makedirs(os.path.join(out, "resolved_configs"), exist_ok=True)
    for name, tcfg in members.items():
        _write_json(os.path.join(out, "resolved_configs", f"{name}.json"), tcfg.to_dict())

    family = configs.family(size, **options["model_overrides"])
    mha = family["mha"]
    pre = [{"member": n, **describe_model(t.model, mha)} for n, t in members.items()]
    tcfg0 = next(iter(members.values()))
    log(f"parameter-matched family {size!r} ({len(members)} members); task {task}; {steps} steps of "
        f"{tcfg0.batch_size} x {tcfg0.data.seq_len} tokens; OUT = {out}")
    log(f"attention params vs MHA's 4 d_model^2 = {4 * mha.d_model ** 2:,}; KV cache in numbers per token per layer")
    log(_table(pre, with_results=False))

    trained, resumed, skipped = [], [], []
    interrupted = None
    from .train import train
    from .train.loop import StopFlag

    # SIGTERM / SIGINT between members: start nothing new, leave the rest for the rerun
    with StopFlag().installed() as flag:
        for name, tcfg in members.items():
            run_dir = tcfg.run_dir
            if os.path.exists(os.path.join(run_dir, RESULT_FILE)):
                skipped.append(name)
                log(f"[{name}] finished earlier: kept ({RESULT_FILE})")
                continue
            if flag.signal is not None:
                interrupted = name
                break
            digests = data_digests(tcfg)
            has_ckpt = os.path.isdir(os.path.join(run_dir, "checkpoints")) and any(
                e.isdigit() for e in os.listdir(os.path.join(run_dir, "checkpoints")))
            log(f"[{name}] {'resuming' if has_ckpt else 'training'} into {run_dir}")
            t0 = time.time()
            summary = train(tcfg, devices=devices, progress=progress,
                            stop_at_step=(stop_at or {}).get(name))
            wall = time.time() - t0
            os.makedirs(run_dir, exist_ok=True)
            seg_path = os.path.join(run_dir, SEGMENTS_FILE)
            segments = _read_json(seg_path, [])
            segments.append({"start_step": summary["start_step"], "end_step": summary["step"],
                             "interrupted": bool(summary["interrupted"]), "wall_s": wall, "at": _now()})
            _write_json(seg_path, segments)
            if summary["start_step"] > 0 or len(segments) > 1:
                resumed.append(name)
            if summary["interrupted"]:
                interrupted = name
                log(f"[{name}] interrupted at step {summary['step']}; rerun the same command to resume")
                break
            train_recs, eval_recs = _records(run_dir)
            initial = summary.get("initial_val_loss")
            if initial is None and 0 in eval_recs:  # resumed: the step-0 evaluation of the first segment
                initial = eval_recs[0]["val_loss"]
            result = {
                "member": name, "mechanism": name[: -len(size) - 1], "attention": tcfg.model.attention,
                "step": summary["step"], "val_loss": summary["val_loss"], "val_ppl": summary["val_ppl"],
                "initial_val_loss": initial,
                "val_recall_acc": summary.get("val_recall_acc"),
                "val_recall_exact": summary.get("val_recall_exact"),
                "tokens_per_s": _median_tokens_per_s(train_recs, [s["start_step"] for s in segments]),
                "data_digests": digests, "segments": segments, "resumed": len(segments) > 1,
                "trained_at": _now(),
            }
            del summary
            _write_json(os.path.join(run_dir, RESULT_FILE), result)
            trained.append(name)
            log(f"[{name}] val_loss {result['val_loss']:.4f}  val_ppl {result['val_ppl']:.2f}  "
                f"tokens/s {_fmt(result['tokens_per_s'], ',.0f')}")

    report = write_report(out, size, options, members, command=command, interrupted=interrupted, log=log)
    report.update(trained=trained, resumed=resumed, skipped=skipped, interrupted=interrupted)
    return report


def write_report(out: str, size: str, options: dict, members: Mapping[str, TrainConfig], *,
                 command: Optional[str] = None, interrupted: Optional[str] = None,
                 log: Callable[[str], None] = print) -> dict:
    """Rebuild the table from every ``result.json`` in OUT (plus pending requested members)."""
    family = configs.family(size, **options["model_overrides"])
    mha = family["mha"]
    rows, curves, resolved = [], {}, {}
    for mech in MECHANISM_ORDER:
        name = member_name(mech, size)
        run_dir = os.path.join(out, name)
        result = _read_json(os.path.join(run_dir, RESULT_FILE))
        if result is None and name not in members:
            continue
        cfg_dict = _read_json(os.path.join(out, "resolved_configs", f"{name}.json"))
        resolved[name] = cfg_dict if cfg_dict is not None else members[name].to_dict()
        row = {"member": name, "mechanism": mech, **describe_model(family[mech], mha)}
        if result is not None:
            row.update({k: result.get(k) for k in ("step", "val_loss", "val_ppl", "initial_val_loss",
                                                     "val_recall_acc", "val_recall_exact", "tokens_per_s", "data_digests",
                                                     "resumed", "trained_at")})
            row["status"] = "done"
        else:
            row["status"] = "interrupted" if name == interrupted or os.path.isdir(
                os.path.join(run_dir, "checkpoints")) else "pending"
        rows.append(row)
        if os.path.isdir(run_dir):
            curves[name] = _records(run_dir)
    recall = options["task"] == "recall" or any(r.get("val_recall_acc") is not None for r in rows)
    table = _table(rows, recall=recall)
    t = options["train"]
    tokens_per_step = t["batch_size"] * t["data"]["seq_len"]
    recorded = _read_json(os.path.join(out, OPTIONS_FILE), {})
    files = {k: os.path.join(out, v) for k, v in (("json", "compare.json"), ("md", "compare.md"),
                                                   ("png", "loss_curves.png"))}
    _write_json(files["json"], {
        "size": size, "task": options["task"], "options": options, "command": command,
        "commands": recorded.get("commands", []), "tokens_per_step": tokens_per_step, "rows": rows,
        "configs": resolved, "written_at": _now(),
    })
    header = (f"# Parameter-matched comparison: size {size}, task {options['task']}\n\n"
              f"{t['steps']} steps x {t['batch_size']} sequences x {t['data']['seq_len']} tokens, seed {t['seed']}, "
              f"lr {t['optim']['lr']:g}. Attention params are per layer as built (MLA includes its two norm gains); "
              f"the KV cache is in numbers per token per layer; ratios are against MHA. tokens/s: median of per-step records after the first {THROUGHPUT_SKIP} of each (re)start.\n")
    if command:
        header += f"\nCommand: `{command}`\n"
    with open(files["md"], "w") as f:
        f.write(header + "\n" + table + "\n")
    _plot(out, curves, tokens_per_step, files["png"])
    log(table)
    log(f"wrote {files['json']}, {files['md']}, {files['png']}")
    return {"out": out, "rows": rows, "table": table, "files": files}


# ====================================================================== command line
class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of usage + message
        self.exit(2, f"error: {message} (see --help)\n")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m tpa_jax.compare",
                description="Train the parameter-matched family of one size with identical data and schedule; "
                            "write a table (compare.md / compare.json) and loss curves (loss_curves.png).")
    p.add_argument("--size", default="tiny", help=f"one of {list(SIZES)} (default tiny)")
    p.add_argument("--steps", type=int, required=True, help="training steps per member")
    p.add_argument("--batch", type=int, default=None, help="global batch in sequences (default 16)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default 128 tiny/mini, 1024)")
    p.add_argument("--task", default="corpus", help="corpus (embedded or --data-path) or recall")
    p.add_argument("--mechanisms", nargs="+", default=None, metavar="M",
                   help=f"subset of {list(MECHANISM_ORDER)} (default: all)")
    p.add_argument("--data-path", default=None, help="token manifest (file or directory) for --task corpus")
    p.add_argument("--recall-pairs", type=int, default=None, help="key-value pairs per recall sequence")
    p.add_argument("--recall-queries", type=int, default=None, help="queries per recall sequence")
    p.add_argument("--out", default=None, help="output directory (default runs/compare-<size>-<task>)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default 3e-3 tiny/mini, 6e-4)")
    p.add_argument("--eval-every", type=int, default=None, help="validation interval in steps (default steps/10)")
    p.add_argument("--devices", type=int, default=None, help="train on the first N local devices (default: all)")
    p.add_argument("--force", action="store_true", help="clear OUT's comparison files first")
    p.add_argument("--progress", action="store_true", help="progress bars while training")
    p.add_argument("overrides", nargs="*", help="TrainConfig overrides key=value, e.g. optim.warmup_steps=10 "
                                                "eval_batches=4 model.compute_dtype=float32")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    mechanisms = args.mechanisms
    overrides = list(args.overrides)
    if mechanisms is not None:  # key=value items swallowed by --mechanisms' nargs
        overrides = [m for m in mechanisms if "=" in m] + overrides
        mechanisms = [m for m in mechanisms if "=" not in m]
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(name)s %(levelname)s %(message)s")
    command = "python -m tpa_jax.compare " + shlex.join(argv)
    from .train import NonFiniteLossError

    try:
        devices = None
        if args.devices is not None:
            import jax

            if not 1 <= args.devices <= jax.local_device_count():
                raise CompareError(f"--devices must be in [1, {jax.local_device_count()}], got {args.devices}")
            devices = jax.local_devices()[:args.devices]
        report = run_comparison(args.size, args.steps, out=args.out, mechanisms=mechanisms, task=args.task,
                                batch=args.batch, seq_len=args.seq_len, data_path=args.data_path, seed=args.seed,
                                lr=args.lr, eval_every=args.eval_every, recall_pairs=args.recall_pairs,
                                recall_queries=args.recall_queries, overrides=overrides, force=args.force,
                                devices=devices, progress=args.progress, command=command)
    except (ValueError, FileNotFoundError, NonFiniteLossError) as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 2
    if report["interrupted"]:
        print(f"interrupted during {report['interrupted']}; run the same command again to resume", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
