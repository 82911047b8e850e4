"""Writing token shards and their manifest: atomically, once, under a directory lock.

Document boundaries: every document is followed by the tokenizer's end-of-text id when it has one
(GPT-2: 50256, as GPT-2 / nanoGPT data did), else by the encoding of ``"\\n\\n"`` (the byte
tokenizer has no spare id; a blank line is what separates files when they are concatenated, so
byte-level text stays ordinary text).

Concurrency: preparation holds an exclusive ``flock`` on ``DIR/.lock``; a second process asking
for the same preparation waits and then finds the first one's manifest.

Atomicity: shards and the manifest are written into a ``.tmp-prepare-*`` directory inside the
output directory; the shards are then renamed into place and the manifest is renamed last. The
manifest is the commit point: an interrupted prepare leaves no manifest (or the previous, still
valid one), never a manifest pointing at partial shards. A valid manifest with the same source
and tokenizer makes a preparation return at once without tokenising again (``existing_manifest``).
The format itself is described in ``shards``.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import time
from typing import Iterable, Optional, Sequence

import numpy as np

from .shards import FORMAT_VERSION, MANIFEST_NAME, load_manifest, manifest_path, token_dtype
from .tokenizers import Tokenizer, iter_chunks

__all__ = ["ShardWriter", "existing_manifest", "write_and_commit", "dir_lock"]

log = logging.getLogger(__name__)


def _separator(tok: Tokenizer) -> dict:
    """The ids written after every document: the end-of-text id, else the encoding of a blank line."""
    if tok.eot_id is not None:
        return {"kind": "eot", "ids": [int(tok.eot_id)]}
    return {"kind": "text", "text": "\n\n", "ids": [int(i) for i in tok.encode("\n\n")]}


class ShardWriter:
    """Appends token ids of one split to ``<split>-NNNNN.bin`` files of at most ``shard_tokens``."""

    def __init__(self, directory: str, split: str, dtype: np.dtype, vocab_size: int, shard_tokens: int):
        self.directory, self.split, self.dtype = directory, split, dtype
        self.vocab_size, self.shard_tokens = vocab_size, int(shard_tokens)
        self.files: list[dict] = []
        self._fh = None
        self._in_shard = 0
        self.tokens = 0
        self.documents = 0

    def _open(self):
        name = f"{self.split}-{len(self.files):05d}.bin"
        self.files.append({"path": name, "tokens": 0})
        self._fh = open(os.path.join(self.directory, name), "wb")
        self._in_shard = 0

    def write(self, ids: np.ndarray) -> None:
        ids = np.asarray(ids).reshape(-1)
        if ids.size == 0:
            return
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= self.vocab_size:
            raise ValueError(f"token id {hi if hi >= self.vocab_size else lo} is outside 0..{self.vocab_size - 1} "
                             f"(tokenizer vocab_size {self.vocab_size})")
        ids = ids.astype(self.dtype.newbyteorder("<"), copy=False)
        while ids.size:
            if self._fh is None or self._in_shard >= self.shard_tokens:
                self.close_shard()
                self._open()
            n = min(ids.size, self.shard_tokens - self._in_shard)
            self._fh.write(ids[:n].tobytes())
            self._in_shard += n
            self.files[-1]["tokens"] += n
            self.tokens += n
            ids = ids[n:]

    def close_shard(self):
        if self._fh is not None:
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._fh.close()
            self._fh = None

    def close(self) -> dict:
        self.close_shard()
        return {"files": self.files, "tokens": self.tokens, "documents": self.documents}


def make_dir(path: str, what: str) -> None:
    """Create directory ``path`` (``what`` names it in errors, e.g. "run_dir"); a path that is an
    existing file or cannot be created is a one-line ``ValueError``."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{what} {path!r} is an existing file; expected a directory")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise ValueError(f"{what} {path!r} cannot be created ({e.strerror or e})") from None


def existing_manifest(out_dir: str, tok: Tokenizer, source_id: str, overwrite: bool) -> Optional[str]:
    """The manifest path if ``out_dir`` already holds a valid, matching preparation."""
    mpath = manifest_path(out_dir)
    if not os.path.exists(mpath):
        return None
    try:
        m = load_manifest(mpath)
    except (ValueError, FileNotFoundError) as e:
        log.warning("rebuilding %s: the existing manifest is unusable (%s)", out_dir, e)
        return None
    same = m.get("tokenizer") == tok.to_manifest() and m.get("source", {}).get("id") == source_id
    if same:
        return mpath
    if overwrite:
        return None
    raise ValueError(f"{mpath} was prepared from {m.get('source', {}).get('id')!r} with tokenizer "
                     f"{m.get('tokenizer', {}).get('name')!r}, not {source_id!r} with {tok.name!r}; "
                     f"pass overwrite=True or choose another directory")


