"""Token shards on disk plus a JSON manifest: the format, and reading it back.

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

``writer`` writes such a directory, ``sources`` turns corpora into one; this module validates a
manifest (``load_manifest``), reads splits (``read_split``, ``split_tokens``), checks that data
fits a model (``check_compatible``; every shard's largest id below the vocabulary: ``shard_max_id``)
and names the cache directory of the embedded corpus.
"""
from __future__ import annotations

import json
import os
from typing import Optional, Sequence, Union

import numpy as np

from . import corpus
from .tokenizers import TokenizerSpec, tokenizer_slug

__all__ = ["FORMAT_VERSION", "MANIFEST_NAME", "DEFAULT_SHARD_TOKENS", "token_dtype", "default_cache_root",
           "default_cache_dir", "manifest_path", "load_manifest", "check_compatible", "shard_max_id",
           "split_tokens", "read_split"]

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
TOKEN_STATS_NAME = "token_stats.json"  # cached largest id per shard (see shard_max_id)
DEFAULT_SHARD_TOKENS = 1 << 27

PathLike = Union[str, os.PathLike]


# --------------------------------------------------------------------------------------------
# format

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
    """``$TPA_JAX_CACHE``, else ``~/.cache/tpa_jax``."""
    return os.environ.get("TPA_JAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "tpa_jax")


def default_cache_dir(tokenizer: TokenizerSpec = "byte") -> str:
    """``$TPA_JAX_CACHE/embedded-<tokenizer>-py<major><minor>`` (``$TPA_JAX_CACHE`` defaults to
    ``~/.cache/tpa_jax``)."""
    return os.path.join(default_cache_root(), f"embedded-{tokenizer_slug(tokenizer)}-{corpus.python_tag()}")


def manifest_path(path_or_dir: PathLike) -> str:
    """The manifest file a path names: the path itself when it is a ``.json`` file, else ``DIR/manifest.json``."""
    p = os.path.abspath(os.fspath(path_or_dir))
    if os.path.isdir(p) or not p.endswith(".json"):
        p = os.path.join(p, MANIFEST_NAME)
    return p


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
    mpath = manifest_path(path_or_dir)
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
    """Tokens in ``split``; ValueError when the manifest has no such split."""
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
        for f in m["splits"][s].get("files", []):  # synthetic (recall) splits have no shards
            top = shard_max_id(m, f["path"])
            if top is not None and top >= int(vocab_size):
                raise ValueError(f"token shard {os.path.join(m['root'], f['path'])} holds id {top} >= the model's "
                                 f"vocab_size {vocab_size}")


def shard_max_id(manifest: Union[PathLike, dict], rel_path: str) -> Optional[int]:
    """The largest token id in one shard (None when it is empty): one vectorised pass over a memmap,
    cached in ``TOKEN_STATS_NAME`` next to the manifest under the shard's path, size and mtime
    (written atomically; not cached when the directory is read-only)."""
    m = load_manifest(manifest)
    fp = os.path.join(m["root"], rel_path)
    st = os.stat(fp)
    key = f"{rel_path}:{st.st_size}:{st.st_mtime_ns}"
    stats_path = os.path.join(m["root"], TOKEN_STATS_NAME)
    try:
        with open(stats_path) as fh:
            stats = json.load(fh)
        if not isinstance(stats, dict):
            stats = {}
    except (OSError, ValueError):
        stats = {}
    if isinstance(stats.get(key), int):
        return stats[key]
    if st.st_size == 0:
        return None
    top = int(np.memmap(fp, dtype=np.dtype(m["dtype"]).newbyteorder("<"), mode="r").max())
    stats = {k: v for k, v in stats.items() if not k.startswith(rel_path + ":")}
    stats[key] = top
    tmp = f"{stats_path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w") as fh:
            json.dump(stats, fh, indent=0, sort_keys=True)
        os.replace(tmp, stats_path)
    except OSError:
        try:
            os.remove(tmp)
        except OSError:
            pass
    return top
