"""Unexpected errors in the train and eval command lines: one ``error: <type>: <message>`` line and
exit code 1, no traceback; ``TPA_JAX_DEBUG=1`` re-raises them with their traceback."""
import pytest

import tpa_jax.eval.cli as eval_cli
import tpa_jax.train.cli as train_cli
import tpa_jax.train.loop as loop


def boom(*a, **k):
    raise RuntimeError("disk on fire\nsecond line of detail")


@pytest.mark.parametrize("which", ["train", "eval"])
def test_unexpected_error_is_one_line_unless_debug(monkeypatch, capsys, tmp_path, which):
    if which == "train":
        monkeypatch.setattr(loop, "train", boom)
        argv = [f"run_dir={tmp_path}"]
        main = train_cli.main
    else:
        monkeypatch.setattr(eval_cli, "build_parser", boom)
        argv, main = ["perplexity"], eval_cli.main
    monkeypatch.delenv("TPA_JAX_DEBUG", raising=False)
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.splitlines() == ["error: RuntimeError: disk on fire"] and "Traceback" not in err
    monkeypatch.setenv("TPA_JAX_DEBUG", "1")
    with pytest.raises(RuntimeError, match="disk on fire"):
        main(argv)
