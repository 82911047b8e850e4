"""Training system: loss falls, resume equivalence through SIGTERM, accumulation, meshes, faults."""
import dataclasses
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from tpa_jax import configs
from tpa_jax.config import DataConfig, MeshConfig, OptimConfig, TrainConfig, load_train_config
from tpa_jax.data import prepare_files
from tpa_jax.train import CheckpointError, NonFiniteLossError, train
from tpa_jax.train import checkpoint as ckpt
from tpa_jax.train.metrics import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A small text corpus (real Python source from this project) as byte-token shards."""
    d = tmp_path_factory.mktemp("corpus")
    src = d / "src"
    src.mkdir()
    for dp, _, fs in os.walk(os.path.join(ROOT, "tpa_jax")):
        for f in fs:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(dp, f), ROOT).replace(os.sep, "_")
                (src / (rel + ".txt")).write_text(open(os.path.join(dp, f)).read())
    return prepare_files(sorted(str(p) for p in src.iterdir()), d / "shards", "byte", val_fraction=0.2)


def make_cfg(run_dir, manifest, **kw):
    model = kw.pop("model", configs.get("t6-tiny", compute_dtype="float32", max_seq_len=64))
    fields = dict(model=model, data=DataConfig(source="manifest", path=str(manifest), seq_len=32),
                  optim=OptimConfig(lr=3e-3, min_lr=3e-4, warmup_steps=2), run_dir=str(run_dir), steps=8,
                  batch_size=8, log_every=1, eval_every=1000, eval_batches=2, save_every=4, sample_tokens=0)
    fields.update(kw)
    return TrainConfig(**fields)


def losses(run_dir):
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


def params_of(summary):
    return jax.tree_util.tree_map(np.asarray, summary["state"]["params"])


def test_loss_falls(tmp_path, corpus):
    out = train(make_cfg(tmp_path, corpus, steps=40, save_every=40), progress=False)
    assert out["val_loss"] < 0.8 * out["initial_val_loss"], out
    ls = losses(tmp_path)
    assert np.mean([ls[s] for s in range(36, 41)]) < 0.8 * np.mean([ls[s] for s in range(1, 6)])
    assert len(ls) == 40 and all(np.isfinite(v) for v in ls.values())


def test_resume_after_sigterm_is_bitwise_identical(tmp_path, corpus):
    straight = train(make_cfg(tmp_path / "a", corpus), progress=False)
    part = train(make_cfg(tmp_path / "b", corpus, save_every=100), progress=False, stop_at_step=4)
    assert part["interrupted"] and part["step"] == 4
    assert ckpt.manager(tmp_path / "b" / "checkpoints", read_only=True).all_steps() == [4]
    resumed = train(make_cfg(tmp_path / "b", corpus, save_every=100), progress=False)
    assert resumed["start_step"] == 4 and resumed["step"] == 8
    la, lb = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert sorted(la) == sorted(lb) == list(range(1, 9))
    assert [la[s] for s in la] == [lb[s] for s in la]  # bitwise on CPU in float32
    for x, y in zip(jax.tree_util.tree_leaves(params_of(straight)), jax.tree_util.tree_leaves(params_of(resumed))):
        np.testing.assert_array_equal(x, y)


def test_gradient_accumulation_equals_big_batch(tmp_path, corpus):
    one = train(make_cfg(tmp_path / "a", corpus, steps=2), progress=False)
    acc = train(make_cfg(tmp_path / "b", corpus, steps=2, optim=OptimConfig(lr=3e-3, min_lr=3e-4, warmup_steps=2,
                                                                           accum_steps=4)), progress=False)
    la, lb = losses(tmp_path / "a"), losses(tmp_path / "b")
    np.testing.assert_allclose([la[1], la[2]], [lb[1], lb[2]], rtol=1e-5)
    for x, y in zip(jax.tree_util.tree_leaves(params_of(one)), jax.tree_util.tree_leaves(params_of(acc))):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=3e-5)  # Adam amplifies float32 summation-order noise


@pytest.mark.parametrize("name", ["t6-tiny", "mla-tiny"])
def test_eight_device_mesh_matches_one_device(tmp_path, corpus, name):
    model = configs.get(name, compute_dtype="float32", max_seq_len=64)
    one = train(make_cfg(tmp_path / "one", corpus, model=model, steps=3, mesh=MeshConfig(1, 1, 1)),
                devices=jax.devices()[:1], progress=False)
    eight = train(make_cfg(tmp_path / "eight", corpus, model=model, steps=3, mesh=MeshConfig(2, 2, 2)),
                  progress=False)
    l1, l8 = losses(tmp_path / "one"), losses(tmp_path / "eight")
    np.testing.assert_allclose([l1[s] for s in (1, 2, 3)], [l8[s] for s in (1, 2, 3)], rtol=1e-5)
    leaf = jax.tree_util.tree_leaves(eight["state"]["params"])[1]
    assert len(leaf.sharding.device_set) == 8


def test_restore_onto_a_different_mesh(tmp_path, corpus):
    straight = train(make_cfg(tmp_path / "a", corpus, steps=6), progress=False)
    train(make_cfg(tmp_path / "b", corpus, steps=6, mesh=MeshConfig(1, 8, 1)), progress=False, stop_at_step=3)
    resumed = train(make_cfg(tmp_path / "b", corpus, steps=6, mesh=MeshConfig(2, 1, 2)),
                    devices=jax.devices()[:4], progress=False)
    assert resumed["start_step"] == 3
    la, lb = losses(tmp_path / "a"), losses(tmp_path / "b")
    np.testing.assert_allclose([la[s] for s in range(1, 7)], [lb[s] for s in range(1, 7)], rtol=1e-5)
    assert len(jax.tree_util.tree_leaves(resumed["state"]["params"])[1].sharding.device_set) == 4


def test_corrupt_latest_checkpoint_falls_back_and_deletes_nothing(tmp_path, corpus, caplog):
    cfg = make_cfg(tmp_path, corpus, steps=8, save_every=4)
    train(cfg, progress=False)
    ckdir = tmp_path / "checkpoints"
    assert sorted(os.listdir(ckdir)) >= ["4", "8"]
    for dp, _, fs in os.walk(ckdir / "8" / "state"):  # corrupt every array file of the newest step
        for f in fs:
            if not f.endswith(".json") and "metadata" not in f.lower():
                with open(os.path.join(dp, f), "wb") as fh:
                    fh.write(b"garbage")
    resumed = train(dataclasses.replace(cfg, steps=10), progress=False)
    assert resumed["start_step"] == 4
    assert "could not be restored" in caplog.text
    assert os.path.isdir(ckdir / "8")  # kept for inspection, not deleted


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, corpus):
    cfg = make_cfg(tmp_path, corpus, steps=30, save_every=1, keep=50,
                   optim=OptimConfig(lr=1e30, min_lr=0.0, warmup_steps=0, grad_clip=0.0))
    with pytest.raises(NonFiniteLossError, match="non-finite loss at step"):
        train(cfg, progress=False)
    mngr = ckpt.manager(tmp_path / "checkpoints", read_only=True)
    steps = mngr.all_steps()
    assert steps, "the good checkpoints before the failure are kept"
    bad_step = max(losses(tmp_path)) if losses(tmp_path) else None
    ls = losses(tmp_path)
    assert all(np.isfinite(ls[s]) for s in steps if s in ls)


def test_nonfinite_skip_policy_keeps_training(tmp_path, corpus):
    cfg = make_cfg(tmp_path, corpus, steps=6, nan_policy="skip", save_every=100,
                   optim=OptimConfig(lr=1e30, min_lr=0.0, warmup_steps=0, grad_clip=0.0))
    out = train(cfg, progress=False)
    recs = [r for r in read_metrics(tmp_path) if "loss" in r]
    assert out["step"] == 6 and any(r.get("skipped_update") for r in recs)


def test_bad_inputs_fail_before_compiling(tmp_path, corpus):
    with pytest.raises(FileNotFoundError, match="manifest"):
        train(make_cfg(tmp_path, tmp_path / "nowhere"), progress=False)
    small_vocab = configs.get("t6-tiny", vocab_size=100, compute_dtype="float32", max_seq_len=64)
    with pytest.raises(ValueError, match="vocab"):
        train(make_cfg(tmp_path, corpus, model=small_vocab), progress=False)
    with pytest.raises(ValueError, match="seq_len"):
        make_cfg(tmp_path, corpus, data=DataConfig(source="manifest", path=str(corpus), seq_len=65))
    with pytest.raises(ValueError, match="accum_steps"):
        make_cfg(tmp_path, corpus, batch_size=6, optim=OptimConfig(accum_steps=4))
    assert not os.path.exists(tmp_path / "checkpoints")
    with pytest.raises(CheckpointError, match="not found"):
        ckpt.restore_latest(ckpt.manager(tmp_path / "ck"), {}, step=3)


def test_config_file_and_overrides(tmp_path):
    cfg = load_train_config(os.path.join(ROOT, "configs", "t6-tiny.json"),
                            ["model.n_layer=3", "optim.lr=1e-3", "data.seq_len=64", "run_dir=x"])
    assert (cfg.model.n_layer, cfg.optim.lr, cfg.data.seq_len, cfg.run_dir) == (3, 1e-3, 64, "x")
    assert cfg.model.attention == "tpa"
    assert load_train_config(None, ["model=mha-tiny"]).model.attention == "mha"
    with pytest.raises(ValueError, match="unknown field"):
        load_train_config(None, ["stepz=3"])
    with pytest.raises(FileNotFoundError):
        load_train_config(str(tmp_path / "missing.json"))


def test_cli_trains_saves_and_writes_config(tmp_path, corpus):
    run = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "train.py"), "--no-progress", f"run_dir={run}", "steps=4",
         "batch_size=4", "data.source=manifest", f"data.path={corpus}", "data.seq_len=32", "sample_tokens=8",
         "eval_batches=1"],
        capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "val_loss" in proc.stdout and "sample (greedy)" in proc.stdout
    saved = json.load(open(run / "config.json"))
    assert saved["steps"] == 4 and saved["model"]["attention"] == "tpa"
    meta = ckpt.restore_meta(ckpt.manager(run / "checkpoints", read_only=True), 4)
    assert meta["config"]["steps"] == 4 and meta["tokenizer"]["name"] == "byte"
    bad = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "data.seq_len=100000"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert bad.returncode == 2 and "seq_len" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
