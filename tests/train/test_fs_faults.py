"""Filesystem problems at the start of training: a run_dir that is a file or not writable and a
data.cache_dir that is a file are one-line errors naming the path, raised before anything is
compiled; the train CLI prints one ``error:`` line and exits 2."""
import os

import pytest

from tpa_jax.config import DataConfig
from tpa_jax.train import loop, train
from tpa_jax.train.cli import main

from _train_util import make_cfg


@pytest.fixture
def no_compile(monkeypatch):
    """Fail the test if training gets as far as building the model."""
    def boom(*a, **k):
        raise AssertionError("reached the training body")
    monkeypatch.setattr(loop, "_train", boom)


def _one_line(exc_info, *words):
    msg = str(exc_info.value)
    assert "\n" not in msg and all(w in msg for w in words), msg


def test_run_dir_is_a_file(tmp_path, corpus, no_compile):
    f = tmp_path / "run"
    f.write_text("x")
    with pytest.raises(ValueError) as e:
        train(make_cfg(f, corpus), progress=False)
    _one_line(e, str(f), "file")
    assert f.read_text() == "x"


def test_run_dir_below_a_file(tmp_path, corpus, no_compile):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ValueError) as e:
        train(make_cfg(f / "run", corpus), progress=False)
    _one_line(e, str(f / "run"))


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_run_dir_not_writable(tmp_path, corpus, no_compile):
    d = tmp_path / "ro"
    d.mkdir()
    d.chmod(0o555)
    try:
        with pytest.raises(ValueError) as e:
            train(make_cfg(d, corpus), progress=False)
        _one_line(e, str(d), "not writable")
    finally:
        d.chmod(0o755)


def test_cache_dir_is_a_file(tmp_path, corpus, no_compile):
    f = tmp_path / "cache"
    f.write_text("x")
    cfg = make_cfg(tmp_path / "run", corpus, data=DataConfig(source="embedded", cache_dir=str(f), seq_len=32))
    with pytest.raises(ValueError) as e:
        train(cfg, progress=False)
    _one_line(e, "data.cache_dir", str(f))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("which", ["run_dir", "data.cache_dir"])
def test_cli_one_error_line(which, tmp_path, capsys):
    f = tmp_path / "afile"
    f.write_text("x")
    argv = [f"{which}={f}", f"run_dir={tmp_path / 'run'}"] if which != "run_dir" else [f"run_dir={f}"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and str(f) in err[0], err
