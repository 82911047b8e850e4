"""Faults around a run directory: a second trainer on a locked run_dir, a resume with a changed
config, an unreadable newest checkpoint (moved to quarantine, later steps saved normally), the
metrics of a resumed run (each step once) and the checkpoint a NaN stop names (truly finite)."""
import dataclasses
import fcntl
import json
import math
import os
import re
import shutil

import jax
import numpy as np
import pytest

from tpa_jax.config import MeshConfig, OptimConfig
from tpa_jax.train import NonFiniteLossError, RunLockedError, train
from tpa_jax.train import checkpoint as ckpt
from tpa_jax.train import guard
from tpa_jax.train.metrics import read_metrics

from _train_util import LR, MIN_LR, STEPS, WARMUP, losses, make_cfg
from test_checkpoint import corrupt, state_at


def snapshot(run_dir):
    """{relative path: bytes} of every file under ``run_dir``."""
    out = {}
    for dp, _, fs in os.walk(run_dir):
        for f in fs:
            p = os.path.join(dp, f)
            out[os.path.relpath(p, run_dir)] = open(p, "rb").read()
    return out


def test_locked_run_dir_refuses_before_writing(tmp_path, corpus, straight):
    run = tmp_path / "run"
    run.mkdir()
    with guard.run_lock(str(run)):  # another trainer's open file description holds it
        with pytest.raises(RunLockedError) as e:
            train(make_cfg(run, corpus, steps=2), progress=False)
        assert sorted(os.listdir(run)) == [".lock"]  # no config.json, metrics.jsonl, checkpoints
    msg = str(e.value)
    assert "\n" not in msg and str(run) in msg and f"pid {os.getpid()}" in msg
    # a raw flock held elsewhere (no holder text) is refused too
    fd = os.open(run / ".lock", os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)
    with pytest.raises(RunLockedError, match="another process"):
        train(make_cfg(run, corpus, steps=2), progress=False)
    os.close(fd)  # released: the lock file left behind does not block
    with guard.run_lock(str(run)):
        pass
    assert os.path.exists(straight[0] / ".lock")  # the reference run held the lock while training ...
    with guard.run_lock(str(straight[0])):  # ... and released it at exit
        pass


def resumable(tmp_path, straight):
    """A run_dir holding the reference run's checkpoints (8, 16) and config.json."""
    shutil.copytree(straight[0] / "checkpoints", tmp_path / "checkpoints")
    (tmp_path / "config.json").write_text("the stored config\n")
    return tmp_path


@pytest.mark.parametrize("change, field", [
    (lambda c: dict(model=dataclasses.replace(c.model, n_layer=4)), "model.n_layer 2 -> 4"),
    (lambda c: dict(model=dataclasses.replace(c.model, rope_theta=500.0)), "model.rope_theta 10000.0 -> 500.0"),
    (lambda c: dict(data=dataclasses.replace(c.data, seq_len=16)), "data.seq_len 32 -> 16"),
    (lambda c: dict(seed=3, batch_size=4), "batch_size 8 -> 4, seed 0 -> 3"),
])
def test_resume_with_a_changed_config_is_refused(tmp_path, corpus, straight, change, field):
    run = resumable(tmp_path, straight)
    base = make_cfg(run, corpus, steps=STEPS)
    before = snapshot(run)
    with pytest.raises(ValueError, match="resume with a changed config") as e:
        train(make_cfg(run, corpus, steps=STEPS, **change(base)), progress=False)
    msg = str(e.value)
    assert "\n" not in msg and field in msg and "resume_changes='allow'" in msg
    after = snapshot(run)
    after.pop(".lock", None)
    assert after == before  # config.json bytes, checkpoints: untouched; no metrics.jsonl


def test_resume_changes_field_is_validated(tmp_path, corpus):
    with pytest.raises(ValueError, match="resume_changes") as e:
        make_cfg(tmp_path, corpus, resume_changes="maybe")
    assert "\n" not in str(e.value)


