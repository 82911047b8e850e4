"""The package as a user installs it: a wheel built from the repository carries the named training
configs, and its ``tpa-train`` console script, run from an empty directory in a fresh virtual
environment, resolves and trains the same default run as the repository.

The fresh environment gets the wheel with ``--no-deps``; its dependencies (jax, flax, ...) come from
this interpreter's site-packages through a ``.pth`` file.  A path line in a ``.pth`` file is only
appended to ``sys.path`` (that directory's own ``.pth`` files are not processed), so an editable
install of the repository there is not picked up: the test checks that ``tpa_jax`` is imported from
the wheel."""
import json
import os
import shutil
import site
import subprocess
import sys
import sysconfig
import zipfile

import pytest

from tpa_jax.configs import load_train_config

from _util import ROOT

pytestmark = pytest.mark.slow
SOURCE_CONFIGS = ROOT / "tpa_jax" / "train_configs"


def _run(cmd, **kw):
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=600, **kw)
    assert proc.returncode == 0, f"{cmd}: {proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(the fresh venv's bin folder, the built wheel's file names)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"  # build from a copy, so the build leaves nothing in the repository
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".venv", ".git", "runs", "build", "dist", "*.egg-info",
                                                             "__pycache__", "tests", "docs", ".pytest_cache"))
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", tmp / "dist", src])
    (wheel,) = (tmp / "dist").glob("tpa_jax-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", venv])
    bindir = venv / ("Scripts" if os.name == "nt" else "bin")
    _run([bindir / "python", "-m", "pip", "install", "-q", "--no-deps", "--no-index", wheel])
    purelib = _run([bindir / "python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout
    outer = [sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"], *site.getsitepackages()]
    with open(os.path.join(purelib.strip(), "outer_site_packages.pth"), "w") as f:
        f.write("\n".join(dict.fromkeys(outer)) + "\n")
    return bindir, names


def _env(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return dict(env, HOME=str(tmp_path / "home"))


def test_wheel_carries_the_training_configs(installed):
    _, names = installed
    want = sorted(f"tpa_jax/train_configs/{f}" for f in os.listdir(SOURCE_CONFIGS) if f.endswith(".json"))
    assert want and sorted(n for n in names if n.startswith("tpa_jax/train_configs/")) == want


def test_installed_tpa_train_runs_the_default_config_from_an_empty_directory(installed, tmp_path):
    bindir, _ = installed
    empty = tmp_path / "cwd"
    empty.mkdir()
    env = _env(tmp_path)
    where = _run([bindir / "python", "-c", "import tpa_jax; print(tpa_jax.__file__)"], cwd=empty, env=env).stdout
    assert where.strip().startswith(str(bindir.parent)), where  # the wheel's copy, not the repository's

    printed = json.loads(_run([bindir / "tpa-train", "--print-config"], cwd=empty, env=env).stdout)
    assert printed == load_train_config().to_dict()
    on_disk = json.load(open(SOURCE_CONFIGS / "t6-tiny.json"))  # the repository's file, read directly
    for key, value in on_disk.items():
        if isinstance(value, dict):
            assert {k: printed[key][k] for k in value} == value, key
        elif key != "model":
            assert printed[key] == value, key
    assert list(empty.iterdir()) == []

    run = tmp_path / "run"
    overrides = [f"run_dir={run}", "steps=2", "batch_size=4", "eval_batches=1", "sample_tokens=0",
                 f"data.cache_dir={tmp_path / 'data'}"]
    _run([bindir / "tpa-train", "--no-progress", *overrides], cwd=empty, env=env)
    saved = json.load(open(run / "config.json"))
    want = load_train_config(None, overrides).to_dict()
    assert want["model"]["vocab_size"] is None  # left to the data: the byte tokenizer's 256
    want["model"]["vocab_size"] = 256
    assert saved == want
    assert os.path.isdir(run / "checkpoints" / "2")
