"""``python -m tpa_jax.data.prepare`` (tpa_jax.data.prepare): the manifest path and token counts
as one JSON line; exit status 1 with one error line on bad input."""
import json

from tpa_jax.data import load_manifest
from tpa_jax.data.prepare import main
from _data_util import random_docs


def test_cli_prepare(tmp_path, capsys):
    for i, t in enumerate(random_docs(6, seed=3)):
        (tmp_path / f"f{i}.txt").write_text(t)
    rc = main(["--source", "files", "--files", str(tmp_path), "--out", str(tmp_path / "o"), "--val-fraction", "0.3"])
    assert rc == 0
    info = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    m = load_manifest(info["manifest"])
    assert info["tokens"] == {s: sp["tokens"] for s, sp in m["splits"].items()}
    assert (info["tokenizer"], info["dtype"]) == ("byte", "uint16")
    assert sum(info["tokens"].values()) == sum(len(t) + 2 for t in random_docs(6, seed=3))
    assert main(["--source", "files", "--files", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "missing.txt" in err