def test_resume_changes_allow_resumes_and_records(tmp_path, corpus, straight, caplog):
    run = resumable(tmp_path, straight)
    out = train(make_cfg(run, corpus, steps=STEPS, seed=5, resume_changes="allow"), progress=False)
    assert out["start_step"] == STEPS
    recs = [json.loads(line) for line in open(run / "resume_changes.jsonl")]
    assert recs == [{"event": "resume_changes", "step": STEPS, "changes": {"seed": [0, 5]}}]
    assert "seed 0 -> 5" in caplog.text
    assert json.load(open(run / "config.json"))["seed"] == 5


def test_resume_on_data_from_another_tokenizer_is_refused(tmp_path, corpus, straight):
    from tpa_jax.data import load_manifest
    from tpa_jax.train.loop import _check_resume_config

    run = resumable(tmp_path, straight)
    manifest = load_manifest(str(corpus))
    _check_resume_config(make_cfg(run, corpus, steps=STEPS), manifest, True)  # the same tokenizer: accepted
    other = dict(manifest, tokenizer={"kind": "hf", "name": "hf:tok.json", "sha256": "ab" * 32, "vocab_size": 256})
    with pytest.raises(ValueError, match="resume with a changed config") as e:
        _check_resume_config(make_cfg(run, corpus, steps=STEPS), other, True)
    assert "\n" not in str(e.value) and "tokenizer (kind, vocab, source) ['byte', 256, None] -> ['hf', 256" in str(e.value)


def test_resume_with_changed_optimiser_and_steps(tmp_path, corpus, straight, caplog):
    run = resumable(tmp_path, straight)
    optim = OptimConfig(lr=LR / 2, min_lr=MIN_LR, warmup_steps=WARMUP)
    with caplog.at_level("INFO", logger="tpa_jax.train"):
        out = train(make_cfg(run, corpus, steps=STEPS + 1, optim=optim, save_every=100), progress=False)
    assert (out["start_step"], out["step"]) == (STEPS, STEPS + 1)
    assert "optim.lr" in caplog.text and "steps 16 -> 17" in caplog.text
    assert not os.path.exists(run / "resume_changes.jsonl")


def test_corrupt_newest_step_is_quarantined_and_metrics_hold_each_step_once(tmp_path, corpus, caplog):
    # one device: the mesh plays no part here, and each step then runs no collectives
    cfg = make_cfg(tmp_path, corpus, steps=12, save_every=4, eval_every=3, mesh=MeshConfig(1, 1, 1))
    one = jax.devices()[:1]
    first = train(cfg, devices=one, progress=False, stop_at_step=10)
    mngr = ckpt.manager(tmp_path / "checkpoints", read_only=True)
    assert first["interrupted"] and mngr.all_steps() == [4, 8, 10]
    mngr.close()
    corrupt(tmp_path / "checkpoints" / "10")

    resumed = train(cfg, devices=one, progress=False)
    assert resumed["start_step"] == 8 and resumed["step"] == 12
    moved = os.listdir(tmp_path / "checkpoints" / "quarantine")
    assert len(moved) == 1 and re.fullmatch(r"10-\d{8}T\d{6}Z", moved[0])
    assert f"moved aside to {tmp_path / 'checkpoints' / 'quarantine' / moved[0]}" in caplog.text
    assert os.path.isdir(tmp_path / "checkpoints" / "quarantine" / moved[0] / "state")  # moved, not deleted
    mngr = ckpt.manager(tmp_path / "checkpoints", read_only=True)
    assert mngr.all_steps() == [4, 8, 12]  # the steps after the resume are saved; rotation kept good ones
    target = ckpt.abstract_like(resumed["state"])
    for s in mngr.all_steps():
        assert ckpt.restore_latest(mngr, target, step=s)[2]["step"] == s
    mngr.close()

    recs = read_metrics(tmp_path)
    train_steps = [r["step"] for r in recs if "loss" in r]
    assert train_steps == list(range(1, 13))  # 9 and 10 of the first attempt were dropped
    val_steps = [r["step"] for r in recs if "val_loss" in r]
    assert val_steps == [0, 3, 6, 9, 12] and not os.path.exists(tmp_path / "metrics.jsonl.tmp")

    again = train(cfg, devices=one, progress=False)  # the finished run again: nothing trained, nothing written twice
    assert again["start_step"] == again["step"] == 12 and math.isfinite(again["val_loss"])
    assert read_metrics(tmp_path) == recs


