"""Orbax checkpoints of a training run: the state (params, optimizer, step) plus JSON metadata
(config, data-iterator state, tokenizer manifest).  Restores go onto an abstract target carrying
the *current* shardings, so a run saved on one mesh resumes on another; a newest checkpoint that
fails to restore is reported with a warning and the previous one is used.  Readers leave it where it
is; a resuming run moves it aside into ``quarantine/<step>-<UTC time>/`` (never deleting it) so that
it neither shadows the steps trained after the resume nor takes a place in rotation.  Each save
stores a checksum per array leaf in the metadata (``checksums``: the uint32 sum of the leaf's bit
patterns); a restore recomputes them and checks that every float leaf is finite, and a step that
fails either check is treated like one that cannot be read (``CorruptCheckpointError``).
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import tempfile
import time
from typing import Any, Callable, Iterator, Optional, TypeVar, Union

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)

_T = TypeVar("_T")


class CheckpointError(RuntimeError):
    """No usable checkpoint where one was expected."""


@contextlib.contextmanager
def quiet_native_output(grace_s: float = 0.5) -> Iterator[None]:
    """Send what is written to file descriptor 2 while inside (by any thread or native code) to a
    temporary file, and log it at DEBUG afterwards.

    Orbax and TensorStore print tracebacks of their own (and, from threads that outlive a failed
    read, "Event loop is closed" tracebacks) on failures the caller expects and reports in one
    line.  After a failure, the capture stays on for ``grace_s`` so that those late threads are
    caught too.  With ``TPA_JAX_DEBUG=1`` nothing is captured.
    """
    if os.environ.get("TPA_JAX_DEBUG") == "1":
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    failed = False
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        except BaseException:
            failed = True
            raise
        finally:
            if failed:
                time.sleep(grace_s)
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            text = tmp.read().decode(errors="replace").strip()
            if text:
                log.debug("output of the checkpoint libraries (%d lines):\n%s", text.count("\n") + 1, text)


class _LibraryErrorsToDebug(logging.Filter):
    """On the ``absl`` logger: Orbax's own ERROR records (with tracebacks, from its background save
    threads) go to this module's logger at DEBUG; the failure itself reaches the caller as one
    CheckpointSaveError line.  Not installed with ``TPA_JAX_DEBUG=1``."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR and "orbax" in record.pathname:
            log.debug("orbax: %s", record.getMessage(), exc_info=record.exc_info)
            return False
        return True


_ABSL_FILTER = _LibraryErrorsToDebug()


def manager(ckpt_dir: Union[str, os.PathLike], keep: int = 3, keep_every: Optional[int] = None,
            async_save: bool = True, read_only: bool = False) -> ocp.CheckpointManager:
    """A manager of ``ckpt_dir`` keeping the last ``keep`` steps (and every ``keep_every``-th); a
    ``read_only`` one (for readers) does not create the directory and writes nothing."""
    if read_only:
        absl_log = logging.getLogger("absl")
        level = absl_log.level
        absl_log.setLevel(logging.ERROR)  # read-only managers warn that they are read-only
        try:
            options = ocp.CheckpointManagerOptions(read_only=True, create=False)
            return ocp.CheckpointManager(os.path.abspath(ckpt_dir), options=options)
        finally:
            absl_log.setLevel(level)
    if os.environ.get("TPA_JAX_DEBUG") != "1":
        logging.getLogger("absl").addFilter(_ABSL_FILTER)  # idempotent
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, keep_period=keep_every,
                                           enable_async_checkpointing=async_save)
    return ocp.CheckpointManager(os.path.abspath(ckpt_dir), options=options)


class CorruptCheckpointError(CheckpointError):
    """A step that restores but whose arrays differ from their saved checksums or are not finite."""


def leaf_path(path: tuple) -> str:
    """``params/blocks_0/w`` for a key path of dict keys, attributes or sequence indices."""
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def _words(x: jax.Array) -> jax.Array:
    """``x``'s bit patterns as unsigned words (uint32 for 4- and 8-byte types, else uint16 / uint8)."""
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    size = x.dtype.itemsize
    word = {1: jnp.uint8, 2: jnp.uint16}.get(size, jnp.uint32)
    return jax.lax.bitcast_convert_type(x, word)


