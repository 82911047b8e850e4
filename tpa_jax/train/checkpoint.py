"""Orbax checkpoints: state (params, optimizer, step) + JSON metadata (config, data-iterator state,
tokenizer manifest).  Restores onto an abstract target carrying the *current* shardings, so a run
saved on one mesh resumes on another.  A latest checkpoint that fails to restore is skipped with a
warning (never deleted) and the previous one is used.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """No usable checkpoint where one was expected."""


def manager(ckpt_dir: str, keep: int = 3, keep_every: Optional[int] = None, async_save: bool = True,
            read_only: bool = False) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, keep_period=keep_every, create=not read_only,
                                           enable_async_checkpointing=async_save, read_only=read_only)
    return ocp.CheckpointManager(os.path.abspath(ckpt_dir), options=options)


def save(mngr: ocp.CheckpointManager, step: int, state, meta: dict, force: bool = False) -> bool:
    return mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
                     force=force)


def abstract_like(tree):
    """ShapeDtypeStructs carrying each leaf's sharding: the restore target."""
    return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def restore_meta(mngr: ocp.CheckpointManager, step: int) -> dict:
    return mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]


def restore_latest(mngr: ocp.CheckpointManager, abstract_state, step: Optional[int] = None) -> tuple[int, Any, dict]:
    """(step, state, meta) of the newest checkpoint that restores (or of ``step``).

    Raises CheckpointError when none does.  Broken ones are reported and left on disk.
    """
    steps = sorted(mngr.all_steps(), reverse=True)
    if step is not None:
        if step not in steps:
            raise CheckpointError(f"checkpoint step {step} not found in {mngr.directory} (have {sorted(steps)})")
        steps = [step]
    errors = []
    for s in steps:
        try:
            out = mngr.restore(s, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                                          meta=ocp.args.JsonRestore()))
            if errors:
                log.warning("resuming from step %d; newer checkpoint(s) could not be restored and were kept "
                            "on disk: %s", s, "; ".join(errors))
            return s, out["state"], out["meta"]
        except Exception as e:  # a partial / corrupt step directory
            msg = f"step {s}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            log.warning("checkpoint %s could not be restored (%s); trying an older one", s, msg)
            errors.append(msg)
    raise CheckpointError(f"no restorable checkpoint in {mngr.directory}: " + ("; ".join(errors) or "none saved"))