def write_and_commit(out_dir: str, tok: Tokenizer, source: dict, docs: Iterable[tuple[str, str]],
                     splits: Sequence[str], shard_tokens: int, max_tokens: Optional[int] = None,
                     batch_docs: int = 256) -> str:
    """Tokenise ``(split, text)`` documents into shards and commit them with a manifest."""
    if shard_tokens <= 0:
        raise ValueError(f"shard_tokens must be positive, got {shard_tokens}")
    if max_tokens is not None and max_tokens <= 0:
        raise ValueError(f"max_tokens must be positive, got {max_tokens}")
    os.makedirs(out_dir, exist_ok=True)
    with dir_lock(out_dir):
        # another process may have finished the same preparation while we waited for the lock
        mpath = os.path.join(out_dir, MANIFEST_NAME)
        if os.path.exists(mpath):
            try:
                m = load_manifest(mpath)
                if m.get("tokenizer") == tok.to_manifest() and m.get("source", {}).get("id") == source.get("id"):
                    return mpath
            except (ValueError, FileNotFoundError):
                pass
        return _write_and_commit_locked(out_dir, tok, source, docs, splits, shard_tokens, max_tokens, batch_docs)


@contextlib.contextmanager
def dir_lock(out_dir: str):
    """Exclusive lock on ``out_dir/.lock`` (POSIX flock; a no-op where fcntl is missing) so that
    concurrent prepares of one directory (several processes of a job) tokenise once."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    try:
        fh = open(os.path.join(out_dir, ".lock"), "a")
    except OSError as e:
        raise ValueError(f"cannot prepare token shards in {out_dir!r}: {e.strerror or e} (choose a writable "
                         f"directory, e.g. data.cache_dir=...)") from None
    with fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _write_and_commit_locked(out_dir: str, tok: Tokenizer, source: dict, docs: Iterable[tuple[str, str]],
                             splits: Sequence[str], shard_tokens: int, max_tokens: Optional[int],
                             batch_docs: int) -> str:
    dtype = token_dtype(tok.vocab_size)
    sep = _separator(tok)
    sep_ids = np.asarray(sep["ids"], dtype=np.int64)
    tmp = tempfile.mkdtemp(prefix=".tmp-prepare-", dir=out_dir)
    t0 = time.time()
    try:
        writers = {s: ShardWriter(tmp, s, dtype, tok.vocab_size, shard_tokens) for s in splits}
        total, next_log, done = 0, 10_000_000, False
        for chunk in iter_chunks(docs, batch_docs):
            encoded = tok.encode_batch([text for _, text in chunk])
            for (split, _), ids in zip(chunk, encoded):
                if split not in writers:
                    raise ValueError(f"document for unknown split {split!r} (expected one of {list(splits)})")
                ids = np.concatenate([ids, sep_ids])
                if max_tokens is not None and total + ids.size >= max_tokens:
                    ids, done = ids[: max_tokens - total], True
                writers[split].write(ids)
                writers[split].documents += 1
                total += ids.size
                if done:
                    break
            if total >= next_log:
                log.info("prepare %s: %d tokens (%.0f tokens/s)", source.get("id"), total,
                         total / max(time.time() - t0, 1e-9))
                next_log += 10_000_000
            if done:
                break
        split_meta = {s: w.close() for s, w in writers.items()}
        for s, meta in split_meta.items():
            if meta["tokens"] == 0:
                raise ValueError(f"prepare {source.get('id')}: split {s!r} received no tokens "
                                 f"(too few documents for a {s} split; pass more data or val_fraction=0)")
        manifest = {
            "format_version": FORMAT_VERSION,
            "tokenizer": tok.to_manifest(),
            "vocab_size": int(tok.vocab_size),
            "dtype": dtype.name,
            "separator": sep,
            "source": source,
            "splits": split_meta,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        with open(os.path.join(tmp, MANIFEST_NAME), "w") as fh:
            json.dump(manifest, fh, indent=1)
            fh.flush()
            os.fsync(fh.fileno())
        # commit: the old manifest goes first, the new one comes last
        mpath = os.path.join(out_dir, MANIFEST_NAME)
        old_files = set()
        if os.path.exists(mpath):
            try:
                with open(mpath) as fh:
                    old = json.load(fh)
                old_files = {f["path"] for sp in old.get("splits", {}).values() for f in sp.get("files", [])}
            except Exception:
                pass
            os.remove(mpath)
        new_files = {f["path"] for sp in split_meta.values() for f in sp["files"]}
        for name in sorted(new_files):
            os.replace(os.path.join(tmp, name), os.path.join(out_dir, name))
        for name in old_files - new_files:
            if os.path.basename(name) == name and os.path.exists(os.path.join(out_dir, name)):
                os.remove(os.path.join(out_dir, name))
        os.replace(os.path.join(tmp, MANIFEST_NAME), mpath)
        log.info("prepared %s in %.1fs: %s", out_dir, time.time() - t0,
                 {s: m["tokens"] for s, m in split_meta.items()})
        return mpath
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
