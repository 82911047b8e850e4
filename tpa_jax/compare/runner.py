"""Running the comparison: train, resume or skip every member into OUT, then write the report.

Each member trains into ``OUT/<member>/`` through ``train()``.  Reruns are resumable: a member
whose ``OUT/<member>/result.json`` exists is not trained again; a member that was interrupted
(checkpoints, no result) resumes through ``train()``'s own resume, and its ``segments.json``
records every (re)start; the table is rebuilt from all result files in OUT, so members may also be
added by later runs with other mechanisms.  ``options.json`` records the shared settings: a rerun
whose settings differ is refused (``force`` clears OUT's comparison files first).
"""
from __future__ import annotations

import os
import shutil
import time
from typing import Callable, Iterable, Mapping, Optional, Sequence

from .. import configs
from .members import MECHANISM_ORDER, SIZES, CompareError, build_members, data_digests, describe_model, member_name
from .report import (OPTIONS_FILE, RESULT_FILE, SEGMENTS_FILE, fmt, format_table, median_tokens_per_s, read_json,
                     read_records, utc_now, write_json, write_report)

__all__ = ["run_comparison"]

# Shared settings that may differ between runs into one OUT without changing what is computed
# (device layout, cache locations, tracing).
UNCHECKED = ("mesh", "data.cache_dir", "profile_steps")


# ====================================================================== OUT directory
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
    """The member directories already in OUT (of any size)."""
    names = {member_name(m, s) for m in MECHANISM_ORDER for s in SIZES}
    return sorted(e for e in os.listdir(out) if e in names and os.path.isdir(os.path.join(out, e)))


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
    recorded = read_json(opt_path)
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
    write_json(opt_path, {"options": options, "commands": history,
                           "created": (recorded or {}).get("created", utc_now()), "updated": utc_now()})
    os.makedirs(os.path.join(out, "resolved_configs"), exist_ok=True)
    for name, tcfg in members.items():
        write_json(os.path.join(out, "resolved_configs", f"{name}.json"), tcfg.to_dict())

    family = configs.family(size, **options["model_overrides"])
    mha = family["mha"]
    pre = [{"member": n, **describe_model(t.model, mha)} for n, t in members.items()]
    tcfg0 = next(iter(members.values()))
    log(f"parameter-matched family {size!r} ({len(members)} members); task {task}; {steps} steps of "
        f"{tcfg0.batch_size} x {tcfg0.data.seq_len} tokens; OUT = {out}")
    log(f"attention params vs MHA's 4 d_model^2 = {4 * mha.d_model ** 2:,}; KV cache in numbers per token per layer")
    log(format_table(pre, with_results=False))

    trained, resumed, skipped = [], [], []
    interrupted = None
    from ..train import train
    from ..train.loop import StopFlag

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
            segments = read_json(seg_path, [])
            segments.append({"start_step": summary["start_step"], "end_step": summary["step"],
                             "interrupted": bool(summary["interrupted"]), "wall_s": wall, "at": utc_now()})
            write_json(seg_path, segments)
            if summary["start_step"] > 0 or len(segments) > 1:
                resumed.append(name)
            if summary["interrupted"]:
                interrupted = name
                log(f"[{name}] interrupted at step {summary['step']}; rerun the same command to resume")
                break
            train_recs, eval_recs = read_records(run_dir)
            initial = summary.get("initial_val_loss")
            if initial is None and 0 in eval_recs:  # resumed: the step-0 evaluation of the first segment
                initial = eval_recs[0]["val_loss"]
            result = {
                "member": name, "mechanism": name[: -len(size) - 1], "attention": tcfg.model.attention,
                "step": summary["step"], "val_loss": summary["val_loss"], "val_ppl": summary["val_ppl"],
                "initial_val_loss": initial,
                "val_recall_acc": summary.get("val_recall_acc"),
                "val_recall_exact": summary.get("val_recall_exact"),
                "tokens_per_s": median_tokens_per_s(train_recs, [s["start_step"] for s in segments]),
                "data_digests": digests, "segments": segments, "resumed": len(segments) > 1,
                "trained_at": utc_now(),
            }
            del summary
            write_json(os.path.join(run_dir, RESULT_FILE), result)
            trained.append(name)
            log(f"[{name}] val_loss {result['val_loss']:.4f}  val_ppl {result['val_ppl']:.2f}  "
                f"tokens/s {fmt(result['tokens_per_s'], ',.0f')}")

    report = write_report(out, size, options, members, command=command, interrupted=interrupted, log=log)
    report.update(trained=trained, resumed=resumed, skipped=skipped, interrupted=interrupted)
    return report