@jax.jit
def _sums_and_finite(leaves: list) -> tuple[list, list]:
    sums = [jnp.sum(_words(x).astype(jnp.uint32), dtype=jnp.uint32) for x in leaves]
    finite = [jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.inexact) else jnp.bool_(True) for x in leaves]
    return sums, finite


def checksums(tree: Any) -> tuple[dict, dict]:
    """``({leaf path: checksum}, {leaf path: all finite})`` of ``tree``'s array leaves: per leaf, the
    sum modulo 2**32 of its bit patterns viewed as unsigned words (one jitted reduction over the
    whole tree, sharded or not, fetched once)."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    flat = [(leaf_path(p), jnp.asarray(x)) for p, x in flat]
    if not flat:
        return {}, {}
    groups: dict = {}  # one call per set of devices (normally the whole state lies on one mesh)
    for i, (_, x) in enumerate(flat):
        groups.setdefault(frozenset(d.id for d in x.sharding.device_set), []).append(i)
    outs = jax.device_get([_sums_and_finite([flat[i][1] for i in idx]) for idx in groups.values()])
    sums, finite = {}, {}
    for idx, (s, f) in zip(groups.values(), outs):
        for i, v, ok in zip(idx, s, f):
            sums[flat[i][0]], finite[flat[i][0]] = int(v), bool(ok)
    names = [n for n, _ in flat]
    return {n: sums[n] for n in names}, {n: finite[n] for n in names}


def verify(step: int, tree: Any, meta: dict) -> None:
    """Raise CorruptCheckpointError (one line naming ``step`` and the first bad leaf) when a leaf of
    ``tree`` is not finite or differs from ``meta["checksums"]`` (leaves absent there are skipped;
    metadata without checksums, from older runs, is checked for finiteness only)."""
    sums, finite = checksums(tree)
    saved = meta.get("checksums") if isinstance(meta, dict) else None
    if saved is None:
        log.debug("checkpoint %s has no checksums (an older save): checking finiteness only", step)
    for name, value in sums.items():
        if saved is not None and name in saved and int(saved[name]) != value:
            raise CorruptCheckpointError(f"checkpoint step {step}: leaf {name} differs from its saved checksum "
                                         f"({value} != {int(saved[name])})")
        if not finite[name]:
            raise CorruptCheckpointError(f"checkpoint step {step}: leaf {name} holds non-finite values")


class CheckpointSaveError(CheckpointError):
    """Writing a checkpoint failed (a full disk, a read-only directory...); the steps saved before are kept."""


def _save_failure(mngr: ocp.CheckpointManager, step: Optional[int], e: Exception) -> CheckpointSaveError:
    msg = " ".join(str(e).split())
    os_error = re.search(r":\s*([^:]+?)\s*\[os_error_code='?(\d+)'?\]", msg)
    reason = f"{os_error.group(1)} (errno {os_error.group(2)})" if os_error else f"{type(e).__name__}: {msg[:300]}"
    what = "a checkpoint" if step is None else f"checkpoint step {step} (or an earlier one still being written)"
    return CheckpointSaveError(f"saving {what} in {mngr.directory} failed: {reason}; the checkpoints saved before "
                               f"are kept ({sorted(mngr.all_steps()) or 'none'})")


def save(mngr: ocp.CheckpointManager, step: int, state: Any, meta: dict, force: bool = False) -> bool:
    """Save ``state`` (arrays) and ``meta`` (JSON, plus the state's ``checksums``) as ``step``;
    False when the manager's policy skips it.  A failure (this one, or an earlier asynchronous save's)
    raises CheckpointSaveError (one line)."""
    if not force and not mngr.should_save(step):
        return False
    meta = {**meta, "checksums": checksums(state)[0]}
    try:
        return mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                       meta=ocp.args.JsonSave(meta)), force=force)
    except Exception as e:
        raise _save_failure(mngr, step, e) from e


def wait(mngr: ocp.CheckpointManager) -> None:
    """Wait for the asynchronous saves in flight; a failed one raises CheckpointSaveError (one line)."""
    try:
        mngr.wait_until_finished()
    except Exception as e:
        raise _save_failure(mngr, None, e) from e


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs carrying each leaf's sharding: the restore target."""
    return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def restore_meta(mngr: ocp.CheckpointManager, step: int) -> dict:
    """The JSON metadata of ``step`` (no arrays are read)."""
    return mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]


