"""Token shards on disk plus a JSON manifest.

Layout of a prepared directory::

    DIR/manifest.json
    DIR/train-00000.bin, train-00001.bin, ...   raw little-endian token ids, no header
    DIR/val-00000.bin, ...

Shards hold ``uint16`` ids when every id fits (``vocab_size <= 65536``), ``uint32`` otherwise, at
most ``shard_tokens`` ids each (default 2**27, 256 MiB of uint16). A split is the concatenation of
its shards in order; windows may cross shard boundaries.

``manifest.json``::

    {"format_version": 1,
     "tokenizer": {...},            # Tokenizer.to_manifest(); load_tokenizer() reads it back
     "vocab_size": 256, "dtype": "uint16",
     "separator": {"kind": "eot" | "text", "ids": [...]},
     "source": {"id": "...", "kind": "embedded" | "files" | "hf", ...},
     "splits": {"train": {"files": [{"path": "train-00000.bin", "tokens": N0}, ...],
                          "tokens": N, "documents": D}, "val": {...}}}

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
and tokenizer makes ``prepare_*`` return at once without tokenising again.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from typing import Iterable, Iterator, Optional, Sequence, Union

import numpy as np

from . import corpus
from .tokenizers import Tokenizer, TokenizerSpec, iter_chunks, load_tokenizer, tokenizer_slug

__all__ = ["FORMAT_VERSION", "MANIFEST_NAME", "DEFAULT_SHARD_TOKENS", "token_dtype", "default_cache_dir",
           "prepare_embedded", "prepare_files", "prepare_hf", "load_manifest", "check_compatible",
           "split_tokens", "read_split"]

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
DEFAULT_SHARD_TOKENS = 1 << 27
HF_ALIASES = {
    "fineweb-edu": ("HuggingFaceFW/fineweb-edu", "sample-10BT"),
    "openwebtext": ("Skylion007/openwebtext", None),
}

PathLike = Union[str, os.PathLike]


# --------------------------------------------------------------------------------------------
# helpers

def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id (0 .. vocab_size-1) fits, else uint32."""
    if vocab_size <= 0:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    if vocab_size <= 1 << 16:
        return np.dtype(np.uint16)
    if vocab_size <= 1 << 32:
        return np.dtype(np.uint32)
    raise ValueError(f"vocab_size {vocab_size} does not fit uint32 token shards")


