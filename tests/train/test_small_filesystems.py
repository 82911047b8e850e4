"""Real filesystem limits, on small tmpfs mounts (skipped where this machine cannot mount one):
a read-only run_dir or data.cache_dir is one ``error:`` line and exit 2; a disk that fills up during
training stops the run with one line naming the cause, and the checkpoint saved before stays
loadable."""
import os
import subprocess

import pytest

import tpa_jax
from tpa_jax.train import CheckpointError, train
from tpa_jax.train.cli import main

from _train_util import make_cfg


def du(path):
    return sum(os.path.getsize(os.path.join(dp, f)) for dp, _, fs in os.walk(path) for f in fs)


@pytest.fixture
def mount(tmp_path):
    """``mount(name, size_bytes, read_only=False)``: a fresh tmpfs at tmp_path/name (unmounted after)."""
    mounted = []

    def make(name, size, read_only=False, prepare=()):
        d = tmp_path / name
        d.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(d)], capture_output=True)
        if r.returncode:
            pytest.skip(f"cannot mount a tmpfs here (needs root with CAP_SYS_ADMIN): {r.stderr.decode().strip()}")
        mounted.append(d)
        for sub in prepare:
            (d / sub).mkdir()
        if read_only:
            subprocess.run(["mount", "-o", "remount,ro", str(d)], check=True)
        return d

    yield make
    for d in mounted:
        subprocess.run(["umount", "-l", str(d)], check=False)


@pytest.mark.parametrize("args", [["run_dir={ro}/run"], ["run_dir={ro}/new/run"],
                                  ["run_dir={tmp}/run", "data.cache_dir={ro}/run"],
                                  ["run_dir={tmp}/run", "data.cache_dir={ro}/new"]])
def test_read_only_filesystem_is_one_line(mount, tmp_path, capsys, args):
    ro = mount("ro", 1 << 20, read_only=True, prepare=["run"])
    argv = [a.format(ro=ro, tmp=tmp_path) for a in args] + ["steps=2"]
    assert main(argv + ["--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and str(ro) in err[0], err
    assert "Read-only file system" in err[0] or "not writable" in err[0], err
    assert not (tmp_path / "run").exists()  # a refused run creates nothing


def test_full_disk_keeps_the_saved_checkpoint(mount, corpus, straight, capfd):
    step_bytes = du(straight[0] / "checkpoints" / "8")
    disk = mount("disk", int(step_bytes * 1.6) + (256 << 10))  # one step fits, not two
    with pytest.raises(CheckpointError) as e:
        train(make_cfg(disk / "run", corpus, steps=4, save_every=2), progress=False)
    msg = str(e.value)
    assert "\n" not in msg and "No space left on device" in msg and "[2]" in msg, msg
    err = capfd.readouterr().err
    assert "Traceback" not in err and "RESOURCE_EXHAUSTED" not in err, err[-3000:]
    assert tpa_jax.load(disk / "run").step == 2  # what was saved before is intact
    assert (disk / "run" / "config.json").exists() and (disk / "run" / "metrics.jsonl").exists()
