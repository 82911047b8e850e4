"""tpa_jax/configs.py: the named model configs against the paper (Tables 9, 10 and App. H.1 from
``paper_tables()``), the CPU-sized tiny/mini families, the packaged training configs, and reading
training configs from JSON files plus dotted overrides."""
import json
import os

import pytest

from _util import ROOT, paper_tables
from tpa_jax import configs
from tpa_jax.config import ModelConfig, TrainConfig

PAPER = paper_tables()
SIZES = tuple(PAPER["table9"])
MECHANISMS = {"t6": "tpa", "t6-kvonly": "tpa_kvonly", "mha": "mha", "mqa": "mqa", "gqa": "gqa", "mla": "mla"}


def _one_line_error(exc_type, fn, *args) -> str:
    with pytest.raises(exc_type) as e:
        fn(*args)
    msg = str(e.value)
    assert msg and "\n" not in msg, msg
    return msg


# ------------------------------------------------------------------------------- named model configs
@pytest.mark.parametrize("size", SIZES)
def test_named_configs_follow_the_paper(size):
    t9, t10 = PAPER["table9"][size], PAPER["table10"]
    fam = configs.family(size)
    assert {name: cfg.attention for name, cfg in fam.items()} == MECHANISMS
    for name, cfg in fam.items():
        assert configs.get(f"{name}-{size}") == cfg
        assert (cfg.n_layer, cfg.d_model) == (t9["n_layer"], t9["d_model"])  # Table 9
        assert cfg.n_head == t10["heads"][cfg.attention][size]  # Table 10
        assert cfg.head_dim == PAPER["head_dim"]  # H.1
        if cfg.is_tpa:
            ranks = PAPER["tpa_ranks"]
            assert (cfg.k_rank, cfg.v_rank) == (ranks["k"], ranks["v"])
            if cfg.attention == "tpa":
                assert cfg.q_rank == ranks["q"]
    assert fam["gqa"].n_kv_head == PAPER["gqa_kv_heads"]
    mla = fam["mla"]
    assert mla.rope_head_dim == PAPER["mla_rope_head_dim"] and mla.value_dim == PAPER["head_dim"]
    assert (mla.kv_lora_rank, mla.q_lora_rank) == (t10["mla_kv_lora_rank"][size], t10["mla_q_lora_rank"][size])


def test_names_get_and_overrides():
    sizes = (*SIZES, "tiny", "mini")
    assert sorted(configs.names()) == sorted(f"{m}-{s}" for m in MECHANISMS for s in sizes)
    for name in configs.names():
        assert isinstance(configs.get(name), ModelConfig)
    cfg = configs.get("t6-tiny", compute_dtype="float32", n_layer=3)
    assert (cfg.compute_dtype, cfg.n_layer) == ("float32", 3)
    assert configs.replace(cfg, n_layer=5).n_layer == 5
    assert {c.compute_dtype for c in configs.family("mini", compute_dtype="float32").values()} == {"float32"}
    assert "ModelConfig.n_head" in _one_line_error(ValueError, lambda: configs.get("t6-tiny", n_head=0))
    for bad in ("t7-small", "t6-huge", "t6", "mla-tiny-x"):
        msg = _one_line_error(ValueError, configs.get, bad)
        assert "unknown model config" in msg and repr(bad) in msg and "t6-small" in msg


@pytest.mark.parametrize("size", ["tiny", "mini"])
def test_cpu_families(size):
    """Every mechanism at one CPU size: byte vocabulary, the same depth / width / head_dim, MLA's
    RoPE part half a head; the head counts are checked for parameter matching in test_accounting."""
    fam = configs.family(size)
    assert {name: cfg.attention for name, cfg in fam.items()} == MECHANISMS
    shape = {(c.vocab_size, c.n_layer, c.d_model, c.head_dim, c.max_seq_len) for c in fam.values()}
    assert len(shape) == 1
    vocab, _, d_model, head_dim, _ = shape.pop()
    assert vocab == 256 and fam["mha"].n_head * head_dim == d_model
    assert fam["mqa"].kv_heads == 1 and fam["gqa"].kv_heads == 2
    assert fam["mla"].rope_head_dim == head_dim // 2
    assert fam["mla"].kv_lora_rank < fam["mla"].q_lora_rank < d_model


# ------------------------------------------------------------------------------- packaged training configs
@pytest.mark.parametrize("size", SIZES)
def test_packaged_training_configs_follow_h1(size):
    """The packaged t6-{size} config: App. H.1's optimiser and schedule, Table 9's accumulation steps."""
    cfg = configs.load_train_config(f"t6-{size}")
    t9, lrs = PAPER["table9"][size], PAPER["h1_learning_rates"][size]
    assert cfg.model == configs.get(f"t6-{size}", vocab_size=None)  # training takes the tokenizer's
    assert (cfg.optim.lr, cfg.optim.min_lr) == (lrs["lr"], lrs["min_lr"])
    assert (cfg.optim.b1, cfg.optim.b2, cfg.optim.weight_decay, cfg.optim.grad_clip) == (0.9, 0.95, 0.1, 1.0)
    assert cfg.optim.warmup_steps == 2000 and cfg.batch_size == 480  # H.1: global batch 480
    assert cfg.optim.accum_steps == t9["grad_accum"]
    per_step = cfg.batch_size // cfg.optim.accum_steps  # micro batch x devices
    assert per_step % t9["micro_batch"] == 0 and cfg.data.seq_len == 1024


# ------------------------------------------------------------------------------- files and overrides
def _write(tmp_path, obj, name="cfg.json"):
    path = tmp_path / name
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return str(path)