def default_cache_root() -> str:
    return os.environ.get("TPA_JAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "tpa_jax")


def default_cache_dir(tokenizer: TokenizerSpec = "byte") -> str:
    """``$TPA_JAX_CACHE/embedded-<tokenizer>-py<major><minor>`` (``$TPA_JAX_CACHE`` defaults to
    ``~/.cache/tpa_jax``)."""
    return os.path.join(default_cache_root(), f"embedded-{tokenizer_slug(tokenizer)}-{corpus.python_tag()}")


def _manifest_path(path_or_dir: PathLike) -> str:
    p = os.path.abspath(os.fspath(path_or_dir))
    if os.path.isdir(p) or not p.endswith(".json"):
        p = os.path.join(p, MANIFEST_NAME)
    return p


def _separator(tok: Tokenizer) -> dict:
    if tok.eot_id is not None:
        return {"kind": "eot", "ids": [int(tok.eot_id)]}
    return {"kind": "text", "text": "\n\n", "ids": [int(i) for i in tok.encode("\n\n")]}


class _ShardWriter:
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


def _existing(out_dir: str, tok: Tokenizer, source_id: str, overwrite: bool) -> Optional[str]:
    """The manifest path if ``out_dir`` already holds a valid, matching preparation."""
    mpath = _manifest_path(out_dir)
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


def _write_and_commit(out_dir: str, tok: Tokenizer, source: dict, docs: Iterable[tuple[str, str]],
                      splits: Sequence[str], shard_tokens: int, max_tokens: Optional[int] = None,
                      batch_docs: int = 256) -> str:
    """Tokenise ``(split, text)`` documents into shards and commit them with a manifest."""
    if shard_tokens <= 0:
        raise ValueError(f"shard_tokens must be positive, got {shard_tokens}")
    if max_tokens is not None and max_tokens <= 0:
        raise ValueError(f"max_tokens must be positive, got {max_tokens}")
    os.makedirs(out_dir, exist_ok=True)
    with _dir_lock(out_dir):
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
def _dir_lock(out_dir: str):
    """Exclusive lock on ``out_dir/.lock`` (POSIX flock; a no-op where fcntl is missing) so that
    concurrent prepares of one directory (several processes of a job) tokenise once."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(os.path.join(out_dir, ".lock"), "a") as fh:
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
        writers = {s: _ShardWriter(tmp, s, dtype, tok.vocab_size, shard_tokens) for s in splits}
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


def _assign_with_fallback(items: Iterable[tuple[str, str]], val_fraction: float) -> Iterator[tuple[str, str]]:
    """Streaming split (HF): (doc_id, text) -> (split, text), val when sha256(doc_id) falls below
    ``val_fraction``. So that ``val`` is never empty when ``val_fraction > 0`` (a stream's length
    is unknown), the first document is held back until the first val document has been seen, then
    goes to train right after it; if no val document comes, it becomes val."""
    threshold = int(val_fraction * 2 ** 64)
    held: Optional[str] = None
    have_val = val_fraction <= 0
    first = True
    for doc_id, text in items:
        split = "val" if corpus.path_hash(doc_id) < threshold else "train"
        if first and not have_val:
            first = False
            if split == "val":
                have_val = True
                yield split, text
            else:
                held = text
            continue
        first = False
        if split == "val" and not have_val:
            have_val = True
            yield split, text
            if held is not None:
                yield "train", held
                held = None
            continue
        yield split, text
    if held is not None:
        yield "val", held


def _check_fraction(val_fraction: float) -> None:
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")


# --------------------------------------------------------------------------------------------
# preparation entry points

def prepare_embedded(cache_dir: Optional[PathLike] = None, tokenizer: TokenizerSpec = "byte", *,
                     val_fraction: float = corpus.VAL_FRACTION, shard_tokens: int = DEFAULT_SHARD_TOKENS,
                     root: Optional[str] = None) -> str:
    """Tokenise the embedded stdlib corpus (see ``corpus``) once; returns the manifest path.

    ``cache_dir`` defaults to ``default_cache_dir(tokenizer)``. A cache built from a different
    stdlib (another patch release: the source fingerprint differs) is rebuilt in place."""
    _check_fraction(val_fraction)
    tok = load_tokenizer(tokenizer)
    out_dir = os.path.abspath(os.fspath(cache_dir)) if cache_dir is not None else default_cache_dir(tok)
    root = root or corpus.stdlib_dir()
    files = corpus.list_files(root)
    if len(files) < 2:
        raise ValueError(f"embedded corpus: {root} has {len(files)} usable *.py files, need at least 2")
    parts = corpus.split_files(files, val_fraction)
    fp = corpus.fingerprint(root, files)
    version = ".".join(map(str, sys.version_info[:3]))
    source_id = f"embedded:python-{version}:{fp}:val{val_fraction:g}"
    found = _existing(out_dir, tok, source_id, overwrite=True)
    if found:
        return found
    source = {"id": source_id, "kind": "embedded", "python": version, "stdlib": root, "fingerprint": fp,
              "val_fraction": val_fraction, "excluded_dirs": sorted(corpus.EXCLUDED_DIRS) + ["config-*"],
              "files": parts}

    def docs():
        for split in ("train", "val"):
            for rel in parts[split]:
                yield split, corpus.read_text(root, rel)

    return _write_and_commit(out_dir, tok, source, docs(), ("train", "val"), shard_tokens)


_TEXT_EXTS = (".txt", ".md", ".text")
_JSONL_EXTS = (".jsonl", ".ndjson")


def _expand_paths(paths: Sequence[PathLike]) -> list[str]:
    out = []
    for p in paths:
        p = os.fspath(p)
        if os.path.isdir(p):
            found = []
            for dirpath, dirnames, filenames in os.walk(p):
                dirnames.sort()
                for f in filenames:
                    base = f[:-3] if f.endswith(".gz") else f
                    if base.endswith(_TEXT_EXTS + _JSONL_EXTS):
                        found.append(os.path.join(dirpath, f))
            if not found:
                raise FileNotFoundError(f"no .txt / .jsonl files under directory {p}")
            out.extend(sorted(found))
        elif os.path.isfile(p):
            out.append(p)
        else:
            raise FileNotFoundError(f"input file not found: {p}")
    if not out:
        raise ValueError("prepare_files: no input files given")
    return out


def _open_text(path: str):
    if path.endswith(".gz"):
        import gzip
        return gzip.open(path, "rt", encoding="utf-8", errors="replace")
    return open(path, "r", encoding="utf-8", errors="replace")


def _iter_file_docs(files: Sequence[str], text_field: str, with_text: bool = True) -> Iterator[tuple[str, str]]:
    """(doc id, text): ``<file name>`` for a text file, ``<file name>#<line>`` for a JSONL line."""
    for path in files:
        base = os.path.basename(path)
        stem = base[:-3] if base.endswith(".gz") else base
        if stem.endswith(_JSONL_EXTS):
            with _open_text(path) as fh:
                for lineno, line in enumerate(fh, 1):
                    if not line.strip():
                        continue
                    if not with_text:
                        yield f"{base}#{lineno}", ""
                        continue
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
                    if not isinstance(rec, dict) or text_field not in rec:
                        raise ValueError(f"{path}:{lineno}: no {text_field!r} field (set text_field)")
                    text = rec[text_field]
                    if not isinstance(text, str):
                        raise ValueError(f"{path}:{lineno}: field {text_field!r} is not a string")
                    yield f"{base}#{lineno}", text
        elif with_text:
            with _open_text(path) as fh:
                yield base, fh.read()
        else:
            yield base, ""


def prepare_files(paths: Sequence[PathLike], out_dir: PathLike, tokenizer: TokenizerSpec = "byte",
                  val_fraction: float = 0.01, *, text_field: str = "text",
                  shard_tokens: int = DEFAULT_SHARD_TOKENS, max_tokens: Optional[int] = None,
                  overwrite: bool = False) -> str:
    """Tokenise local files: ``.txt`` (also ``.md``; one document per file) and ``.jsonl`` (one
    document per non-empty line, its ``text_field``), optionally gzipped; directories are searched
    recursively. Documents keep their order; one goes to ``val`` when sha256 of its id
    (``"<file name>#<line>"`` or ``"<file name>"``) falls below ``val_fraction`` (the rule of
    ``corpus.split_files``: with no such document the smallest hash goes to val, so val is never
    empty when ``val_fraction > 0``; with a single document the train split would be empty,
    which is an error)."""
    _check_fraction(val_fraction)
    tok = load_tokenizer(tokenizer)
    out_dir = os.path.abspath(os.fspath(out_dir))
    files = _expand_paths(paths)
    h = hashlib.sha256()
    for f in files:
        h.update(os.path.abspath(f).encode() + b"\0%d\0" % os.path.getsize(f))
    source_id = f"files:{h.hexdigest()[:16]}:{text_field}:val{val_fraction:g}:max{max_tokens}"
    found = _existing(out_dir, tok, source_id, overwrite)
    if found:
        return found
    source = {"id": source_id, "kind": "files", "files": [os.path.abspath(f) for f in files],
              "text_field": text_field, "val_fraction": val_fraction, "max_tokens": max_tokens}
    splits = ("train", "val") if val_fraction > 0 else ("train",)
    # pass 1: document ids only, so the split is exactly corpus.split_files' rule (hash, min-hash fallback)
    ids = [doc_id for doc_id, _ in _iter_file_docs(files, text_field, with_text=False)]
    if len(set(ids)) != len(ids):
        import collections
        dup = next(i for i, c in collections.Counter(ids).items() if c > 1)
        raise ValueError(f"prepare_files: two inputs share the document id {dup!r} (files need distinct names)")
    val_ids = set(corpus.split_files(ids, val_fraction)["val"]) if val_fraction > 0 else set()
    docs = (("val" if doc_id in val_ids else "train", text) for doc_id, text in _iter_file_docs(files, text_field))
    return _write_and_commit(out_dir, tok, source, docs, splits, shard_tokens, max_tokens)


def prepare_hf(dataset: str, out_dir: PathLike, *, name: Optional[str] = None, split: str = "train",
               tokenizer: TokenizerSpec = "gpt2", max_tokens: Optional[int] = None,
               val_fraction: float = 0.0005, text_field: str = "text",
               shard_tokens: int = DEFAULT_SHARD_TOKENS, overwrite: bool = False) -> str:
    """Stream a Hugging Face dataset and tokenise it (GPT-2 BPE by default, as the paper did).

    ``dataset``: ``"fineweb-edu"`` (= ``HuggingFaceFW/fineweb-edu``, ``name`` default
    ``"sample-10BT"``; ``"sample-100BT"`` etc. work too), ``"openwebtext"`` (=
    ``Skylion007/openwebtext``), or any hub path. ``max_tokens`` caps train + val tokens (the last
    document is cut). Needs the ``datasets`` package and network access to the Hub."""
    _check_fraction(val_fraction)
    path, default_name = HF_ALIASES.get(dataset, (dataset, None))
    name = name if name is not None else default_name
    try:
        import datasets  # noqa: F401
    except ImportError:
        raise ImportError("prepare_hf needs the Hugging Face `datasets` package (pip install datasets) "
                          "and network access to the Hub") from None
    tok = load_tokenizer(tokenizer)
    out_dir = os.path.abspath(os.fspath(out_dir))
    source_id = f"hf:{path}:{name}:{split}:{text_field}:val{val_fraction:g}:max{max_tokens}"
    found = _existing(out_dir, tok, source_id, overwrite)
    if found:
        return found
    try:
        ds = datasets.load_dataset(path, name=name, split=split, streaming=True)
    except Exception as e:
        first = str(e).splitlines()[0][:200] if str(e) else ""
        raise RuntimeError(f"could not open Hugging Face dataset {path!r} (name={name!r}, split={split!r}): "
                           f"{type(e).__name__}: {first} (no network, or a wrong name?)") from None

    def items():
        for i, rec in enumerate(ds):
            text = rec.get(text_field)
            if text is None:
                raise ValueError(f"{path}: record {i} has no {text_field!r} field (set text_field)")
            yield f"{path}/{name}/{split}#{i}", text

    source = {"id": source_id, "kind": "hf", "dataset": path, "name": name, "split": split,
              "text_field": text_field, "val_fraction": val_fraction, "max_tokens": max_tokens}
    splits = ("train", "val") if val_fraction > 0 else ("train",)
    docs = _assign_with_fallback(items(), val_fraction)
    return _write_and_commit(out_dir, tok, source, docs, splits, shard_tokens, max_tokens, batch_docs=1024)


# --------------------------------------------------------------------------------------------
# reading

def load_manifest(path_or_dir: Union[PathLike, dict]) -> dict:
    """Read and validate a manifest; returns it with ``"root"`` (its directory) added.

    FileNotFoundError: no manifest, or a shard it lists is missing.
    ValueError: corrupt JSON, unknown format, a split with zero tokens, a shard of the wrong size."""
    if isinstance(path_or_dir, dict):
        if "root" not in path_or_dir:
            raise ValueError("manifest dict has no 'root' (load it with load_manifest(path))")
        return path_or_dir
    mpath = _manifest_path(path_or_dir)
    if not os.path.isfile(mpath):
        raise FileNotFoundError(f"no token manifest at {mpath} (prepare one with python -m tpa_jax.data.prepare)")
    try:
        with open(mpath) as fh:
            m = json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"manifest {mpath} is not valid JSON ({str(e).splitlines()[0]})") from None
    if not isinstance(m, dict):
        raise ValueError(f"manifest {mpath}: expected a JSON object")
    if m.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"manifest {mpath}: format_version {m.get('format_version')!r}, expected {FORMAT_VERSION}")
    for key in ("tokenizer", "vocab_size", "dtype", "splits"):
        if key not in m:
            raise ValueError(f"manifest {mpath}: missing field {key!r}")
    try:
        itemsize = np.dtype(m["dtype"]).itemsize
    except TypeError:
        raise ValueError(f"manifest {mpath}: unknown dtype {m['dtype']!r}") from None
    if not m["splits"]:
        raise ValueError(f"manifest {mpath}: no splits")
    root = os.path.dirname(mpath)
    for name, sp in m["splits"].items():
        files = sp.get("files") or []
        total = sum(int(f.get("tokens", 0)) for f in files)
        if not files or total == 0 or int(sp.get("tokens", 0)) == 0:
            raise ValueError(f"manifest {mpath}: split {name!r} is empty (0 tokens)")
        if total != int(sp["tokens"]):
            raise ValueError(f"manifest {mpath}: split {name!r} says {sp['tokens']} tokens, its files hold {total}")
        for f in files:
            fp = os.path.join(root, f["path"])
            if not os.path.isfile(fp):
                raise FileNotFoundError(f"token shard missing: {fp} (listed in {mpath}, split {name!r})")
            size = os.path.getsize(fp)
            if size != int(f["tokens"]) * itemsize:
                raise ValueError(f"token shard {fp} has {size} bytes, the manifest expects "
                                 f"{int(f['tokens']) * itemsize} ({f['tokens']} x {m['dtype']})")
    m["root"] = root
    m["path"] = mpath
    return m


