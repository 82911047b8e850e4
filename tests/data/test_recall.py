"""Synthetic multi-query associative recall: generator, metric, pipeline, config, training."""
import dataclasses

import jax
import numpy as np
import pytest

from tpa_jax import configs
from tpa_jax.config import DataConfig, OptimConfig, TrainConfig
from tpa_jax.eval.recall import evaluate_recall
from tpa_jax.data import (RecallSource, RecallTask, check_compatible, eval_batches, make_iterator,
                          recall_accuracy, recall_manifest)
from tpa_jax.data.recall import FILLER_ID
from tpa_jax.train import train
from tpa_jax.train import checkpoint as ckpt
from tpa_jax.train.metrics import read_metrics

TASKS = [
    RecallTask(seq_len=24, pairs=4, queries=3, num_keys=10, num_values=6, seed=1),
    RecallTask(seq_len=15, pairs=4, num_keys=4, num_values=3, seed=2),  # tight: pairs and queries fill the sequence
    RecallTask(seq_len=64, pairs=8, num_keys=127, num_values=128, noise=True),
]


def _lookup_oracle(task, inputs):
    """Predict, at every position holding a key of the pairs, that key's bound value (read from the inputs)."""
    bound = {int(inputs[2 * j]): int(inputs[2 * j + 1]) for j in range(task.pairs)}
    return np.array([bound.get(int(t), FILLER_ID) for t in inputs], np.int32)


@pytest.mark.parametrize("task", TASKS, ids=["subset", "tight", "noise"])
def test_examples_well_formed(task):
    T, P, Q = task.seq_len, task.pairs, task.queries
    k0, v0 = task.key_start, task.value_start
    for i in range(40):
        ex = task.example(i)
        x, y = ex["inputs"], ex["targets"]
        assert x.dtype == y.dtype == np.int32 and x.shape == y.shape == (T,)
        assert x.min() >= 0 and x.max() < task.vocab_size <= 256
        keys, values = x[0:2 * P:2], x[1:2 * P:2]
        assert len(set(keys.tolist())) == P  # distinct keys
        assert ((keys >= k0) & (keys < v0)).all() and ((values >= v0) & (values < task.vocab_size)).all()
        bound = dict(zip(keys.tolist(), values.tolist()))
        q = np.flatnonzero(y != -1)
        assert len(q) == Q and q.min() >= 2 * P  # queries come after the pairs
        assert len(set(x[q].tolist())) == Q  # distinct queried keys
        for p in q:
            assert int(x[p]) in bound and y[p] == bound[int(x[p])]
            if p + 1 < T:
                assert x[p + 1] == y[p]  # the value follows its query key in the sequence
        assert (y[np.setdiff1d(np.arange(T), q)] == -1).all()
        if not task.noise:
            used = set(range(2 * P)) | set(q.tolist()) | set((q + 1).tolist())
            rest = np.setdiff1d(np.arange(T), sorted(used))
            assert (x[rest] == FILLER_ID).all()
        # the task is solvable from the inputs alone: a lookup table scores 1.0
        score = recall_accuracy(_lookup_oracle(task, x), y)
        assert score["acc"] == 1.0 and score["exact"] == 1.0


def test_deterministic_and_streams_differ():
    task = TASKS[0]
    a = [task.example(i) for i in range(8)]
    b = [dataclasses.replace(task).example(i) for i in reversed(range(8))][::-1]  # fresh object, other order
    for x, y in zip(a, b):
        assert all(np.array_equal(x[k], y[k]) for k in ("inputs", "targets"))
    seqs = lambda t, split: np.stack([t.example(i, split)["inputs"] for i in range(8)])
    train_s, val_s = seqs(task, "train"), seqs(task, "val")
    assert not np.array_equal(train_s, val_s)
    assert not np.array_equal(train_s, seqs(dataclasses.replace(task, seed=task.seed + 1), "train"))
    assert len({row.tobytes() for row in train_s}) == 8  # different indices, different examples
    src = RecallSource(task, "val", 5)
    assert len(src) == 5 and np.array_equal(src[-1]["inputs"], task.example(4, "val")["inputs"])
    with pytest.raises(IndexError):
        src[5]


