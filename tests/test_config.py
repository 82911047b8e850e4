import dataclasses

import pytest

import tpa_jax
from tpa_jax import ModelConfig
from tpa_jax import configs

GOOD = dict(vocab_size=256, n_layer=2, d_model=64, n_head=4, head_dim=16)

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


@pytest.mark.parametrize("kwargs,field", BAD, ids=[f"{f}-{i}" for i, (_, f) in enumerate(BAD)])
def test_invalid_config_one_line_error_naming_field(kwargs, field):
    with pytest.raises(ValueError) as e:
        ModelConfig(**{**GOOD, **kwargs})
    msg = str(e.value)
    assert f"ModelConfig.{field}" in msg
    assert "\n" not in msg


def test_replace_revalidates():
    cfg = ModelConfig(**GOOD)
    with pytest.raises(ValueError, match="ModelConfig.n_head"):
        dataclasses.replace(cfg, n_head=0)


def test_json_round_trip_and_unknown_fields():
    cfg = configs.get("mla-small")
    assert ModelConfig.from_json(cfg.to_json()) == cfg
    with pytest.raises(ValueError, match="unknown field"):
        ModelConfig.from_dict({**GOOD, "n_heads": 4})


def test_derived_sizes():
    cfg = ModelConfig(**GOOD)
    assert cfg.ffn_dim == 170  # floor(8/3 * 64), as the official SwiGLU
    assert configs.get("t6-small").ffn_dim == 2048
    mla = configs.get("mla-small")
    assert (mla.qk_dim, mla.value_dim, mla.rope_dim) == (96, 64, 32)
    assert abs(mla.attn_scale - 96 ** -0.5) < 1e-12
    t3 = ModelConfig(**GOOD, tpa_order=3, tpa_c_dim=4)
    assert (t3.b_dim, t3.rope_dim) == (4, 4)
    assert configs.get("gqa-small").kv_heads == 2 and configs.get("mqa-small").kv_heads == 1


def test_named_configs_follow_the_paper():
    # Table 9 sizes, Table 10 heads, App. H.1 settings
    expect = {"small": (12, 768, 34, 22, 12, 23, 22, 12), "medium": (24, 1024, 47, 29, 16, 31, 30, 23),
              "large": (36, 1280, 61, 37, 20, 39, 38, 34), "xl": (48, 1600, 78, 47, 25, 49, 48, 49)}
    for size, (layers, d, t6, kvonly, mha, mqa, gqa, mla) in expect.items():
        fam = configs.family(size)
        assert all(c.n_layer == layers and c.d_model == d and c.head_dim == 64 for c in fam.values())
        heads = [fam[m].n_head for m in ("t6", "t6-kvonly", "mha", "mqa", "gqa", "mla")]
        assert heads == [t6, kvonly, mha, mqa, gqa, mla]
        assert (fam["t6"].q_rank, fam["t6"].k_rank, fam["t6"].v_rank) == (6, 2, 2)
        assert fam["gqa"].n_kv_head == 2 and fam["mla"].rope_head_dim == 32
    assert configs.get("mla-small").kv_lora_rank == 256 and configs.get("mla-small").q_lora_rank == 512
    assert configs.get("mla-xl").kv_lora_rank == 512 and configs.get("mla-xl").q_lora_rank == 1024
    with pytest.raises(ValueError, match="unknown model config"):
        configs.get("t7-small")
    assert tpa_jax.configs.get("t6-tiny", compute_dtype="float32").compute_dtype == "float32"
