"""The Grain input pipeline (tpa_jax.data.pipeline): windows over shards, shuffled and resumable
iterators, per-process shares of the global batch, the deterministic eval pass, global arrays."""
import json

import numpy as np
import pytest

from tpa_jax.data import TokenWindows, eval_batches, load_manifest, make_iterator, read_split, to_global
from _data_util import one_line


def test_token_windows_match_concatenated_tokens(small):
    m = load_manifest(small["manifest"])
    full = read_split(m, "train").astype(np.int32)
    T = 37
    w = TokenWindows(m, "train", T)
    assert len(w) == (len(full) - 1) // T
    bounds = np.cumsum([f["tokens"] for f in m["splits"]["train"]["files"]])[:-1]
    crossing = [i for i in range(len(w)) if any(i * T < b < i * T + T + 1 for b in bounds)]
    assert crossing  # some windows span two shards
    for i in [0, 1, len(w) // 2, len(w) - 1] + crossing:
        x = w[i]
        assert x.dtype == np.int32 and x.shape == (T + 1,)
        assert np.array_equal(x, full[i * T: i * T + T + 1])
    with pytest.raises(IndexError):
        w[len(w)]


def _windows_index(m, split, T):
    w = TokenWindows(m, split, T)
    table = {w[i].tobytes(): i for i in range(len(w))}
    assert len(table) == len(w)  # random text: windows are unique, so rows identify windows
    return table


def _row_ids(batch, table):
    full = np.concatenate([batch["inputs"][:, :1], batch["targets"]], axis=1).astype(np.int32)
    return [table[r.tobytes()] for r in full]


def test_iterator_batches_are_shifted_windows(small):
    m = load_manifest(small["manifest"])
    T, B = 16, 8
    it = make_iterator(m, "train", T, B, seed=0)
    table = _windows_index(m, "train", T)
    for _ in range(3):
        b = next(it)
        assert set(b) == {"inputs", "targets"}
        assert b["inputs"].shape == b["targets"].shape == (B, T)
        assert b["inputs"].dtype == b["targets"].dtype == np.int32
        assert np.array_equal(b["inputs"][:, 1:], b["targets"][:, :-1])
        assert len(set(_row_ids(b, table))) == B
    unshuffled = next(make_iterator(m, "train", T, B, seed=0, shuffle=False))
    assert _row_ids(unshuffled, table) == list(range(B))


def _take(it, n):
    return [next(it) for _ in range(n)]


def _same(a, b):
    return len(a) == len(b) and all(np.array_equal(x["inputs"], y["inputs"]) and
                                    np.array_equal(x["targets"], y["targets"]) for x, y in zip(a, b))


def test_iterator_seeds(small):
    m = load_manifest(small["manifest"])
    a = _take(make_iterator(m, "train", 16, 8, seed=1), 4)
    b = _take(make_iterator(m, "train", 16, 8, seed=1, num_threads=0, prefetch=0), 4)
    c = _take(make_iterator(m, "train", 16, 8, seed=2), 4)
    assert _same(a, b)
    assert not _same(a, c)


def test_iterator_epochs_are_reshuffled_permutations(small):
    m = load_manifest(small["manifest"])
    T, B = 256, 4
    table = _windows_index(m, "train", T)
    n = len(table)
    rows = [i for b in make_iterator(m, "train", T, B, seed=4, num_epochs=2) for i in _row_ids(b, table)]
    assert len(rows) == 2 * n // B * B  # whole global batches only
    assert sorted(rows[:n]) == list(range(n))  # epoch 1: every window once
    second = rows[n:]
    assert len(set(second)) == len(second) >= n - B  # epoch 2: no repeats, only the tail dropped
    assert rows[:len(second)] != second  # a new order every epoch
    assert rows[:n] != list(range(n))


def test_iterator_state_restores_exact_next_batches(small):
    m = load_manifest(small["manifest"])
    T, B, k = 256, 8, 7
    n_windows = len(TokenWindows(m, "train", T))
    assert k * B < n_windows < (k + 6) * B  # the resumed batches cross an epoch boundary
    it = make_iterator(m, "train", T, B, seed=3)
    _take(it, k)
    state = it.get_state()
    json.dumps(state)  # checkpointable as JSON
    expected = _take(it, 6)
    fresh = make_iterator(m, "train", T, B, seed=3)
    fresh.set_state(state)
    assert _same(_take(fresh, 6), expected)
    # and a restored iterator is not just replaying from the start
    assert not _same(_take(make_iterator(m, "train", T, B, seed=3), 6), expected)


def test_two_processes_split_the_global_batch(small):
    m = load_manifest(small["manifest"])
    T, B = 16, 6
    table = _windows_index(m, "train", T)
    one = [_row_ids(b, table) for b in make_iterator(m, "train", T, B, seed=5, num_epochs=1)]
    p0 = [_row_ids(b, table) for b in make_iterator(m, "train", T, B, seed=5, process_index=0, process_count=2,
                                                    num_epochs=1)]
    p1 = [_row_ids(b, table) for b in make_iterator(m, "train", T, B, seed=5, process_index=1, process_count=2,
                                                    num_epochs=1)]
    assert len(one) == len(table) // B and len(p0) == len(p1) == len(one)
    assert all(len(r) == B // 2 for r in p0 + p1)
    seen0 = {i for r in p0 for i in r}
    seen1 = {i for r in p1 for i in r}
    assert not seen0 & seen1
    assert seen0 | seen1 == {i for r in one for i in r}
    for k in range(len(one)):  # batch k of the two processes together = batch k of one process
        assert sorted(p0[k] + p1[k]) == sorted(one[k])
    with pytest.raises(ValueError) as e:
        make_iterator(m, "train", T, 7, seed=0, process_count=2)
    assert "global_batch 7" in one_line(e)


def test_eval_batches_deterministic(small):
    m = load_manifest(small["manifest"])
    T, B = 16, 4
    table = _windows_index(m, "val", T)
    batches = list(eval_batches(m, T, B))
    assert len(batches) == len(table) // B
    assert [i for b in batches for i in _row_ids(b, table)] == list(range(len(batches) * B))
    assert _same(list(eval_batches(m, T, B, max_batches=2)), batches[:2])
    halves = [list(eval_batches(m, T, B, process_index=p, process_count=2)) for p in (0, 1)]
    for k, b in enumerate(batches):
        assert sorted(_row_ids(halves[0][k], table) + _row_ids(halves[1][k], table)) == _row_ids(b, table)


def test_to_global(small):
    import jax
    from jax.sharding import AxisType, PartitionSpec as P
    m = load_manifest(small["manifest"])
    batch = next(make_iterator(m, "train", 16, 8, seed=0))
    mesh = jax.make_mesh((len(jax.devices()),), ("data",), axis_types=(AxisType.Auto,))
    g = to_global(batch, mesh, P("data"))
    assert set(g) == {"inputs", "targets"}
    assert g["inputs"].shape == (8, 16) and g["inputs"].dtype == np.int32
    assert g["inputs"].sharding.spec == P("data")
    assert np.array_equal(np.asarray(g["targets"]), batch["targets"])
    g2 = to_global(batch, mesh)  # default: tpa_jax.parallel.batch_sharding
    assert g2["inputs"].sharding.spec == P("data")
    assert np.array_equal(np.asarray(g2["inputs"]), batch["inputs"])
