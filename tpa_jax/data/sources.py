"""Turning corpora into token shards: the embedded stdlib corpus, local files, Hugging Face datasets.

Each ``prepare_*`` names its source by an id (what was read, the split rule, the caps), returns at
once when the output directory already holds a valid preparation of that source with that
tokenizer, and otherwise streams ``(split, text)`` documents into ``writer.write_and_commit``.
Train / val assignment is by sha256 of a document id, never by Python's salted ``hash``:

* ``prepare_embedded``: the stdlib files of ``corpus`` split by ``corpus.split_files``;
* ``prepare_files``: ``.txt`` / ``.md`` files (one document each) and ``.jsonl`` lines, the same
  rule over ``"<file name>"`` / ``"<file name>#<line>"`` ids;
* ``prepare_hf``: a streamed dataset, whose length is unknown, split on the fly so that ``val``
  is never empty when ``val_fraction > 0``.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from typing import Iterable, Iterator, Optional, Sequence

from . import corpus
from .shards import DEFAULT_SHARD_TOKENS, PathLike, default_cache_dir
from .tokenizers import TokenizerSpec, load_tokenizer
from .writer import existing_manifest, make_dir, write_and_commit

__all__ = ["prepare_embedded", "prepare_files", "prepare_hf", "HF_ALIASES"]

HF_ALIASES = {
    "fineweb-edu": ("HuggingFaceFW/fineweb-edu", "sample-10BT"),
    "openwebtext": ("Skylion007/openwebtext", None),
}


# --------------------------------------------------------------------------------------------
# helpers

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
    """ValueError unless 0 <= val_fraction < 1."""
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
    make_dir(out_dir, "data.cache_dir")
    root = root or corpus.stdlib_dir()
    files = corpus.list_files(root)
    if len(files) < 2:
        raise ValueError(f"embedded corpus: {root} has {len(files)} usable *.py files, need at least 2")
    parts = corpus.split_files(files, val_fraction)
    fp = corpus.fingerprint(root, files)
    version = ".".join(map(str, sys.version_info[:3]))
    source_id = f"embedded:python-{version}:{fp}:val{val_fraction:g}"
    found = existing_manifest(out_dir, tok, source_id, overwrite=True)
    if found:
        return found
    source = {"id": source_id, "kind": "embedded", "python": version, "stdlib": root, "fingerprint": fp,
              "val_fraction": val_fraction, "excluded_dirs": sorted(corpus.EXCLUDED_DIRS) + ["config-*"],
              "files": parts}

    def docs():
        for split in ("train", "val"):
            for rel in parts[split]:
                yield split, corpus.read_text(root, rel)

    return write_and_commit(out_dir, tok, source, docs(), ("train", "val"), shard_tokens)


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
    found = existing_manifest(out_dir, tok, source_id, overwrite)
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
    return write_and_commit(out_dir, tok, source, docs, splits, shard_tokens, max_tokens)


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
    found = existing_manifest(out_dir, tok, source_id, overwrite)
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
    return write_and_commit(out_dir, tok, source, docs, splits, shard_tokens, max_tokens, batch_docs=1024)
