"""train.py's discoverable settings: --help lists every config field with its type and default,
grouped; --print-config prints the resolved config as JSON and exits 0 without writing anything."""
import dataclasses
import json

import pytest

from tpa_jax.config import TrainConfig
from tpa_jax.configs import load_train_config
from tpa_jax.train.cli import main

from _util import ROOT


def test_help_lists_every_field_grouped(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: tpa-train")
    top = TrainConfig()
    for f in dataclasses.fields(top):
        sub = getattr(top, f.name)
        if dataclasses.is_dataclass(sub):
            assert f"  {f.name}:\n" in out
            for g in dataclasses.fields(sub):
                assert f"    {f.name}.{g.name}: {g.type} = {getattr(sub, g.name)!r}\n" in out
        else:
            assert f"    {f.name}: {f.type} = {sub!r}\n" in out


def test_print_config_resolves_without_writing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["model.n_layer=3", "model=mha-tiny", "steps=5", f"run_dir={tmp_path / 'run'}"]
    assert main(["--print-config", *args]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == load_train_config(None, args).to_dict()
    packaged = json.load(open(ROOT / "tpa_jax" / "train_configs" / "t6-tiny.json"))  # read independently
    assert (printed["optim"]["lr"], printed["eval_every"], printed["data"]["seq_len"]) == (
        packaged["optim"]["lr"], packaged["eval_every"], packaged["data"]["seq_len"])
    assert printed["model"]["attention"] == "mha" and printed["model"]["n_layer"] == 3  # model= applied first
    assert list(tmp_path.iterdir()) == []
