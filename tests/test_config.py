"""tpa_jax/config.py: the frozen dataclasses on their own (validation with one-line errors, derived
sizes, JSON round trips, TrainConfig built from dicts).  Named configs and config files are
tests/test_configs.py's."""
import dataclasses
import json

import pytest

from tpa_jax.config import DataConfig, MeshConfig, ModelConfig, OptimConfig, TrainConfig

GOOD = dict(vocab_size=256, n_layer=2, d_model=64, n_head=4, head_dim=16)
MLA = dict(attention="mla", q_lora_rank=24, kv_lora_rank=12, rope_head_dim=4)

BAD = [
    (dict(attention="flash"), "attention"),
    (dict(vocab_size=1), "vocab_size"),
    (dict(vocab_size=0), "vocab_size"),
    (dict(n_layer=0), "n_layer"),
    (dict(d_model=-4), "d_model"),
    (dict(n_head=0), "n_head"),
    (dict(head_dim=0), "head_dim"),
    (dict(head_dim=15), "head_dim"),  # odd with RoPE
    (dict(n_layer=2.5), "n_layer"),
    (dict(n_layer=True), "n_layer"),
    (dict(max_seq_len=0), "max_seq_len"),
    (dict(q_rank=0), "q_rank"),
    (dict(k_rank=0), "k_rank"),
    (dict(v_rank=-1), "v_rank"),
    (dict(attention="tpa_kvonly", k_rank=0), "k_rank"),
    (dict(attention="gqa", n_kv_head=3), "n_kv_head"),  # 4 % 3 != 0
    (dict(attention="gqa"), "n_kv_head"),  # missing
    (dict(attention="gqa", n_kv_head=0), "n_kv_head"),
    (dict(attention="mqa", n_kv_head=2), "n_kv_head"),
    (dict(attention="mha", n_kv_head=2), "n_kv_head"),
    (dict(attention="mla", kv_lora_rank=8, rope_head_dim=8), "q_lora_rank"),
    (dict(attention="mla", q_lora_rank=8, rope_head_dim=8), "kv_lora_rank"),
    (dict(attention="mla", q_lora_rank=8, kv_lora_rank=8), "rope_head_dim"),
    (dict(attention="mla", q_lora_rank=8, kv_lora_rank=8, rope_head_dim=5), "rope_head_dim"),
    (dict(attention="mla", q_lora_rank=8, kv_lora_rank=8, rope_head_dim=4, v_head_dim=0), "v_head_dim"),
    (dict(v_head_dim=8), "v_head_dim"),
    (dict(compute_dtype="float8"), "compute_dtype"),
    (dict(param_dtype="int8"), "param_dtype"),
    (dict(norm_eps=0.0), "norm_eps"),
    (dict(norm_eps=float("nan")), "norm_eps"),
    (dict(rope_theta=-1.0), "rope_theta"),
    (dict(remat_policy="some"), "remat_policy"),
    (dict(mlp_hidden=0), "mlp_hidden"),
    (dict(decode_impl="fast"), "decode_impl"),
    (dict(decode_block_size=0), "decode_block_size"),
    (dict(decode_impl="pallas", decode_block_size=12), "decode_block_size"),
    (dict(prefill_q_block_size=0), "prefill_q_block_size"),
    (dict(shared_kv_b=True, k_rank=2, v_rank=3), "shared_kv_b"),
    (dict(tpa_order=4), "tpa_order"),
    (dict(tpa_order=3), "tpa_c_dim"),
    (dict(tpa_order=3, tpa_c_dim=3), "tpa_c_dim"),  # does not divide 16
    (dict(tpa_order=3, tpa_c_dim=16), "tpa_c_dim"),  # d_b = 1 is odd
    (dict(tpa_order=3, tpa_c_dim=2, contextual_a=False), "tpa_order"),
    (dict(attention="tpa_kvonly", tpa_order=3, tpa_c_dim=2), "tpa_order"),
    (dict(head_factor_activation="relu"), "head_factor_activation"),
    (dict(factor_init="he"), "factor_init"),
    (dict(attention="mha", contextual_a=False), "contextual_a"),
    (dict(attention="mha", head_factor_activation="softmax"), "head_factor_activation"),
]


