"""Guards around a run directory: the exclusive lock that keeps a second trainer off a run_dir
another live process is training (``run_lock``), the comparison of a resumed run's config with
the one its newest checkpoint was trained with (``resume_config_changes``: fields that change the
model or the data order are refused unless ``resume_changes='allow'``), and the trimming of
``metrics.jsonl`` back to the restored step so that each step is recorded once (``trim_metrics``)."""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
from typing import Any, Iterator

from ..data.writer import make_dir

LOCK_NAME = ".lock"
# fields whose change alters the model or the data order: refused on resume unless allowed
GUARDED_DATA = ("source", "path", "tokenizer", "seq_len")
GUARDED_TOP = ("seed", "batch_size")


class RunLockedError(RuntimeError):
    """Another live process holds the run directory's lock."""


def prepare_run_dir(run_dir: str) -> None:
    """Create ``run_dir`` and check it is a writable directory; else one-line ``ValueError`` naming
    it (before anything is compiled)."""
    make_dir(run_dir, "run_dir")
    if not os.access(run_dir, os.W_OK | os.X_OK):
        raise ValueError(f"run_dir {run_dir!r} is not writable")


@contextlib.contextmanager
def run_lock(run_dir: str) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``run_dir/.lock`` while inside (the kernel releases it when the
    holder dies, so a stale file never blocks); RunLockedError (one line) naming the holder."""
    path = os.path.join(run_dir, LOCK_NAME)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "an unknown process"
            raise RunLockedError(f"run_dir {run_dir} is being trained by another process ({holder}); "
                                 f"wait for it to finish or use another run_dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on host {socket.gethostname()}".encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


@contextlib.contextmanager
def shared_run_lock(run_dir: str) -> Iterator[None]:
    """``run_lock`` for a job of one or more JAX processes: process 0 alone takes the lock and the
    others wait for the outcome (a collective), so that when process 0 is refused every process
    raises RunLockedError before writing anything, instead of training without it."""
    import jax

    if jax.process_count() == 1:
        with run_lock(run_dir):
            yield
        return
    import numpy as np
    from jax.experimental import multihost_utils

    with contextlib.ExitStack() as stack:
        error = None
        if jax.process_index() == 0:
            try:
                stack.enter_context(run_lock(run_dir))
            except RunLockedError as e:
                error = e
        locked = bool(multihost_utils.broadcast_one_to_all(np.int32(error is None)))
        if error is not None:
            raise error
        if not locked:
            raise RunLockedError(f"run_dir {run_dir} is being trained by another process (process 0 of this job "
                                 f"could not take its lock); wait for it to finish or use another run_dir")
        yield


def all_processes_agree(ok: bool) -> bool:
    """A collective over the job's processes: True when ``ok`` holds on every one of them."""
    import jax

    if jax.process_count() == 1:
        return ok
    import numpy as np
    from jax.experimental import multihost_utils

    return bool(np.all(multihost_utils.process_allgather(np.int32(ok))))


def _flatten(d: Any, prefix: str = "") -> dict:
    if isinstance(d, dict):
        out = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def _guarded(field: str) -> bool:
    head, _, rest = field.partition(".")
    if head == "model":
        return True
    if head == "data":
        return rest in GUARDED_DATA or rest.startswith("recall_")
    return field in GUARDED_TOP


def resume_config_changes(saved: dict, requested: dict) -> tuple[dict, dict]:
    """``(guarded, free)``: the fields of ``requested`` that differ from ``saved`` (both
    ``TrainConfig.to_dict()`` forms), each ``{field: [saved, requested]}``; ``guarded`` holds those
    that change the model or the data order.  Fields the saved config lacks are not compared."""
    old = _flatten(saved)
    new = _flatten(json.loads(json.dumps(requested)))  # tuples as lists, as stored
    guarded, free = {}, {}
    for k, v in new.items():
        if k in old and old[k] != v:
            (guarded if _guarded(k) else free)[k] = [old[k], v]
    return guarded, free


def describe_changes(changes: dict) -> str:
    """``"model.n_layer 2 -> 4, data.seq_len 32 -> 64"``."""
    return ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in sorted(changes.items()))


def trim_metrics(run_dir: str, step: int) -> int:
    """Drop the records of ``run_dir/metrics.jsonl`` past ``step`` (atomically: temp file and
    ``os.replace``); the number dropped."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    keep = []
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:  # a torn last line from a killed writer
            continue
        if not isinstance(rec.get("step"), int) or rec["step"] <= step:
            keep.append(line if line.endswith("\n") else line + "\n")
    if len(keep) == len(lines):
        return 0
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(keep)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return len(lines) - len(keep)
