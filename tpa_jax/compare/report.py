"""The comparison's report: the files in OUT, the table and the loss curves.

OUT holds one directory per member (``OUT/<member>/``, the ``configs`` name such as ``t6-tiny``)
with the training run and, once it finished, ``result.json``; ``options.json`` (the shared
settings and the command lines); ``resolved_configs/<member>.json``; and what ``write_report``
rebuilds from every result file in OUT after each run: ``compare.json`` (one row per member, the
resolved TrainConfigs, the commands), ``compare.md`` (the table, also printed) and
``loss_curves.png`` (validation loss against training tokens, training loss faintly behind it; a
second panel with validation recall accuracy when the task has one).
"""
from __future__ import annotations

import datetime
import json
import os
from typing import Callable, Mapping, Optional, Sequence

from .. import configs
from ..config import TrainConfig
from .members import MECHANISM_ORDER, describe_model, member_name

__all__ = ["write_report", "format_table", "fmt", "read_records", "median_tokens_per_s", "read_json", "write_json", "utc_now",
           "OPTIONS_FILE", "RESULT_FILE", "SEGMENTS_FILE", "THROUGHPUT_SKIP"]

OPTIONS_FILE = "options.json"
RESULT_FILE = "result.json"
SEGMENTS_FILE = "segments.json"
THROUGHPUT_SKIP = 2  # per-step records skipped after every (re)start: compilation, warm-up


# ====================================================================== files
def read_json(path: str, default=None):
    """The JSON at ``path``; ``default`` when there is no such file."""
    if not os.path.exists(path):
        return default
    with open(path) as f:
        return json.load(f)


def write_json(path: str, obj) -> None:
    """Write ``obj`` as JSON through a temporary file and a rename."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, default=str)
        f.write("\n")
    os.replace(tmp, path)  # atomic: a result file is either complete or absent


def utc_now() -> str:
    """The current UTC time, ISO 8601 to the second."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


# ====================================================================== metrics
def read_records(run_dir: str) -> tuple[dict, dict]:
    """({step: training record}, {step: eval record}); a step logged twice (resume) keeps the last."""
    from ..train.metrics import read_metrics

    train_recs, eval_recs = {}, {}
    if not os.path.exists(os.path.join(run_dir, "metrics.jsonl")):
        return train_recs, eval_recs
    for r in read_metrics(run_dir):
        if "loss" in r:
            train_recs[r["step"]] = r
        if "val_loss" in r:
            eval_recs[r["step"]] = r
    return train_recs, eval_recs


def median_tokens_per_s(train_recs: dict, starts: Sequence[int]) -> Optional[float]:
    """Median per-step throughput, leaving out the first THROUGHPUT_SKIP steps after each (re)start."""
    import numpy as np

    skip = {s + k for s in starts for k in range(1, THROUGHPUT_SKIP + 1)}
    vals = [r["tokens_per_s"] for s, r in sorted(train_recs.items()) if r.get("tokens_per_s") and s not in skip]
    if not vals:  # too few steps to skip warm-up: use what there is
        vals = [r["tokens_per_s"] for r in train_recs.values() if r.get("tokens_per_s")]
    return float(np.median(vals)) if vals else None


# ====================================================================== table and curves
def _fmt_int(n) -> str:
    return "-" if n is None else f"{int(n):,}"


def fmt(x, spec) -> str:
    """``x`` formatted with ``spec``; "-" for None."""
    return "-" if x is None else format(x, spec)


def format_table(rows: Sequence[dict], with_results: bool = True, recall: bool = False) -> str:
    """The Markdown table of ``rows``: accounting columns, then results (``with_results``)."""
    cols = [("member", lambda r: r["member"]), ("mechanism", lambda r: r["attention"]),
            ("heads q/kv", lambda r: r["heads"]), ("ranks / latent dims", lambda r: r["ranks"]),
            ("attn params/layer", lambda r: _fmt_int(r["attention_params"])),
            ("vs MHA", lambda r: fmt(r.get("attention_params_vs_mha"), ".3f")),
            ("total params", lambda r: _fmt_int(r["model_params"])),
            ("KV cache/token/layer", lambda r: _fmt_int(r["kv_cache_per_token"])),
            ("KV vs MHA", lambda r: fmt(r.get("kv_cache_vs_mha"), ".3f"))]
    if with_results:
        cols += [("val loss", lambda r: fmt(r.get("val_loss"), ".4f")),
                 ("val ppl", lambda r: fmt(r.get("val_ppl"), ".2f")),
                 ("tokens/s", lambda r: fmt(r.get("tokens_per_s"), ",.0f"))]
        if recall:
            cols.append(("recall acc", lambda r: fmt(r.get("val_recall_acc"), ".3f")))
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


# ====================================================================== report
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
        result = read_json(os.path.join(run_dir, RESULT_FILE))
        if result is None and name not in members:
            continue
        cfg_dict = read_json(os.path.join(out, "resolved_configs", f"{name}.json"))
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
            curves[name] = read_records(run_dir)
    recall = options["task"] == "recall" or any(r.get("val_recall_acc") is not None for r in rows)
    table = format_table(rows, recall=recall)
    t = options["train"]
    tokens_per_step = t["batch_size"] * t["data"]["seq_len"]
    recorded = read_json(os.path.join(out, OPTIONS_FILE), {})
    files = {k: os.path.join(out, v) for k, v in (("json", "compare.json"), ("md", "compare.md"),
                                                   ("png", "loss_curves.png"))}
    write_json(files["json"], {
        "size": size, "task": options["task"], "options": options, "command": command,
        "commands": recorded.get("commands", []), "tokens_per_step": tokens_per_step, "rows": rows,
        "configs": resolved, "written_at": utc_now(),
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