def test_quarantine_moves_only_steps_newer_than_a_good_one(tmp_path):
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    mngr = ckpt.manager(tmp_path / "ck", async_save=False)
    for s in (1, 2, 3):
        ckpt.save(mngr, s, state_at(s, sharding), {"step": s})
    misfit = ckpt.abstract_like({"step": state_at(0, sharding)["step"],
                                 "w": jax.device_put(np.zeros((8, 8), np.float32), sharding)})
    with pytest.raises(ckpt.CheckpointError, match="no readable checkpoint"):
        ckpt.restore_latest(mngr, misfit, quarantine=True)  # fails at every step: nothing is moved
    assert mngr.all_steps() == [1, 2, 3] and not os.path.exists(tmp_path / "ck" / "quarantine")

    corrupt(tmp_path / "ck" / "3")
    step, _, meta = ckpt.restore_latest(mngr, ckpt.abstract_like(state_at(0, sharding)), quarantine=True)
    assert (step, meta["step"]) == (2, 2) and mngr.all_steps() == [1, 2]
    (moved,) = os.listdir(tmp_path / "ck" / "quarantine")
    assert moved.startswith("3-")
    ckpt.save(mngr, 3, state_at(3, sharding), {"step": 3})  # the number is free again
    meta3 = ckpt.restore_meta(mngr, 3)
    assert mngr.all_steps() == [1, 2, 3] and {k: v for k, v in meta3.items() if k != "checksums"} == {"step": 3}
    mngr.close()


def test_trim_metrics_is_atomic_and_keeps_earlier_records(tmp_path):
    lines = [{"step": 0, "val_loss": 1.0}, {"step": 1, "loss": 2.0}, {"note": "no step"}, {"step": 2, "loss": 3.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"step": 3, "lo')
    assert guard.trim_metrics(str(tmp_path), 1) == 2
    assert read_metrics(tmp_path) == lines[:3]
    assert guard.trim_metrics(str(tmp_path), 1) == 0
    assert sorted(os.listdir(tmp_path)) == ["metrics.jsonl"]


def test_nan_stop_with_params_blown_up_at_once_saves_nothing(tmp_path, corpus):
    # the first update turns the params non-finite while the first loss is still finite
    cfg = make_cfg(tmp_path, corpus, steps=4, save_every=1,
                   optim=OptimConfig(lr=1e39, min_lr=0.0, warmup_steps=0, grad_clip=0.0))
    with pytest.raises(NonFiniteLossError, match="non-finite params at step 1") as e:
        train(cfg, progress=False)
    assert "no checkpoint was saved" in str(e.value) and "\n" not in str(e.value)
    mngr = ckpt.manager(tmp_path / "checkpoints", read_only=True)
    assert mngr.all_steps() == []
    mngr.close()


def test_nan_stop_names_a_finite_checkpoint(tmp_path, corpus):
    """A non-finite loss stops the run, keeps the good checkpoints before it (their losses finite) and
    names the last one, whose params are truly finite."""
    cfg = make_cfg(tmp_path, corpus, steps=30, save_every=1, keep=50,
                   optim=OptimConfig(lr=1e30, min_lr=0.0, warmup_steps=0, grad_clip=0.0))
    with pytest.raises(NonFiniteLossError, match="non-finite (loss|gradient norm|params) at step") as e:
        train(cfg, progress=False)
    assert "last good checkpoint: step" in str(e.value)
    named = re.search(r"last good checkpoint: step (\d+)", str(e.value))
    mngr = ckpt.manager(tmp_path / "checkpoints", read_only=True)
    steps = mngr.all_steps()
    assert steps, "the good checkpoints before the failure are kept"
    ls = losses(tmp_path)
    assert all(np.isfinite(ls[s]) for s in steps if s in ls)
    step = int(named.group(1))
    assert steps[-1] == step
    meta = ckpt.restore_meta(mngr, step)
    out = mngr.restore(step, args=ckpt.ocp.args.Composite(state=ckpt.ocp.args.StandardRestore()))
    assert meta["step"] == step
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree_util.tree_leaves(out["state"]["params"]))
    mngr.close()
