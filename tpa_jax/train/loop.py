"""The training loop: builds the mesh and the sharded state, reads Grain batches, runs the jitted
train step, evaluates, writes metrics, saves Orbax checkpoints and resumes from them (on any mesh),
stops cleanly on SIGTERM / SIGINT, and applies the non-finite-loss policy.  A run holds its
run_dir's lock throughout, refuses a resume whose config changes the model or the data order (before
writing anything), moves an unreadable newest checkpoint to quarantine, trims ``metrics.jsonl`` back
to the restored step and never saves a non-finite state.  ``train(TrainConfig)`` is what ``train.py``
runs."""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import time
from typing import Any, Callable, Iterator, Optional, Sequence

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from .. import accounting, parallel
from ..config import ModelConfig, TrainConfig
from ..data import (Tokenizer, eval_batches, is_recall_manifest, load_tokenizer, make_iterator, tokenizer_identity,
                    tokenizer_mismatch)
from ..data.tokenizers import portable_spec
from ..inference import generate
from . import checkpoint as ckpt
from . import guard
from .metrics import MetricsWriter, peak_flops
from .optimizer import lr_schedule, make_optimizer
from .run_data import resolve_data, save_tokenizer
from .step import init_state, make_eval_step, make_recall_eval_step, make_train_step

log = logging.getLogger("tpa_jax.train")


class NonFiniteLossError(FloatingPointError):
    """The loss, gradient norm or updated params became NaN/inf (nan_policy='stop')."""


class StopFlag:
    """SIGTERM / SIGINT: finish the current step, save, exit cleanly."""

    def __init__(self) -> None:
        self.signal: Optional[int] = None
        self.active = False

    def __call__(self, signum: int, frame: Any) -> None:
        self.signal = signum
        log.warning("received signal %d: stopping after this step and saving a checkpoint", signum)

    @contextlib.contextmanager
    def installed(self) -> Iterator["StopFlag"]:
        """Handle SIGTERM / SIGINT while inside (main thread only); the old handlers come back after."""
        old = {}
        try:
            for s in (signal.SIGTERM, signal.SIGINT):
                old[s] = signal.signal(s, self)
            self.active = True
        except ValueError:  # not the main thread: no handlers
            pass
        try:
            yield self
        finally:
            for s, h in old.items():
                signal.signal(s, h)
            self.active = False


def _sample(params: Any, cfg: ModelConfig, tokenizer: Tokenizer, prompt: str, n_new: int) -> str:
    """The prompt and its greedy continuation (cached decoding), cut to fit ``max_seq_len``."""
    ids = tokenizer.encode(prompt)[-(cfg.max_seq_len - 1):] or [tokenizer.eot_id or 0]
    n_new = min(n_new, cfg.max_seq_len - len(ids))
    if n_new < 1:
        return tokenizer.decode(ids)
    out = generate(params, cfg, [ids], n_new)
    return tokenizer.decode(ids + [int(t) for t in out.tokens[0, : int(out.lengths[0])]])


def evaluate(eval_fn: Callable[[Any, dict], Any], params: Any, manifest: dict, tcfg: TrainConfig,
             batch_shard: jax.sharding.Sharding) -> dict:
    """Validation loss / perplexity; for the recall task ``eval_fn`` is ``make_recall_eval_step``'s
    (a dict with the loss and the recall counts) and the record adds ``val_recall_acc`` (per query)
    and ``val_recall_exact`` (per example)."""
    losses, counts = [], []
    for batch in eval_batches(manifest, tcfg.data.seq_len, tcfg.batch_size // tcfg.optim.accum_steps,
                              tcfg.eval_batches):
        out = eval_fn(params, jax.device_put(batch, batch_shard))
        if isinstance(out, dict):
            out = dict(out)
            losses.append(float(out.pop("loss")))
            counts.append(out)
        else:
            losses.append(float(out))
    loss = float(np.mean(losses))
    rec = {"val_loss": loss, "val_ppl": float(math.exp(min(loss, 50.0)))}
    if counts:
        c = {k: sum(int(x[k]) for x in counts) for k in counts[0]}
        rec["val_recall_acc"] = c["correct"] / max(c["total"], 1)
        rec["val_recall_exact"] = c["all_correct"] / max(c["examples"], 1)
    return rec


