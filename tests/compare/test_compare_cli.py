"""``python -m tpa_jax.compare`` (tpa_jax.compare.cli): one-line errors, refusal of a mismatching
rerun, ``--force``, the recorded command line."""
import json
import os
import runpy
import shutil
import sys

import pytest

from tpa_jax.compare import cli
from _compare_util import run_main, tiny_argv


def test_bad_input_gives_one_line_errors(capsys, tmp_path, corpus):
    cases = [
        (["--size", "huge", "--steps", "3"], "unknown size 'huge'"),
        (["--steps", "0"], "steps must be an integer >= 1"),
        (["--steps", "3", "--mechanisms", "t6", "gpt"], "unknown mechanism 'gpt'"),
        (["--steps", "3", "--task", "copy"], "unknown task 'copy'"),
        (["--steps", "x"], "invalid int value"),
        (["--steps", "3", "--seq-len", "1000"], "max_seq_len"),
        (["--steps", "3", "--data-path", str(tmp_path / "nope")], "does not exist"),
        (["--steps", "3", "run_dir=x"], "set per member"),
        (["--steps", "3", "optim.lr=-1"], "OptimConfig.lr"),
        (["--steps", "3", "--devices", "99"], "--devices must be in"),
    ]
    for argv, message in cases:
        rc = run_main(argv + ["--out", str(tmp_path / "out")])
        err = capsys.readouterr().err
        assert rc == 2, argv
        assert message in err and err.count("\n") == 1 and err.startswith("error: "), (argv, err)
    assert not os.path.exists(tmp_path / "out" / "t6-tiny")  # nothing trained


def test_module_entry_point(tmp_path, monkeypatch, capsys):
    """``python -m tpa_jax.compare`` runs the same command line and exits with its status."""
    monkeypatch.setattr(sys, "argv", ["tpa_jax.compare", "--size", "huge", "--steps", "3",
                                      "--out", str(tmp_path / "out")])
    with pytest.raises(SystemExit) as e:
        runpy.run_module("tpa_jax.compare", run_name="__main__")
    assert e.value.code == 2 and capsys.readouterr().err.startswith("error: unknown size 'huge'")
    assert not os.path.exists(tmp_path / "out")


def test_mismatched_rerun_is_refused_and_force_starts_over(reference, corpus, tmp_path, capsys):
    ref_out, _ = reference
    out = tmp_path / "copy"
    shutil.copytree(ref_out, out)
    before = sorted(os.listdir(out))
    rc = cli.main(tiny_argv(corpus, out, "--seed", "1"))
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "seed: 0 -> 1" in err and "--force" in err
    assert sorted(os.listdir(out)) == before
    # another mechanism with the same settings is no mismatch: it joins the table (not run here);
    # --force clears OUT and runs the new settings
    rc = cli.main(tiny_argv(corpus, out, "--seed", "1", "--force", "--mechanisms", "t6"))
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "| t6-tiny " in captured.out and "attn params/layer" in captured.out
    assert not os.path.exists(out / "mha-tiny")  # the old member went with --force
    data = json.load(open(out / "compare.json"))
    assert [r["member"] for r in data["rows"]] == ["t6-tiny"] and data["options"]["train"]["seed"] == 1
    assert data["command"].startswith("python -m tpa_jax.compare --size tiny") and "--force" in data["command"]