def test_recall_accuracy_hand_made():
    y = np.array([[-1, 5, -1, 7], [6, -1, -1, 9]])
    pred = np.array([[0, 5, 3, 7], [6, 0, 0, 8]])  # 3 of 4 scored positions right; row 0 all right
    s = recall_accuracy(pred, y)
    assert s["acc"] == 0.75 and s["correct"] == 3 and s["total"] == 4
    assert s["exact"] == 0.5 and s["examples"] == 2
    # ignored positions never count, whatever is predicted there
    s2 = recall_accuracy(np.where(y == -1, 123, pred), y)
    assert s2["acc"] == 0.75 and s2["exact"] == 0.5
    # logits: argmax over the last axis
    logits = np.eye(10)[pred]
    assert recall_accuracy(logits, y)["acc"] == 0.75
    # a perfect predictor
    assert recall_accuracy(np.maximum(y, 0), y)["acc"] == 1.0 and recall_accuracy(np.maximum(y, 0), y)["exact"] == 1.0
    # one example (1-D); an example without scored positions is left out of exact-match
    assert recall_accuracy(np.array([1, 2]), np.array([-1, 2]))["exact"] == 1.0
    s3 = recall_accuracy(np.array([[1, 1], [0, 0]]), np.array([[-1, -1], [0, 1]]))
    assert s3["examples"] == 1 and s3["exact"] == 0.0 and s3["acc"] == 0.5
    assert np.isnan(recall_accuracy(np.zeros((2, 3)), -np.ones((2, 3)))["acc"])
    with pytest.raises(ValueError):
        recall_accuracy(np.zeros((2, 3)), np.zeros((2, 4)))
    # jax arrays work too
    assert float(recall_accuracy(jax.numpy.asarray(pred), jax.numpy.asarray(y))["acc"]) == 0.75


SMALL = DataConfig(source="recall", seq_len=16, recall_pairs=2, recall_keys=8, recall_values=8,
                   recall_train_examples=64, recall_val_examples=16)


def _same(a, b):
    return len(a) == len(b) and all(np.array_equal(x[k], y[k]) for x, y in zip(a, b) for k in ("inputs", "targets"))


def test_pipeline_iterator_state_and_eval():
    m = recall_manifest(SMALL)
    check_compatible(m, vocab_size=256, seq_len=16, max_seq_len=16)
    assert m["vocab_size"] == 17 and m["tokenizer"]["kind"] == "byte"
    it = make_iterator(m, "train", 16, 8, seed=3)
    first = [next(it) for _ in range(3)]
    b = first[0]
    assert b["inputs"].shape == b["targets"].shape == (8, 16) and b["inputs"].dtype == np.int32
    state = it.get_state()
    rest = [next(it) for _ in range(4)]
    fresh = make_iterator(m, "train", 16, 8, seed=3)
    fresh.set_state(state)
    assert _same([next(fresh) for _ in range(4)], rest)
    assert not _same([next(make_iterator(m, "train", 16, 8, seed=4)) for _ in range(1)], first[:1])
    # one epoch of the shuffled train split holds every example exactly once
    src = RecallSource.from_manifest(m, "train")
    table = {src[i]["inputs"].tobytes(): i for i in range(len(src))}
    seen = [table[row.tobytes()] for bb in make_iterator(m, "train", 16, 8, seed=3, num_epochs=1)
            for row in bb["inputs"]]
    assert sorted(seen) == list(range(64))
    # two processes together see the single-process batches
    p = [next(make_iterator(m, "train", 16, 8, seed=3, process_index=i, process_count=2)) for i in (0, 1)]
    assert {r.tobytes() for r in first[0]["inputs"]} == {r.tobytes() for q in p for r in q["inputs"]}
    # validation: in order, from the held-out stream
    val = list(eval_batches(m, 16, 8))
    assert len(val) == 2 and np.array_equal(val[0]["inputs"][3], src.task.example(3, "val")["inputs"])
    assert not any(row.tobytes() in table for v in val for row in v["inputs"])
    with pytest.raises(ValueError, match="seq_len"):
        next(eval_batches(m, 32, 8))


@pytest.mark.parametrize("kwargs, field", [
    (dict(seq_len=16, recall_pairs=8), "DataConfig.seq_len"),
    (dict(recall_pairs=4, recall_queries=5), "DataConfig.recall_queries"),
    (dict(recall_queries=0), "DataConfig.recall_queries"),
    (dict(recall_keys=200, recall_values=100), "DataConfig.recall_keys"),
    (dict(recall_pairs=9, recall_keys=8), "DataConfig.recall_pairs"),
    (dict(recall_pairs=0), "DataConfig.recall_pairs"),
    (dict(recall_noise="yes"), "DataConfig.recall_noise"),
    (dict(recall_val_examples=0), "DataConfig.recall_val_examples"),
])
def test_bad_config_one_line_error(kwargs, field):
    with pytest.raises(ValueError) as e:
        DataConfig(source="recall", **kwargs)
    assert str(e.value).startswith(field) and "\n" not in str(e.value)
    with pytest.raises(ValueError, match="DataConfig.source"):
        DataConfig(source="recal")
    DataConfig(source="embedded", seq_len=8)  # recall sizes only bind for source="recall"
    with pytest.raises(ValueError, match="RecallTask.seq_len"):
        RecallTask(seq_len=6, pairs=2)


