"""The training loop: the loss falls, resume through SIGTERM is bitwise identical, meshes agree
(one device, data x fsdp x tensor, restoring onto another mesh), bad input fails before compiling,
evaluation pools its batches, and two processes train together.  (A non-finite loss stopping the run:
test_faults.test_nan_stop_names_a_finite_checkpoint.)"""
import math
import os
import shutil
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from tpa_jax import configs
from tpa_jax.config import DataConfig, MeshConfig, OptimConfig
from tpa_jax.data import resolve_manifest
from tpa_jax.train import train
from tpa_jax.train import checkpoint as ckpt
from tpa_jax.train.loop import StopFlag, evaluate
from tpa_jax.train.metrics import read_metrics

from _train_util import STEPS, losses, make_cfg, params_of
from _util import ROOT


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


def test_stop_flag_handles_signals_only_while_installed():
    before = signal.getsignal(signal.SIGTERM)
    flag = StopFlag()
    with flag.installed():
        assert flag.active and signal.getsignal(signal.SIGTERM) is flag
        signal.raise_signal(signal.SIGTERM)  # recorded, not fatal
    assert flag.signal == signal.SIGTERM and not flag.active
    assert signal.getsignal(signal.SIGTERM) is before


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


def test_context_parallel_mesh(tmp_path, corpus, straight):
    """Training with the sequence split over 4 devices (context 4 x fsdp 2, ring attention over
    striped shards) gives the 8-device fsdp run's losses; its evaluation runs on the same mesh."""
    cfg = make_cfg(tmp_path, corpus, steps=STEPS, mesh=MeshConfig(1, 2, 1, context=4), eval_every=3, eval_batches=1)
    train(cfg, progress=False, stop_at_step=3)
    np.testing.assert_allclose([losses(straight[0])[s] for s in (1, 2, 3)], [losses(tmp_path)[s] for s in (1, 2, 3)],
                               rtol=1e-5)
    assert any("val_loss" in r for r in read_metrics(tmp_path))


def test_restore_onto_a_different_mesh(tmp_path, corpus, straight):
    """The reference run's step-8 checkpoint (saved on 8 devices, fsdp=8) resumed on 4 devices as
    data 2 x tensor 2: steps 9..16 give the reference run's losses."""
    shutil.copytree(straight[0] / "checkpoints" / "8", tmp_path / "checkpoints" / "8")
    resumed = train(make_cfg(tmp_path, corpus, steps=STEPS, mesh=MeshConfig(2, 1, 2), save_every=100),
                    devices=jax.devices()[:4], progress=False)
    assert resumed["start_step"] == 8
    la, lb = losses(straight[0]), losses(tmp_path)
    assert sorted(lb) == list(range(9, STEPS + 1))
    np.testing.assert_allclose([la[s] for s in range(9, STEPS + 1)], [lb[s] for s in range(9, STEPS + 1)], rtol=1e-4)
    assert len(jax.tree_util.tree_leaves(resumed["state"]["params"])[1].sharding.device_set) == 4


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


@pytest.mark.parametrize("accum", [1, 2])
def test_evaluate_averages_losses_and_pools_recall_counts(tmp_path, corpus, accum):
    """Mean of the batch losses, exp of it, and recall ratios of the summed counts; eval batches hold
    batch_size / accum_steps sequences (a micro-batch)."""
    tcfg = make_cfg(tmp_path, corpus, eval_batches=3, optim=OptimConfig(accum_steps=accum))
    manifest = resolve_manifest(tcfg.data)
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    counts = [dict(correct=1, total=4, all_correct=0, examples=8), dict(correct=2, total=4, all_correct=1, examples=8),
              dict(correct=4, total=4, all_correct=2, examples=8)]
    shapes = []

    def plain(params, batch):
        shapes.append(batch["inputs"].shape)
        return [2.0, 3.0, 5.0][len(shapes) - 1]

    rec = evaluate(plain, None, manifest, tcfg, one)
    assert shapes == [(8 // accum, 32)] * 3
    assert rec == pytest.approx({"val_loss": 10 / 3, "val_ppl": math.exp(10 / 3)})
    shapes.clear()
    rec = evaluate(lambda p, b: {"loss": plain(p, b), **counts[len(shapes) - 1]}, None, manifest, tcfg, one)
    assert rec == pytest.approx({"val_loss": 10 / 3, "val_ppl": math.exp(10 / 3), "val_recall_acc": 7 / 12,
                                 "val_recall_exact": 3 / 24})


def launch_two_processes(run, corpus, *overrides):
    """Two jax.distributed CPU processes (gloo) on localhost running train.py: [(returncode, out, err)]."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for pid in range(2):
        env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                   JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(pid),
                   XLA_FLAGS=os.environ["XLA_FLAGS"].replace("device_count=8", "device_count=2"))
        procs.append(subprocess.Popen(
            [sys.executable, os.path.join(ROOT, "train.py"), "--no-progress", f"run_dir={run}", "batch_size=8",
             "log_every=1", "data.source=manifest", f"data.path={corpus}", "data.seq_len=32", "eval_batches=1",
             "mesh.data=2", "mesh.fsdp=2", *overrides],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT))
    results = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=600)
        finally:
            p.kill()
        results.append((p.returncode, out, err))
    return results


@pytest.mark.slow
def test_two_process_distributed_run(tmp_path, corpus):
    """Two processes train together and share checkpoints; resuming past a corrupt newest step, they
    agree on the fallback and process 0 moves it aside; a locked run_dir stops both before writing."""
    from test_checkpoint import corrupt

    run = tmp_path / "run"
    results = launch_two_processes(run, corpus, "steps=4", "save_every=2", "sample_tokens=4")
    for rc, out, err in results:
        assert rc == 0, err[-3000:]
    outs = [out for _, out, _ in results]
    finals = [next(l for l in o.splitlines() if "done: step 4" in l).split(": ", 1)[1] for o in outs]
    assert finals[0] == finals[1]  # both processes report the same validation loss
    assert "process 0/2" in outs[0] and "process 1/2" in outs[1]
    mngr = ckpt.manager(run / "checkpoints", read_only=True)
    assert mngr.all_steps() == [2, 4]
    assert ckpt.restore_meta(mngr, 4)["step"] == 4
    assert [r["step"] for r in read_metrics(run) if "loss" in r] == [1, 2, 3, 4]

    corrupt(run / "checkpoints" / "4")
    results = launch_two_processes(run, corpus, "steps=5", "save_every=100", "sample_tokens=0")
    for rc, out, err in results:
        assert rc == 0 and "done: step 5" in out, err[-3000:]
        assert "Traceback" not in err, err[-3000:]
    assert "resumed from step 2" in results[0][1]
    (moved,) = os.listdir(run / "checkpoints" / "quarantine")
    assert moved.startswith("4-")
    assert ckpt.manager(run / "checkpoints", read_only=True).all_steps() == [2, 5]
    assert [r["step"] for r in read_metrics(run) if "loss" in r] == [1, 2, 3, 4, 5]

    from tpa_jax.train import guard

    before = sorted(os.listdir(run))
    with guard.run_lock(str(run)):
        results = launch_two_processes(run, corpus, "steps=6")
    for rc, out, err in results:
        lines = err.strip().splitlines()
        assert rc == 2 and len(lines) == 1 and "is being trained by another process" in lines[0], err[-3000:]
    assert sorted(os.listdir(run)) == before
