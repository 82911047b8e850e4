"""The embedded default corpus: the running interpreter's standard-library Python sources.

It exists on every machine with Python, so demos and tests train on real text without a network.

What is in it: every ``*.py`` file under ``sysconfig.get_paths()["stdlib"]``, walked without
following symlinks, sorted by relative POSIX path, except
  - installed packages: any ``site-packages`` / ``dist-packages`` directory;
  - the test suites: directories named ``test``, ``tests`` or ``idle_test`` (``Lib/test`` alone
    is larger than the rest of the library and much of it is generated or deliberately odd;
    leaving it out keeps preparation fast and the corpus "library code");
  - build-specific files: ``_sysconfigdata_*.py`` and ``config-*`` directories (they describe how
    this particular interpreter was compiled, so they differ between otherwise identical installs);
  - ``__pycache__`` directories.
``idlelib`` (apart from ``idle_test``), ``encodings``, ``tkinter``, ``lib2to3`` etc. are kept.
Files are read as bytes and decoded as UTF-8 with ``errors="replace"`` (a handful of stdlib files
are Latin-1). CPython 3.11 gives about 730 files / 12 MB.

Split: a file goes to ``val`` when the first 8 bytes of ``sha256(relative_path)``, read as an
integer, fall below ``val_fraction`` of 2**64 (2 % by default). This depends only on the path,
not on the file's contents, Python's salted ``hash`` or the order of the directory walk, so it
is the same on every machine and run. If no file falls below the threshold the file with the
smallest hash goes to ``val``, so ``val`` is never empty (and ``train`` never is either).
"""
from __future__ import annotations

import hashlib
import os
import sys
import sysconfig
from typing import Iterator, Optional

__all__ = ["stdlib_dir", "list_files", "split_files", "iter_documents", "fingerprint", "path_hash",
           "EXCLUDED_DIRS", "VAL_FRACTION"]

VAL_FRACTION = 0.02
EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})


def stdlib_dir() -> str:
    """The running interpreter's standard-library directory."""
    return sysconfig.get_paths()["stdlib"]


def _excluded_dir(name: str) -> bool:
    return name in EXCLUDED_DIRS or name.startswith("config-") or name.startswith(".")


def list_files(root: Optional[str] = None) -> list[str]:
    """Relative POSIX paths of the corpus' ``*.py`` files, sorted."""
    root = root or stdlib_dir()
    if not os.path.isdir(root):
        raise FileNotFoundError(f"embedded corpus: standard-library directory not found: {root}")
    out = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = [d for d in dirnames if not _excluded_dir(d)]
        for f in filenames:
            if f.endswith(".py") and not f.startswith("_sysconfigdata"):
                full = os.path.join(dirpath, f)
                if os.path.isfile(full):
                    out.append(os.path.relpath(full, root).replace(os.sep, "/"))
    out.sort()
    return out


def path_hash(rel_path: str) -> int:
    """Stable 64-bit hash of a relative path (sha256, not Python's salted ``hash``)."""
    return int.from_bytes(hashlib.sha256(rel_path.encode("utf-8")).digest()[:8], "big")


def split_files(files: list[str], val_fraction: float = VAL_FRACTION) -> dict[str, list[str]]:
    """Deterministic train/val split by path hash; ``val`` non-empty when there are >= 2 files."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    threshold = int(val_fraction * 2 ** 64)
    hashes = {f: path_hash(f) for f in files}
    val = [f for f in files if hashes[f] < threshold]
    if not val and val_fraction > 0 and len(files) >= 2:
        val = [min(files, key=lambda f: (hashes[f], f))]
    val_set = set(val)
    train = [f for f in files if f not in val_set]
    return {"train": sorted(train), "val": sorted(val)}


def read_text(root: str, rel_path: str) -> str:
    """A corpus file as text (UTF-8, invalid bytes replaced)."""
    with open(os.path.join(root, rel_path), "rb") as fh:
        return fh.read().decode("utf-8", errors="replace")


def iter_documents(split: str, root: Optional[str] = None, val_fraction: float = VAL_FRACTION,
                   files: Optional[list[str]] = None) -> Iterator[tuple[str, str]]:
    """(relative path, text) of the split's files, in sorted path order."""
    root = root or stdlib_dir()
    files = list_files(root) if files is None else files
    parts = split_files(files, val_fraction)
    if split not in parts:
        raise ValueError(f"embedded corpus: unknown split {split!r} (expected 'train' or 'val')")
    for rel in parts[split]:
        yield rel, read_text(root, rel)


def fingerprint(root: Optional[str] = None, files: Optional[list[str]] = None) -> str:
    """Short hash over (path, size) of the corpus files: changes when the stdlib changes."""
    root = root or stdlib_dir()
    files = list_files(root) if files is None else files
    h = hashlib.sha256()
    for rel in files:
        h.update(rel.encode("utf-8"))
        h.update(b"\0%d\0" % os.path.getsize(os.path.join(root, rel)))
    return h.hexdigest()[:16]


def python_tag() -> str:
    """``py<major><minor>`` of the running interpreter (part of the cache directory name)."""
    return f"py{sys.version_info.major}{sys.version_info.minor}"