def test_load_from_file_with_overrides(tmp_path):
    path = _write(tmp_path, {"model": "mha-tiny", "steps": 50, "optim": {"lr": 1e-3, "min_lr": 1e-4},
                             "data": {"seq_len": 64}})
    cfg = configs.load_train_config(path, ["steps=7", "optim.warmup_steps=3", "model.n_layer=3",
                                           "data.source=recall", "run_dir=out/x", "profile_steps=[1,2]"])
    assert isinstance(cfg, TrainConfig)
    assert cfg.model == configs.get("mha-tiny", n_layer=3, vocab_size=None)
    assert (cfg.steps, cfg.optim.lr, cfg.optim.min_lr, cfg.optim.warmup_steps) == (7, 1e-3, 1e-4, 3)
    assert (cfg.data.seq_len, cfg.data.source, cfg.run_dir, cfg.profile_steps) == (64, "recall", "out/x", (1, 2))
    assert configs.load_train_config(path) == configs.load_train_config(path, [])  # the file alone
    assert configs.load_train_config(path).steps == 50
    # a file whose model is a dict of fields
    fields = configs.get("gqa-tiny").to_dict()
    path = _write(tmp_path, {"model": fields}, "dict.json")
    assert configs.load_train_config(path, ["model.n_kv_head=1"]).model.n_kv_head == 1


@pytest.mark.parametrize("order", ["name_first", "name_last"])
def test_model_name_applies_before_model_fields(tmp_path, order):
    overrides = ["model=mla-tiny", "model.n_layer=4", "model.compute_dtype=float32"]
    if order == "name_last":
        overrides = overrides[1:] + overrides[:1]
    want = configs.get("mla-tiny", n_layer=4, compute_dtype="float32", vocab_size=None)
    assert configs.load_train_config(None, overrides).model == want
    path = _write(tmp_path, {"model": "t6-mini"})  # the override's name replaces the file's
    assert configs.load_train_config(path, overrides).model == want


def test_default_model_when_none_is_named(tmp_path):
    default = configs.get(configs.DEFAULT_MODEL, vocab_size=None)
    assert configs.load_train_config().model == default
    assert configs.load_train_config(None, ["steps=3"]).model == default
    assert configs.load_train_config(None, ["model.n_layer=5"]).model == configs.replace(default, n_layer=5)
    assert configs.load_train_config(_write(tmp_path, {"steps": 3})).model == default
    assert configs.train_config_from_dict({}).model == default
    assert configs.train_config_from_dict({"model": "mqa-tiny"}).model == configs.get("mqa-tiny", vocab_size=None)


def test_vocab_size_is_left_to_the_data_unless_set():
    """A named model leaves vocab_size unset (training fills it); an override or a model dict sets it."""
    assert configs.load_train_config(None, ["model=t6-small"]).model.vocab_size is None
    assert configs.load_train_config(None, ["model=t6-small", "model.vocab_size=32000"]).model.vocab_size == 32000
    assert configs.load_train_config(None, ["model.vocab_size=300", "model=t6-small"]).model.vocab_size == 300
    assert configs.train_config_from_dict({"model": configs.get("t6-tiny").to_dict()}).model.vocab_size == 256


def test_parse_value():
    assert [configs.parse_value(v) for v in ("3", "1e-3", "true", "null", "[1, 2]", '{"a": 1}')] == [
        3, 1e-3, True, None, [1, 2], {"a": 1}]
    assert configs.parse_value("mha-tiny") == "mha-tiny" and configs.parse_value("") == ""


def test_apply_overrides_leaves_its_input_alone():
    d = {"model": "t6-tiny", "optim": {"lr": 1e-3}}
    out = configs.apply_overrides(d, ["optim.lr=2e-3", "model.n_layer=3"])
    assert d == {"model": "t6-tiny", "optim": {"lr": 1e-3}}
    assert out["optim"]["lr"] == 2e-3 and out["model"]["n_layer"] == 3


def test_config_file_errors_are_one_line(tmp_path):
    missing = str(tmp_path / "missing.json")
    assert repr(missing) in _one_line_error(FileNotFoundError, configs.load_train_config, missing)
    assert "directory" in _one_line_error(ValueError, configs.load_train_config, str(tmp_path))
    bad = _write(tmp_path, '{"steps": 3,\n "model": }', "bad.json")
    msg = _one_line_error(ValueError, configs.load_train_config, bad)
    assert "invalid JSON" in msg and repr(bad) in msg
    assert "JSON object" in _one_line_error(ValueError, configs.load_train_config, _write(tmp_path, [1], "list.json"))
    unknown = _write(tmp_path, {"stepz": 3}, "unknown.json")
    assert "'stepz'" in _one_line_error(ValueError, configs.load_train_config, unknown)


@pytest.mark.parametrize("overrides,words", [
    (["steps.x=3"], ("steps.x", "'steps'", "not a group of fields")),  # a scalar the file does not set
    (["model.n_layer.x=3"], ("model.n_layer.x", "'n_layer'", "not a group of fields")),
    (["steps"], ("'steps'", "key.path=value")),
    (["model=t7-tiny"], ("unknown model config", "'t7-tiny'")),
    (["optim.lrr=1"], ("'optim.lrr'", "did you mean 'optim.lr'?")),
    (["model.n_heads=4"], ("'model.n_heads'", "did you mean 'model.n_head'?")),
    (["data.seq_len=100000"], ("TrainConfig.data.seq_len",)),
])
def test_override_errors_are_one_line(tmp_path, overrides, words):
    msg = _one_line_error(ValueError, configs.load_train_config, None, overrides)
    assert all(w in msg for w in words), msg
    # the same with a file that sets the scalar
    path = _write(tmp_path, {"steps": 600})
    msg = _one_line_error(ValueError, configs.load_train_config, path, overrides)
    assert all(w in msg for w in words), msg
    if overrides == ["steps.x=3"]:
        assert "600" in msg
