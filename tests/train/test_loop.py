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
from tpa_jax.config import DataConfig, MeshConfig, OptimConfig, TrainConfig
from tpa_jax.configs import load_train_config
from tpa_jax.data import prepare_files
from tpa_jax.train import CheckpointError, NonFiniteLossError, train
from tpa_jax.train import checkpoint as ckpt
from tpa_jax.train.metrics import read_metrics
from _util import ROOT



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


STEPS = 16  # the shared reference run: 16 steps, checkpoints at 8 and 16


@pytest.fixture(scope="module")
def straight(tmp_path_factory, corpus):
    run = tmp_path_factory.mktemp("straight")
    out = train(make_cfg(run, corpus, steps=STEPS, save_every=8), progress=False)
    return run, out


def test_loss_falls(straight):
    run, out = straight
    assert out["val_loss"] < 0.85 * out["initial_val_loss"], out
    ls = losses(run)
    assert sorted(ls) == list(range(1, STEPS + 1)) and all(np.isfinite(v) for v in ls.values())
    assert np.mean([ls[s] for s in range(13, 17)]) < 0.85 * np.mean([ls[s] for s in range(1, 5)])
    assert ckpt.manager(run / "checkpoints", read_only=True).all_steps() == [8, 16]


def test_resume_after_sigterm_is_bitwise_identical(tmp_path, corpus, straight):
    run_a, out_a = straight
    cfg = make_cfg(tmp_path, corpus, steps=STEPS, save_every=100)
    part = train(cfg, progress=False, stop_at_step=8)  # a real SIGTERM arrives during step 8
    assert part["interrupted"] and part["step"] == 8
    assert ckpt.manager(tmp_path / "checkpoints", read_only=True).all_steps() == [8]
    resumed = train(cfg, progress=False)
    assert resumed["start_step"] == 8 and resumed["step"] == STEPS
    la, lb = losses(run_a), losses(tmp_path)
    assert sorted(lb) == list(range(1, STEPS + 1))
    assert [la[s] for s in sorted(la)] == [lb[s] for s in sorted(la)]  # bitwise on CPU in float32
    for x, y in zip(jax.tree_util.tree_leaves(params_of(out_a)), jax.tree_util.tree_leaves(params_of(resumed))):
        np.testing.assert_array_equal(x, y)


def test_gradient_accumulation_equals_big_batch(tmp_path, corpus, straight):
    # 4 micro-steps of 2 sequences == one step of 8 (same lr for steps 1-3: warmup covers them)
    acc = make_cfg(tmp_path, corpus, steps=STEPS,
                   optim=OptimConfig(lr=3e-3, min_lr=3e-4, warmup_steps=2, accum_steps=4))
    train(acc, progress=False, stop_at_step=3)
    la, lb = losses(straight[0]), losses(tmp_path)
    np.testing.assert_allclose([la[s] for s in (1, 2, 3)], [lb[s] for s in (1, 2, 3)], rtol=2e-5)
    assert la[3] != la[1]  # the updates changed the model


def test_eight_device_mesh_matches_one_device(tmp_path, corpus, straight):
    one = make_cfg(tmp_path, corpus, steps=STEPS, mesh=MeshConfig(1, 1, 1))
    train(one, devices=jax.devices()[:1], progress=False, stop_at_step=3)
    l8, l1 = losses(straight[0]), losses(tmp_path)  # the reference run uses all 8 devices (fsdp=8)
    np.testing.assert_allclose([l8[s] for s in (1, 2, 3)], [l1[s] for s in (1, 2, 3)], rtol=1e-5)
    leaf = jax.tree_util.tree_leaves(straight[1]["state"]["params"])[1]
    assert len(leaf.sharding.device_set) == 8


def test_data_fsdp_tensor_mesh(tmp_path, corpus, straight):
    cfg = make_cfg(tmp_path, corpus, steps=STEPS, mesh=MeshConfig(2, 2, 2))
    out = train(cfg, progress=False, stop_at_step=3)
    np.testing.assert_allclose([losses(straight[0])[s] for s in (1, 2, 3)], [losses(tmp_path)[s] for s in (1, 2, 3)],
                               rtol=1e-5)
    assert len(jax.tree_util.tree_leaves(out["state"]["params"])[1].sharding.device_set) == 8


def test_restore_onto_a_different_mesh(tmp_path, corpus, straight):
    train(make_cfg(tmp_path, corpus, steps=STEPS, mesh=MeshConfig(1, 8, 1), save_every=100), progress=False,
          stop_at_step=8)
    resumed = train(make_cfg(tmp_path, corpus, steps=STEPS, mesh=MeshConfig(2, 1, 2), save_every=100),
                    devices=jax.devices()[:4], progress=False)
    assert resumed["start_step"] == 8
    la, lb = losses(straight[0]), losses(tmp_path)
    np.testing.assert_allclose([la[s] for s in range(1, STEPS + 1)], [lb[s] for s in range(1, STEPS + 1)], rtol=1e-4)
    assert len(jax.tree_util.tree_leaves(resumed["state"]["params"])[1].sharding.device_set) == 4


def test_corrupt_latest_checkpoint_falls_back_and_deletes_nothing(tmp_path, corpus, straight, caplog):
    import shutil

    shutil.copytree(straight[0] / "checkpoints", tmp_path / "checkpoints")
    ckdir = tmp_path / "checkpoints"
    for dp, _, fs in os.walk(ckdir / "16" / "state"):  # corrupt every array file of the newest step
        for f in fs:
            if not f.endswith(".json") and "metadata" not in f.lower():
                with open(os.path.join(dp, f), "wb") as fh:
                    fh.write(b"garbage")
    resumed = train(make_cfg(tmp_path, corpus, steps=STEPS, save_every=100), progress=False, stop_at_step=9)
    assert resumed["start_step"] == 8
    assert "could not be restored" in caplog.text
    assert os.path.isdir(ckdir / "16")  # kept for inspection, not deleted


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


def test_two_process_distributed_run(tmp_path, corpus):
    """Two jax.distributed CPU processes (gloo) on localhost train a few steps and share a checkpoint."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run = tmp_path / "run"
    procs = []
    for pid in range(2):
        env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                   JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(pid),
                   XLA_FLAGS="--xla_force_host_platform_device_count=2")
        procs.append(subprocess.Popen(
            [sys.executable, os.path.join(ROOT, "train.py"), "--no-progress", f"run_dir={run}", "steps=3",
             "save_every=3", "batch_size=8", "log_every=1", "data.source=manifest", f"data.path={corpus}",
             "data.seq_len=32", "sample_tokens=4", "eval_batches=1", "mesh.data=2", "mesh.fsdp=2"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT))
    outs = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=600)
        finally:
            p.kill()
        assert p.returncode == 0, err[-3000:]
        outs.append(out)
    finals = [next(l for l in o.splitlines() if "done: step 3" in l).split(": ", 1)[1] for o in outs]
    assert finals[0] == finals[1]  # both processes report the same validation loss
    assert "process 0/2" in outs[0] and "process 1/2" in outs[1]
    mngr = ckpt.manager(run / "checkpoints", read_only=True)
    assert mngr.all_steps() == [3]
    assert ckpt.restore_meta(mngr, 3)["step"] == 3
    assert [r["step"] for r in read_metrics(run) if "loss" in r] == [1, 2, 3]