def train(tcfg: TrainConfig, *, devices: Optional[Sequence[jax.Device]] = None, progress: bool = True,
          stop_at_step: Optional[int] = None) -> dict:
    """Train (or resume) the run in ``tcfg.run_dir``; returns a summary dict.

    ``stop_at_step`` simulates a SIGTERM arriving during that step (used by tests).  A run_dir held
    by another live trainer raises ``guard.RunLockedError``; a resume that changes the model or the
    data raises ValueError (see ``_check_resume_config``); both before anything is written.
    """
    is_main = jax.process_index() == 0
    # ---- data and bad input, before anything is compiled
    tcfg, manifest = resolve_data(tcfg)  # vocab_size from the tokenizer when unset; the tokenizer used
    tokenizer = load_tokenizer(manifest["tokenizer"])
    tokenizer_spec = portable_spec(manifest["tokenizer"])  # what checkpoints store: loads from anywhere
    if tcfg.batch_size % jax.process_count():
        raise ValueError(f"TrainConfig.batch_size: expected a multiple of the process count "
                         f"{jax.process_count()}, got {tcfg.batch_size}")

    guard.prepare_run_dir(tcfg.run_dir)
    with guard.shared_run_lock(tcfg.run_dir):
        _check_resume_config(tcfg, manifest, is_main)
        if is_main:
            with open(os.path.join(tcfg.run_dir, "config.json"), "w") as f:
                json.dump(tcfg.to_dict(), f, indent=1)
            save_tokenizer(tcfg.run_dir, tokenizer_spec)
        return _train(tcfg, manifest, tokenizer, tokenizer_spec, devices=devices, progress=progress,
                      stop_at_step=stop_at_step)


def _check_resume_config(tcfg: TrainConfig, manifest: dict, is_main: bool) -> None:
    """Compare ``tcfg`` and the data's tokenizer with the config and tokenizer stored in the newest
    checkpoint's metadata: changes to the model, the data (its tokenizer included) or ``seed`` /
    ``batch_size`` raise ValueError (one line) unless ``resume_changes='allow'``, which logs them and
    appends them to ``resume_changes.jsonl``; other changes are logged at INFO."""
    ckpt_dir = os.path.join(tcfg.run_dir, "checkpoints")
    if not os.path.isdir(ckpt_dir):
        return
    mngr = ckpt.manager(ckpt_dir, read_only=True)
    try:
        if not mngr.all_steps():
            return
        step, meta = ckpt.restore_newest(mngr, lambda s: ckpt.restore_meta(mngr, s), what="read")
    except ckpt.CheckpointError:  # the resume itself reports unreadable checkpoints
        return
    finally:
        mngr.close()
    guarded, free = guard.resume_config_changes(meta.get("config", {}), tcfg.to_dict())
    if tcfg.data.source == "manifest":  # data.tokenizer only names it; its identity is compared below
        guarded.pop("data.tokenizer", None)
    if "tokenizer" in meta and tokenizer_mismatch(manifest["tokenizer"], meta["tokenizer"]):
        guarded["tokenizer (kind, vocab, source)"] = [list(tokenizer_identity(meta["tokenizer"])),
                                                      list(tokenizer_identity(manifest["tokenizer"]))]
    if free:
        log.info("resuming step %d with changed settings: %s", step, guard.describe_changes(free))
    if not guarded:
        return
    if tcfg.resume_changes != "allow":
        raise ValueError(f"resume with a changed config: {guard.describe_changes(guarded)}; start a new run_dir "
                         f"or set resume_changes='allow'")
    log.warning("resuming step %d with a changed model/data config (resume_changes='allow'): %s", step,
                guard.describe_changes(guarded))
    if is_main:
        with open(os.path.join(tcfg.run_dir, "resume_changes.jsonl"), "a") as f:
            f.write(json.dumps({"event": "resume_changes", "step": step, "changes": guarded}) + "\n")