def split_tokens(manifest: Union[PathLike, dict], split: str) -> int:
    m = load_manifest(manifest)
    if split not in m["splits"]:
        raise ValueError(f"manifest {m['path']}: no split {split!r} (has {sorted(m['splits'])})")
    return int(m["splits"][split]["tokens"])


def read_split(manifest: Union[PathLike, dict], split: str) -> np.ndarray:
    """All of a split's tokens in one array (for tests and small corpora)."""
    m = load_manifest(manifest)
    split_tokens(m, split)
    parts = [np.fromfile(os.path.join(m["root"], f["path"]), dtype=np.dtype(m["dtype"]).newbyteorder("<"))
             for f in m["splits"][split]["files"]]
    return np.concatenate(parts)


def check_compatible(manifest: Union[PathLike, dict], vocab_size: int, seq_len: int, max_seq_len: int,
                     splits: Optional[Sequence[str]] = None) -> None:
    """One-line ValueError when the data cannot feed a model with this vocabulary / context."""
    m = load_manifest(manifest)
    if int(m["vocab_size"]) > int(vocab_size):
        raise ValueError(f"tokenizer {m['tokenizer'].get('name')!r} has vocab_size {m['vocab_size']} > the model's "
                         f"vocab_size {vocab_size} ({m['path']})")
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    if seq_len > max_seq_len:
        raise ValueError(f"seq_len {seq_len} exceeds the model's max_seq_len {max_seq_len}")
    for s in (splits if splits is not None else sorted(m["splits"])):
        n = split_tokens(m, s)
        if n < seq_len + 1:
            raise ValueError(f"split {s!r} has {n} tokens, fewer than seq_len+1 = {seq_len + 1} ({m['path']})")