def _one_line_error(exc_type, fn, *args, **kwargs) -> str:
    with pytest.raises(exc_type) as e:
        fn(*args, **kwargs)
    msg = str(e.value)
    assert msg and "\n" not in msg, msg
    return msg


@pytest.mark.parametrize("kwargs,field", BAD, ids=[f"{f}-{i}" for i, (_, f) in enumerate(BAD)])
def test_invalid_model_config_one_line_error_naming_field(kwargs, field):
    assert f"ModelConfig.{field}" in _one_line_error(ValueError, ModelConfig, **{**GOOD, **kwargs})


def test_replace_revalidates():
    cfg = ModelConfig(**GOOD)
    with pytest.raises(ValueError, match="ModelConfig.n_head"):
        dataclasses.replace(cfg, n_head=0)


def test_derived_sizes():
    cfg = ModelConfig(**GOOD)
    assert cfg.ffn_dim == 170  # floor(8/3 * 64), as the official SwiGLU
    assert ModelConfig(**{**GOOD, "d_model": 768}).ffn_dim == 2048
    assert ModelConfig(**GOOD, mlp_hidden=100).ffn_dim == 100
    assert (cfg.kv_heads, cfg.value_dim, cfg.qk_dim, cfg.b_dim, cfg.rope_dim) == (4, 16, 16, 16, 16)
    assert cfg.is_tpa and ModelConfig(**GOOD, attention="tpa_kvonly").is_tpa
    assert cfg.attn_scale == pytest.approx(16 ** -0.5, rel=1e-12)
    kv_heads = {"mha": 4, "mqa": 1, "gqa": 2, "tpa_kvonly": 4}
    for attention, want in kv_heads.items():
        extra = dict(n_kv_head=2) if attention == "gqa" else {}
        c = ModelConfig(**GOOD, attention=attention, **extra)
        assert c.kv_heads == want and (c.is_tpa == (attention == "tpa_kvonly")), attention
    mla = ModelConfig(**GOOD, **MLA, v_head_dim=8)  # qk over d_h + d^R_h; RoPE on d^R_h only
    assert (mla.kv_heads, mla.qk_dim, mla.value_dim, mla.rope_dim) == (4, 16 + 4, 8, 4)
    assert mla.attn_scale == pytest.approx(20 ** -0.5, rel=1e-12) and not mla.is_tpa
    assert ModelConfig(**GOOD, **MLA).value_dim == 16  # defaults to head_dim
    t3 = ModelConfig(**GOOD, tpa_order=3, tpa_c_dim=4)  # d_b = head_dim / d_c
    assert (t3.b_dim, t3.rope_dim, t3.qk_dim) == (4, 4, 16)


def test_model_config_json_round_trip_and_unknown_fields():
    for cfg in (ModelConfig(**GOOD), ModelConfig(**GOOD, **MLA, v_head_dim=8, compute_dtype="float32"),
                ModelConfig(**GOOD, tpa_order=3, tpa_c_dim=2, attn_out_norm=True)):
        text = cfg.to_json()
        assert json.loads(text) == cfg.to_dict() and ModelConfig.from_json(text) == cfg
    msg = _one_line_error(ValueError, ModelConfig.from_dict, {**GOOD, "n_heads": 4})
    assert "ModelConfig" in msg and "'n_heads'" in msg and "unknown field" in msg
    with pytest.raises(ValueError, match="ModelConfig.n_head"):
        ModelConfig.from_json(json.dumps({**GOOD, "n_head": 0}))