def _train(tcfg: TrainConfig, manifest: dict, tokenizer: Tokenizer, tokenizer_spec: dict, *,
           devices: Optional[Sequence[jax.Device]], progress: bool, stop_at_step: Optional[int]) -> dict:
    """The body of ``train`` once the inputs are checked and the run_dir is locked."""
    cfg = tcfg.model
    is_main = jax.process_index() == 0
    # ---- mesh and sharded state
    mesh = parallel.mesh_from_config(tcfg.mesh, devices=devices)
    seq = tcfg.data.seq_len
    schedule = lr_schedule(tcfg.optim, tcfg.steps)
    tx = make_optimizer(tcfg.optim, tcfg.steps)
    state, state_sh = init_state(tcfg, mesh, tx)
    param_sh = state_sh["params"]
    replicated = NamedSharding(mesh, PartitionSpec())
    batch_sh = parallel.batch_sharding(mesh, tcfg.batch_size, seq_len=seq)
    local_batch = tcfg.batch_size // jax.process_count()

    iterator = make_iterator(manifest, "train", seq, tcfg.batch_size, tcfg.seed,
                             process_index=jax.process_index(), process_count=jax.process_count())
    mngr = ckpt.manager(os.path.join(tcfg.run_dir, "checkpoints"), tcfg.keep, tcfg.keep_every)
    step, last_good = 0, None
    if mngr.all_steps():  # an unreadable newest step is moved aside (by process 0; all processes agree on it)
        step, state, meta = ckpt.restore_latest(mngr, ckpt.abstract_like(state), quarantine=True,
                                                agree=guard.all_processes_agree if jax.process_count() > 1 else None)
        last_good = step
        iterator.set_state(meta["data_iter"])
        if is_main and guard.trim_metrics(tcfg.run_dir, step):
            log.info("dropped the metrics records past step %d from %s", step, tcfg.run_dir)
        log.info("resumed from %s at step %d", mngr.directory, step)
        if is_main:
            print(f"resumed from step {step}", flush=True)

    step_fn = jax.jit(make_train_step(tcfg, tx, schedule), in_shardings=(state_sh, batch_sh),
                      out_shardings=(state_sh, replicated), donate_argnums=0)
    eval_sh = parallel.batch_sharding(mesh, tcfg.batch_size // tcfg.optim.accum_steps, seq_len=seq)
    eval_step = make_recall_eval_step(cfg) if is_recall_manifest(manifest) else make_eval_step(cfg)
    eval_fn = jax.jit(eval_step, in_shardings=(param_sh, eval_sh), out_shardings=replicated)

    def global_batch(b):
        return {k: jax.make_array_from_process_local_data(batch_sh, np.asarray(v, np.int32)) for k, v in b.items()}

    def meta_at(s):
        return {"step": s, "config": tcfg.to_dict(), "data_iter": iterator.get_state(),
                "tokenizer": tokenizer_spec, "manifest": {k: manifest[k] for k in ("vocab_size", "dtype")
                                                                   if k in manifest}}

    writer = MetricsWriter(tcfg.run_dir, enabled=is_main)
    flops_tok = accounting.flops_per_token(cfg, seq, training=True)
    peak = tcfg.peak_flops or peak_flops()
    n_chips = mesh.devices.size
    tokens_per_step = tcfg.batch_size * seq
    pending, params_ok = [], True
    stop = StopFlag()
    summary = {"start_step": step}
    bar = None
    if progress and is_main:
        from tqdm import tqdm

        bar = tqdm(total=tcfg.steps, initial=step, desc="train", unit="step", dynamic_ncols=True)

    def flush():
        """Fetch pending per-step metrics, check them, write them."""
        nonlocal pending, params_ok
        if not pending:
            return None
        fetched = jax.device_get([m for _, m, _ in pending])
        rec = None
        for (s, _, dt), m in zip(pending, fetched):
            params_ok = bool(m["params_finite"]) or (tcfg.nan_policy == "skip")  # skip keeps the old params
            if not bool(m["finite"]) and tcfg.nan_policy == "stop":
                what = ("loss" if not np.isfinite(float(m["loss"])) else
                        "gradient norm" if not np.isfinite(float(m["grad_norm"])) else "params")
                good = (f"last good checkpoint: step {last_good} in {mngr.directory}" if last_good is not None
                        else f"no checkpoint was saved in {mngr.directory}")
                raise NonFiniteLossError(
                    f"non-finite {what} at step {s} (loss={float(m['loss'])}, grad_norm={float(m['grad_norm'])}, "
                    f"updated params finite: {bool(m['params_finite'])}); {good}")
            tps = tokens_per_step / dt if dt > 0 else None
            rec = {"step": s, "loss": float(m["loss"]), "lr": float(m["lr"]), "grad_norm": float(m["grad_norm"]),
                   "step_time": dt, "tokens_per_s": tps,
                   "mfu": (tps * flops_tok / (peak * n_chips)) if (peak and tps) else None}
            if not bool(m["finite"]):
                rec["skipped_update"] = True
            writer.write(rec)
        pending = []
        if bar is not None and rec is not None:
            bar.set_postfix(loss=f"{rec['loss']:.4f}", tok_s=f"{rec['tokens_per_s'] or 0:.0f}")
        return rec

    def save(s, force=False):
        nonlocal last_good
        flush()  # never save a non-finite state under nan_policy="stop"
        if not params_ok:
            log.warning("step %d: not saving a checkpoint of non-finite params", s)
            return
        if ckpt.save(mngr, s, state, meta_at(s), force=force):
            last_good = s

    if step == 0:  # the baseline the final validation loss is compared with
        rec = {"step": 0, **evaluate(eval_fn, state["params"], manifest, tcfg, eval_sh)}
        writer.write(rec)
        summary["initial_val_loss"] = rec["val_loss"]
        if is_main:
            print(f"step 0: val_loss {rec['val_loss']:.4f}", flush=True)
    next_batch = None
    if step < tcfg.steps:  # compile before the clock starts; timed once as compile_s
        next_batch = global_batch(next(iterator))
        t0 = time.perf_counter()
        with parallel.mesh_context(mesh):
            step_fn.lower(state, next_batch).compile()  # fills the cache that the first call hits
        compile_s = time.perf_counter() - t0
        writer.write({"step": step, "compile_s": compile_s})
        log.info("train step compiled in %.1f s", compile_s)
    # Speed is measured over windows of steps that end where the host waits for the device anyway
    # (logging, evaluation, saving, the end): the window's wall time, from the previous window's end
    # to its last step's completed outputs, divided among its steps.  Evaluation and saving happen
    # between windows, so they are never counted; dispatch is never timed alone.
    window_start, window = time.perf_counter(), []
    try:
        with stop.installed(), parallel.mesh_context(mesh):
            while step < tcfg.steps:
                if tcfg.profile_steps and step == tcfg.profile_steps[0] and is_main:
                    jax.profiler.start_trace(os.path.join(tcfg.run_dir, "profile"))
                batch, next_batch = next_batch if next_batch is not None else global_batch(next(iterator)), None
                state, metrics = step_fn(state, batch)
                step += 1
                window.append((step, metrics))
                if stop_at_step is not None and step == stop_at_step:  # a real SIGTERM to ourselves
                    signal.raise_signal(signal.SIGTERM) if stop.active else stop(signal.SIGTERM, None)
                profile_end = bool(tcfg.profile_steps) and step == tcfg.profile_steps[1] and is_main
                evaluate_now = step % tcfg.eval_every == 0 and step < tcfg.steps
                save_now = step % tcfg.save_every == 0 and step < tcfg.steps
                if (step % tcfg.log_every == 0 or step == tcfg.steps or stop.signal is not None or evaluate_now
                        or save_now or profile_end):
                    jax.block_until_ready((state, metrics))
                    now = time.perf_counter()
                    dt = (now - window_start) / len(window)
                    pending.extend((s, m, dt) for s, m in window)
                    if bar is not None:
                        bar.update(len(window))
                    window, window_start = [], now
                if profile_end:
                    jax.profiler.stop_trace()
                if step % tcfg.log_every == 0:
                    flush()
                if evaluate_now:
                    flush()
                    rec = {"step": step, **evaluate(eval_fn, state["params"], manifest, tcfg, eval_sh)}
                    writer.write(rec)
                    if bar is not None:
                        bar.write(f"step {step}: val_loss {rec['val_loss']:.4f}")
                if save_now:
                    save(step)
                if evaluate_now or save_now or profile_end:
                    window_start = time.perf_counter()
                if stop.signal is not None:
                    save(step, force=True)
                    break
            flush()
            if step >= tcfg.steps and step not in mngr.all_steps():
                save(step, force=True)
            ckpt.wait(mngr)
    finally:  # an error must not lose a save that is still being written
        ckpt.wait(mngr)
    if bar is not None:
        bar.close()
    summary.update(step=step, interrupted=stop.signal is not None, checkpoint_dir=str(mngr.directory))
    if stop.signal is None:
        final = evaluate(eval_fn, state["params"], manifest, tcfg, eval_sh)
        summary.update(final)
        if step > summary["start_step"]:  # a finished run resumed again already holds this record
            writer.write({"step": step, **final})
        if tcfg.sample_tokens:  # every process runs the (sharded) computation
            summary["sample"] = _sample(state["params"], cfg, tokenizer, tcfg.sample_prompt, tcfg.sample_tokens)
    writer.close()
    mngr.close()
    summary["state"] = state
    return summary