QUARANTINE = "quarantine"


def quarantine_step(mngr: ocp.CheckpointManager, step: int) -> str:
    """Move ``step``'s directory to ``quarantine/<step>-<UTC time>/`` beside the steps (a rename);
    the new path.  The caller reloads the manager."""
    src = os.path.join(str(mngr.directory), str(step))
    if not os.path.isdir(src):
        raise CheckpointError(f"checkpoint step {step}: expected its directory at {src}")
    qdir = os.path.join(str(mngr.directory), QUARANTINE)
    os.makedirs(qdir, exist_ok=True)
    base = dst = os.path.join(qdir, f"{step}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}")
    n = 1
    while os.path.exists(dst):
        dst, n = f"{base}~{n}", n + 1
    os.rename(src, dst)
    return dst


def restore_newest(mngr: ocp.CheckpointManager, restore: Callable[[int], _T], step: Optional[int] = None,
                   what: str = "restored", quarantine: bool = False,
                   agree: Optional[Callable[[bool], bool]] = None) -> tuple[int, _T]:
    """``(step, restore(step))`` for the newest step whose ``restore`` succeeds (or for ``step``).

    Steps that fail are reported and left on disk, or with ``quarantine`` moved aside
    (``quarantine_step``, then the manager is reloaded) once an older step has restored, so that
    a failure common to every step (a target that does not fit) moves nothing; CheckpointError
    (one line) when none works or ``step`` does not exist.  In a job of several processes,
    ``agree(ok)`` (a collective: did every process succeed?) makes them judge each step together;
    process 0 alone moves steps aside while the others wait for it.
    """
    steps = sorted(mngr.all_steps(), reverse=True)
    if step is not None:
        if step not in steps:
            raise CheckpointError(f"checkpoint step {step} not found in {mngr.directory} (have {sorted(steps)})")
        steps = [step]
    errors, failed = [], []
    for s in steps:
        error: Optional[Exception] = None
        try:
            with quiet_native_output():
                out = restore(s)
        except Exception as e:  # a partial / corrupt step directory
            error = e
        if agree is not None and not agree(error is None) and error is None:
            error = CheckpointError("another process of this job could not read it")
        if error is not None:
            first = str(error).strip().splitlines()[0] if str(error).strip() else ""
            errors.append(f"step {s}: {type(error).__name__}: {first}"[:300])
            log.debug("checkpoint %s in %s could not be %s (%s); trying an older one", s, mngr.directory, what,
                      errors[-1])
            failed.append(s)
            continue
        where = "kept on disk"
        if quarantine and failed:  # only once an older step restores: a mismatch failing every step moves nothing
            if agree is None or jax.process_index() == 0:
                where = "moved aside to " + ", ".join(quarantine_step(mngr, f) for f in failed)
            else:
                where = "moved aside by process 0"
            if agree is not None:
                agree(True)  # the others wait here until process 0 has moved them
            mngr.reload()
        if errors:
            log.warning("using step %d of %s; newer checkpoint(s) could not be %s and were %s: %s", s,
                        mngr.directory, what, where, "; ".join(errors))
        return s, out
    raise CheckpointError(f"no readable checkpoint in {mngr.directory}: " + ("; ".join(errors) or "none saved"))


def restore_latest(mngr: ocp.CheckpointManager, abstract_state: Any, step: Optional[int] = None,
                   quarantine: bool = False, agree: Optional[Callable[[bool], bool]] = None) -> tuple[int, Any, dict]:
    """(step, state, meta) of the newest checkpoint that restores (or of ``step``).

    Raises CheckpointError when none does.  Broken ones are reported and left on disk, or moved
    to quarantine with ``quarantine`` (``agree``: see ``restore_newest``).
    """
    def restore(s: int) -> Any:
        out = mngr.restore(s, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                                      meta=ocp.args.JsonRestore()))
        verify(s, out["state"], out["meta"])
        return out

    s, out = restore_newest(mngr, restore, step, quarantine=quarantine, agree=agree)
    return s, out["state"], out["meta"]