# ------------------------------------------------------------------------------- training
ONE = jax.devices()[:1]  # one device: the recall path is what is tested here, not sharding (test_train)


def _model(seq_len=16, **kw):
    return configs.get("t6-tiny", compute_dtype="float32", max_seq_len=seq_len, **kw)


def _cfg(run_dir, **kw):
    fields = dict(model=_model(n_layer=1), data=SMALL, optim=OptimConfig(lr=3e-3, min_lr=3e-4, warmup_steps=1),
                  run_dir=str(run_dir), steps=4, batch_size=8, log_every=1, eval_every=2, eval_batches=2,
                  save_every=100, sample_tokens=0)
    fields.update(kw)
    return TrainConfig(**fields)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    run = tmp_path_factory.mktemp("recall_run")
    return run, train(_cfg(run), progress=False, devices=ONE)


def test_train_end_to_end(straight):
    run, out = straight
    assert out["step"] == 4 and 0.0 <= out["val_recall_acc"] <= 1.0 and 0.0 <= out["val_recall_exact"] <= 1.0
    recs = read_metrics(run)
    evals = [r for r in recs if "val_loss" in r]
    assert [r["step"] for r in evals] == [0, 2, 4] and all("val_recall_acc" in r for r in evals)
    assert sorted(r["step"] for r in recs if "loss" in r) == [1, 2, 3, 4]
    mngr = ckpt.manager(run / "checkpoints", read_only=True)
    meta = ckpt.restore_meta(mngr, 4)
    assert meta["tokenizer"]["kind"] == "byte" and meta["manifest"]["vocab_size"] == 17
    # evaluate_recall on the same held-out examples agrees with the loop's record
    params = out["state"]["params"]
    ev = evaluate_recall(_model(n_layer=1), params, SMALL, batches=2, batch_size=8)
    assert ev["acc"] == pytest.approx(out["val_recall_acc"]) and ev["total"] == 16 * SMALL.recall_pairs
    assert ev["loss"] == pytest.approx(out["val_loss"], rel=1e-5)
    assert evaluate_recall(_model(n_layer=1), params, SMALL, batches=2, batch_size=8, seed=5)["total"] == 32


def test_resume_matches_straight_run(tmp_path, straight):
    run_a, out_a = straight
    cfg = _cfg(tmp_path)
    part = train(cfg, progress=False, stop_at_step=2, devices=ONE)
    assert part["interrupted"] and part["step"] == 2
    resumed = train(cfg, progress=False, devices=ONE)
    assert resumed["start_step"] == 2 and resumed["step"] == 4
    la = {r["step"]: r["loss"] for r in read_metrics(run_a) if "loss" in r}
    lb = {r["step"]: r["loss"] for r in read_metrics(tmp_path) if "loss" in r}
    assert la == lb  # the data iterator resumed at the exact next batch
    assert resumed["val_recall_acc"] == out_a["val_recall_acc"]


@pytest.mark.slow
def test_training_beats_chance():
    """2 pairs, 8 keys / 8 values: chance is 1/8 per query (1/2 for picking one of the context
    values); 80 steps of a tiny model reach about 0.6."""
    import tempfile

    data = DataConfig(source="recall", seq_len=16, recall_pairs=2, recall_keys=8, recall_values=8)
    with tempfile.TemporaryDirectory() as d:
        out = train(TrainConfig(model=_model(), data=data, run_dir=d, steps=80, batch_size=32, eval_every=10 ** 6,
                                optim=OptimConfig(lr=1e-2, min_lr=1e-3, warmup_steps=10, weight_decay=0.0),
                                log_every=50, eval_batches=4, save_every=10 ** 6, sample_tokens=0), progress=False,
                    devices=ONE)
    print(f"recall after 80 steps: acc {out['val_recall_acc']:.3f} exact {out['val_recall_exact']:.3f}")
    assert out["val_recall_acc"] > 0.3, out["val_recall_acc"]  # > 2x chance (1/8)
