"""Grain input pipeline over token shards.

``TokenWindows`` is a random-access source: item ``i`` is the int32 slice
``tokens[i*T : i*T + T + 1]`` of the split's concatenated shards (non-overlapping windows that
share one token with the next, so ``inputs = w[:-1]`` and ``targets = w[1:]``); ``len`` is
``(N - 1) // T``.

``make_iterator`` builds::

    MapDataset.source(windows).seed(seed).shuffle()   # global permutation, reshuffled every epoch
        .repeat(num_epochs)                            # None: forever
        [: whole global batches]                       # finite epochs only: every process gets the same count
        [process_index::process_count]                 # per-process slice of the global order
        .batch(global_batch // process_count, drop_remainder=True)
        .map(split into inputs / targets)
        .to_iter_dataset(ReadOptions(...))

The manifest may also be a ``recall.recall_manifest`` (synthetic associative recall): then the
source is a ``recall.RecallSource`` whose items already are {"inputs", "targets"} [T] dicts, and
the same shuffle / repeat / shard / batch chain applies (without the inputs / targets split).

Sharding by striding the *shuffled* sequence means that the union of the processes' k-th batches
is exactly the k-th batch a single process would see: the global batch does not depend on the
number of processes. The iterator is a ``grain.DatasetIterator``; its ``get_state()`` (a small
JSON-serialisable dict) / ``set_state()`` resume at the exact next batch; the training loop stores
that state in each checkpoint's metadata.
"""
from __future__ import annotations

import bisect
import os
from typing import Any, Iterator, Optional, Union

import numpy as np

from .recall import RecallSource, is_recall_manifest, recall_batches, recall_manifest
from .shards import load_manifest, split_tokens
from .sources import prepare_embedded

__all__ = ["resolve_manifest", "TokenWindows", "make_dataset", "make_iterator", "to_global", "eval_batches", "split_batch"]


def resolve_manifest(data_cfg) -> dict:
    """The manifest a ``DataConfig`` names: the embedded corpus (prepared once into the cache
    directory), prepared shards at ``path``, or the synthetic recall task (nothing on disk)."""
    if data_cfg.source == "embedded":
        return load_manifest(prepare_embedded(data_cfg.cache_dir, tokenizer=data_cfg.tokenizer))
    if data_cfg.source == "recall":
        return recall_manifest(data_cfg)
    return load_manifest(data_cfg.path)


class TokenWindows:
    """Random-access windows of ``seq_len + 1`` tokens over one split (np.memmap, opened lazily)."""

    def __init__(self, manifest: Union[str, os.PathLike, dict], split: str, seq_len: int):
        m = load_manifest(manifest)
        n = split_tokens(m, split)
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        if n < seq_len + 1:
            raise ValueError(f"split {split!r} has {n} tokens, fewer than seq_len+1 = {seq_len + 1} ({m['path']})")
        self.split, self.seq_len = split, int(seq_len)
        self.dtype = np.dtype(m["dtype"]).newbyteorder("<")
        files = m["splits"][split]["files"]
        self.paths = [os.path.join(m["root"], f["path"]) for f in files]
        self.sizes = [int(f["tokens"]) for f in files]
        self.starts = list(np.cumsum([0] + self.sizes[:-1]).tolist())
        self.num_tokens = n
        self._maps: Optional[list] = None

    def __len__(self) -> int:
        return (self.num_tokens - 1) // self.seq_len

    def _memmaps(self) -> list:
        if self._maps is None:
            self._maps = [np.memmap(p, dtype=self.dtype, mode="r", shape=(s,)) for p, s in zip(self.paths, self.sizes)]
        return self._maps

    def read(self, start: int, stop: int) -> np.ndarray:
        """int32 tokens [start, stop) of the concatenated split."""
        maps = self._memmaps()
        out = np.empty(stop - start, dtype=np.int32)
        pos, k = start, bisect.bisect_right(self.starts, start) - 1
        while pos < stop:
            off = pos - self.starts[k]
            n = min(stop - pos, self.sizes[k] - off)
            out[pos - start: pos - start + n] = maps[k][off: off + n]
            pos += n
            k += 1
        return out

    def __getitem__(self, i: int) -> np.ndarray:
        n = len(self)
        i = int(i)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"window {i} out of range for {n} windows")
        start = i * self.seq_len
        return self.read(start, start + self.seq_len + 1)

    # picklable for grain worker processes: memmaps are reopened there
    def __getstate__(self):
        d = dict(self.__dict__)
        d["_maps"] = None
        return d

    def __repr__(self) -> str:
        return f"TokenWindows(split={self.split!r}, seq_len={self.seq_len}, windows={len(self)}, tokens={self.num_tokens})"


def split_batch(windows: np.ndarray) -> dict:
    """[b, T+1] windows -> {"inputs": [b, T], "targets": [b, T]} (int32)."""
    return {"inputs": np.ascontiguousarray(windows[:, :-1]), "targets": np.ascontiguousarray(windows[:, 1:])}


def _source(manifest, split: str, seq_len: int):
    """The random-access source for ``split``: ``TokenWindows``, or a ``RecallSource``."""
    if is_recall_manifest(manifest):
        src = RecallSource.from_manifest(manifest, split)
        if src.seq_len != seq_len:
            raise ValueError(f"seq_len {seq_len} differs from the recall task's seq_len {src.seq_len}")
        return src
    return TokenWindows(manifest, split, seq_len)