SUB_BAD = [
    (DataConfig, dict(source="web"), "DataConfig.source"),
    (DataConfig, dict(source="manifest"), "DataConfig.path"),
    (DataConfig, dict(seq_len=0), "DataConfig.seq_len"),
    (DataConfig, dict(recall_queries=9), "DataConfig.recall_queries"),
    (DataConfig, dict(recall_noise=1), "DataConfig.recall_noise"),
    (DataConfig, dict(source="recall", recall_keys=200), "DataConfig.recall_keys"),  # 1 + 200 + 128 > 256
    (DataConfig, dict(source="recall", seq_len=16), "DataConfig.seq_len"),  # 8 pairs + 8 queries need 31
    (OptimConfig, dict(lr=0), "OptimConfig.lr"),
    (OptimConfig, dict(weight_decay=-0.1), "OptimConfig.weight_decay"),
    (OptimConfig, dict(min_lr=1.0), "OptimConfig.min_lr"),
    (OptimConfig, dict(accum_steps=0), "OptimConfig.accum_steps"),
    (MeshConfig, dict(data=0), "MeshConfig.data"),
    (MeshConfig, dict(data=-1), "MeshConfig.fsdp"),  # two axes set to -1
    (TrainConfig, dict(steps=0), "TrainConfig.steps"),
    (TrainConfig, dict(batch_size=6, optim=OptimConfig(accum_steps=4)), "TrainConfig.batch_size"),
    (TrainConfig, dict(nan_policy="ignore"), "TrainConfig.nan_policy"),
    (TrainConfig, dict(data=DataConfig(seq_len=2048)), "TrainConfig.data.seq_len"),  # > max_seq_len
]


@pytest.mark.parametrize("cls,kwargs,field", SUB_BAD, ids=[f"{f}-{i}" for i, (_, _, f) in enumerate(SUB_BAD)])
def test_invalid_training_configs_one_line_error_naming_field(cls, kwargs, field):
    assert field in _one_line_error(ValueError, cls, **kwargs)


def test_train_config_from_dicts():
    cfg = TrainConfig.from_dict({"model": {**GOOD, "attention": "mha"}, "optim": {"lr": 1e-3, "min_lr": 1e-4},
                                 "data": {"seq_len": 32}, "mesh": {"fsdp": 2, "data": -1}, "steps": 7,
                                 "profile_steps": [2, 4]})
    assert cfg.model == ModelConfig(**GOOD, attention="mha")
    assert (cfg.optim.lr, cfg.optim.min_lr, cfg.optim.b2) == (1e-3, 1e-4, OptimConfig().b2)
    assert (cfg.data.seq_len, cfg.mesh, cfg.steps, cfg.profile_steps) == (32, MeshConfig(-1, 2, 1), 7, (2, 4))
    # the JSON round trip TrainConfig -> dict -> JSON -> TrainConfig is exact
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert TrainConfig.from_dict(json.loads(json.dumps(TrainConfig().to_dict()))) == TrainConfig()


@pytest.mark.parametrize("d,names", [
    ({"stepz": 3}, ("TrainConfig", "'stepz'")),
    ({"optim": {"lrr": 1e-3}}, ("OptimConfig", "'lrr'")),
    ({"data": {"seq_length": 64}}, ("DataConfig", "'seq_length'")),
    ({"mesh": {"tensors": 2}}, ("MeshConfig", "'tensors'")),
    ({"model": {**GOOD, "n_heads": 4}}, ("ModelConfig", "'n_heads'")),
])
def test_train_config_unknown_nested_keys_one_line_error(d, names):
    msg = _one_line_error(ValueError, TrainConfig.from_dict, d)
    assert "unknown field" in msg and all(n in msg for n in names), msg


def test_train_config_rejects_a_model_name():
    # names are resolved by tpa_jax.configs, never by the leaf config module
    msg = _one_line_error(ValueError, TrainConfig, model="t6-tiny")
    assert "TrainConfig.model" in msg and "'t6-tiny'" in msg and "tpa_jax.configs" in msg
    with pytest.raises(ValueError, match="TrainConfig.model"):
        TrainConfig.from_dict({"model": "t6-tiny"})
