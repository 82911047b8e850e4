"""Expected failures stay quiet: resuming past an unreadable newest checkpoint, and loading one,
print one warning line, never the checkpoint libraries' own tracebacks or "Exception ignored" /
"Event loop is closed" lines (they are kept at DEBUG level, shown with TPA_JAX_DEBUG=1)."""
import json
import os
import shutil
import subprocess
import sys

from _train_util import STEPS, make_cfg
from _util import ROOT
from test_checkpoint import corrupt

NOISE = ("Traceback", "Exception ignored", "Event loop is closed", "DATA_LOSS:\n")


def run(args, **kw):
    env = dict(os.environ, TPA_JAX_DEBUG="0")
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
                          **kw)


def warnings_of(stderr):
    return [line for line in stderr.splitlines() if "WARNING" in line]


def test_a_corrupt_newest_step_is_one_warning_line(tmp_path, corpus, straight):
    shutil.copytree(straight[0] / "checkpoints", tmp_path / "checkpoints")
    corrupt(tmp_path / "checkpoints" / str(STEPS))

    load = run(["-c", f"import tpa_jax; print(tpa_jax.load({str(tmp_path)!r}).step)"])
    assert load.returncode == 0 and load.stdout.split() == ["8"], load.stderr[-2000:]
    assert not any(n in load.stderr for n in NOISE), load.stderr[-2000:]
    (warn,) = warnings_of(load.stderr)
    assert f"using step 8 of {tmp_path / 'checkpoints'}" in warn and "kept on disk" in warn
    assert len(load.stderr.strip().splitlines()) == 1, load.stderr

    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(make_cfg(tmp_path, corpus, steps=9, save_every=100).to_dict()))
    resume = run(["train.py", "--config", str(cfg), "--no-progress"])
    assert resume.returncode == 0 and "done: step 9" in resume.stdout, resume.stderr[-2000:]
    assert not any(n in resume.stderr for n in NOISE), resume.stderr[-2000:]
    (warn,) = warnings_of(resume.stderr)
    assert "using step 8" in warn and "moved aside to" in warn and "quarantine" in warn