def _mark_absl_flags_parsed() -> None:
    # grain 0.2.18: worker processes read absl flags and raise UnparsedFlagAccessError unless the
    # flags were parsed (programs not started through absl.app.run never parse them).
    try:
        from absl import flags
    except ImportError:
        return
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _unit(src, seq_len: int) -> str:
    return "examples" if isinstance(src, RecallSource) else f"windows of {seq_len}+1 tokens"


def make_dataset(manifest, split: str, seq_len: int, global_batch: int, seed: int, process_index: int = 0,
                 process_count: int = 1, shuffle: bool = True, num_epochs: Optional[int] = None):
    """The ``grain.MapDataset`` behind ``make_iterator`` (batches of this process)."""
    import grain

    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} must be in [0, process_count={process_count})")
    if global_batch < 1 or global_batch % process_count:
        raise ValueError(f"global_batch {global_batch} must be a positive multiple of process_count {process_count}")
    if num_epochs is not None and num_epochs < 1:
        raise ValueError(f"num_epochs must be >= 1 or None, got {num_epochs}")
    src = _source(manifest, split, seq_len)
    ds = grain.MapDataset.source(src)
    if shuffle:
        ds = ds.seed(int(seed)).shuffle()
    ds = ds.repeat(num_epochs)
    if num_epochs is not None:
        usable = len(ds) // global_batch * global_batch
        if usable == 0:
            raise ValueError(f"split {split!r} has {len(src)} {_unit(src, seq_len)} x {num_epochs} epochs, "
                             f"fewer than one global batch of {global_batch}")
        ds = ds[:usable]
    if process_count > 1:
        ds = ds[process_index::process_count]
    ds = ds.batch(global_batch // process_count, drop_remainder=True)
    return ds if isinstance(src, RecallSource) else ds.map(split_batch)


def make_iterator(manifest, split: str, seq_len: int, global_batch: int, seed: int, process_index: int = 0,
                  process_count: int = 1, shuffle: bool = True, num_epochs: Optional[int] = None, *,
                  num_threads: int = 2, prefetch: int = 4, worker_count: int = 0):
    """A ``grain.DatasetIterator`` of {"inputs", "targets"} int32 [global_batch // process_count, seq_len].

    ``num_threads`` / ``prefetch``: grain's in-process read threads and how many batches they read
    ahead (0 / 0 reads synchronously; grain's own defaults, 16 / 500, would hold 500 batches).
    ``worker_count > 0`` adds ``mp_prefetch`` worker processes (their iterator state has another
    form, so a checkpoint restores only into the same ``worker_count``); in grain 0.2.18 that needs
    absl flags marked parsed, which is done here, and the entry point under
    ``if __name__ == "__main__":``."""
    import grain

    ds = make_dataset(manifest, split, seq_len, global_batch, seed, process_index, process_count, shuffle, num_epochs)
    it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch))
    if worker_count > 0:
        _mark_absl_flags_parsed()
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
    return iter(it_ds)


def to_global(batch: Any, mesh, spec=None):
    """Process-local batch leaves -> global ``jax.Array``s sharded as ``spec`` over ``mesh``.

    ``spec``: a PartitionSpec, a NamedSharding, or None for ``tpa_jax.parallel.batch_sharding``
    (batch dimension over the data axes)."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    if isinstance(spec, NamedSharding):
        sharding = spec
    elif isinstance(spec, PartitionSpec):
        sharding = NamedSharding(mesh, spec)
    elif spec is None:
        from ..parallel import batch_sharding
        leaves = jax.tree.leaves(batch)
        global_b = int(np.shape(leaves[0])[0]) * jax.process_count() if leaves else None
        sharding = batch_sharding(mesh, global_b)
    else:
        raise TypeError(f"to_global: spec must be a PartitionSpec, NamedSharding or None, got {type(spec).__name__}")
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch)


def eval_batches(manifest, seq_len: int, batch_size: int, max_batches: Optional[int] = None, *,
                 split: str = "val", process_index: int = 0, process_count: int = 1) -> Iterator[dict]:
    """Deterministic, unshuffled pass over ``split``: windows 0, 1, 2, ... in order, in batches of
    ``batch_size`` (global; each process gets its ``[process_index::process_count]`` share). The
    last partial batch is dropped so shapes stay static; ValueError if not even one batch fits."""
    if batch_size < 1 or batch_size % process_count:
        raise ValueError(f"batch_size {batch_size} must be a positive multiple of process_count {process_count}")
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} must be in [0, process_count={process_count})")
    src = _source(manifest, split, seq_len)
    if isinstance(src, RecallSource):
        yield from recall_batches(src, batch_size, max_batches, process_index=process_index,
                                  process_count=process_count)
        return
    n_batches = len(src) // batch_size
    if n_batches == 0:
        raise ValueError(f"split {split!r} has {len(src)} windows of {seq_len}+1 tokens, fewer than batch_size {batch_size}")
    if max_batches is not None:
        n_batches = min(n_batches, int(max_batches))
    local = batch_size // process_count
    for b in range(n_batches):
        idx = range(b * batch_size + process_index, (b + 1) * batch_size, process_count)
        windows = np.stack([src[i] for i in idx])
        assert windows.shape[0] == local
        yield split_batch(windows)
