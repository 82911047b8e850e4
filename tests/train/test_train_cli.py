"""The training command line: a run through ``train.py`` trains, saves and writes its config;
bad input ends with exit code 2 and one ``error:`` line on stderr."""
import json
import os
import subprocess
import sys

import pytest

from tpa_jax.train import checkpoint as ckpt
from tpa_jax.config import TrainConfig
from tpa_jax.configs import load_train_config, train_config_names
from tpa_jax.train.cli import main

from _util import ROOT


# the CLI run on one CPU device (not the tests' 8 fake ones): the mesh plays no part in what is checked,
# and a step then runs no collectives
ONE_DEVICE = dict(os.environ, XLA_FLAGS=os.environ["XLA_FLAGS"].replace("device_count=8", "device_count=1"))


def test_cli_trains_saves_and_writes_config(tmp_path, corpus):
    run = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "train.py"), "--no-progress", f"run_dir={run}", "steps=4",
         "batch_size=4", "data.source=manifest", f"data.path={corpus}", "data.seq_len=32", "sample_tokens=8",
         "eval_batches=1"],
        capture_output=True, text=True, timeout=600, cwd=ROOT, env=ONE_DEVICE)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "val_loss" in proc.stdout and "sample (greedy)" in proc.stdout
    saved = json.load(open(run / "config.json"))
    assert saved["steps"] == 4 and saved["model"]["attention"] == "tpa"
    meta = ckpt.restore_meta(ckpt.manager(run / "checkpoints", read_only=True), 4)
    assert meta["config"]["steps"] == 4 and meta["tokenizer"]["name"] == "byte"
    bad = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "data.seq_len=100000"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT, env=ONE_DEVICE)
    assert bad.returncode == 2 and "seq_len" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("argv,match", [
    (["stepz=3"], "unknown field"),
    (["optim.lr=-1"], "OptimConfig.lr"),
    (["--config", "/nonexistent/train.json"], "no such file"),
    (["--config", "t6-huge"], "not a packaged config (packaged: t6-large, t6-medium, t6-small, t6-tiny, t6-xl)"),
    (["data.source=manifest", "data.path=/nonexistent/shards", "run_dir={tmp}"], "no token manifest"),
])
def test_bad_input_is_one_error_line_and_exit_code_2(argv, match, tmp_path, capsys):
    """Config errors before anything runs, a missing manifest before anything is compiled."""
    assert main([a.format(tmp=tmp_path / "run") for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and match in err and "\n" not in err


def test_default_config_is_the_packaged_tiny_t6_and_equals_the_dataclass_defaults(tmp_path, monkeypatch):
    """The defaults live in one place: the packaged t6-tiny.json equals TrainConfig(), field by field."""
    monkeypatch.chdir(tmp_path)  # no repository files around: the package's own copy is read
    source = os.path.join(ROOT, "tpa_jax", "train_configs")
    assert train_config_names() == sorted(f[:-5] for f in os.listdir(source) if f.endswith(".json"))
    on_disk = json.load(open(os.path.join(source, "t6-tiny.json")))
    default = load_train_config()
    assert default == TrainConfig() == load_train_config("t6-tiny") == load_train_config("t6-tiny.json")
    assert default == load_train_config(os.path.join(source, "t6-tiny.json"))
    assert on_disk["model"] == "t6-tiny" and default.model == __import__("tpa_jax").configs.get("t6-tiny", vocab_size=None)
    for group, values in on_disk.items():
        if isinstance(values, dict):
            for k, v in values.items():
                assert getattr(getattr(TrainConfig(), group), k) == v, f"{group}.{k}"
        elif group != "model":
            assert getattr(TrainConfig(), group) == values, group
    small = load_train_config("t6-small")
    assert (small.optim.lr, small.optim.warmup_steps, small.batch_size) == (6e-4, 2000, 480)


def test_locked_run_dir_is_one_error_line_and_exit_code_2(tmp_path, corpus, capsys):
    from tpa_jax.train.guard import run_lock

    run = tmp_path / "run"
    run.mkdir()
    with run_lock(str(run)):
        code = main(["--no-progress", f"run_dir={run}", "data.source=manifest", f"data.path={corpus}",
                     "data.seq_len=32"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: ") and "another process" in err and "\n" not in err
