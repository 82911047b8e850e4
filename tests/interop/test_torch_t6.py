"""Parity with the official PyTorch TPA code: converted checkpoints reproduce its logits and losses.

Fixtures (tests/fixtures/official_t6, see its README) were produced by the official model files run
with torch on CPU in float32; the "sharp" weights make RoPE and layout mistakes move logits by ~10.
"""
import dataclasses
import functools
import json

import jax
import numpy as np
import pytest

import tpa_jax
from tpa_jax.config import FLOAT32_EPS
from tpa_jax.interop import torch_t6
from tpa_jax.model.rope import inv_frequencies, rope_tables
from _util import FIXTURES_DIR

FIXTURES = FIXTURES_DIR / "official_t6"

SHARP = {  # fixture -> official arch
    "T6_sharp": "T6",
    "T6_kvonly_sharp": "T6_kvonly",
    "T6_groupnorm_sharp": "T6",
    "llama_mha_sharp": "llama-mha",
    "llama_gqa_sharp": "llama-gqa",
    "llama_mla_sharp": "llama-mla",
}
ATTENTION = {"T6": "tpa", "T6_kvonly": "tpa_kvonly", "llama-mha": "mha", "llama-gqa": "gqa", "llama-mla": "mla"}

LOGITS_TOL = 1e-4
LOSS_TOL = 1e-5


@functools.lru_cache(maxsize=None)
def load(name):
    with np.load(FIXTURES / f"{name}.npz") as z:
        arrays = {k: z[k] for k in z.files}
    meta = json.loads((FIXTURES / f"{name}.json").read_text())
    state_dict = {k: v for k, v in arrays.items() if k.startswith("transformer.") or k == "lm_head.weight"}
    return state_dict, meta, arrays


def run(cfg, params, input_ids):
    return np.asarray(tpa_jax.logits_fn(cfg)(params, input_ids))


@functools.lru_cache(maxsize=None)
def converted(name):
    state_dict, meta, _ = load(name)
    return torch_t6.convert(state_dict, meta["config"], SHARP[name])


def assert_parity(cfg, params, arrays):
    logits = run(cfg, params, arrays["input_ids"])
    assert logits.dtype == np.float32 and logits.shape == arrays["logits"].shape
    dlogits = float(np.abs(logits - arrays["logits"]).max())
    loss = float(tpa_jax.cross_entropy(logits, arrays["targets"]))
    loss_masked = float(tpa_jax.cross_entropy(logits, arrays["targets_masked"], ignore_index=-1))
    dloss = abs(loss - float(arrays["loss"]))
    dloss_masked = abs(loss_masked - float(arrays["loss_masked"]))
    assert dlogits <= LOGITS_TOL, f"max |dlogits| = {dlogits:.3g}"
    assert dloss <= LOSS_TOL, f"|dloss| = {dloss:.3g}"
    assert dloss_masked <= LOSS_TOL, f"|dloss_masked| = {dloss_masked:.3g}"
    return dlogits


# ------------------------------------------------------------------------------------ parity
@pytest.mark.parametrize("name", list(SHARP))
def test_sharp_fixture_parity(name):
    _, meta, arrays = load(name)
    cfg, params = converted(name)
    assert_parity(cfg, params, arrays)


@pytest.mark.parametrize("name", list(SHARP))
def test_converted_config_uses_official_conventions(name):
    _, meta, _ = load(name)
    oc = meta["config"]
    cfg, _ = converted(name)
    assert cfg.attention == ATTENTION[SHARP[name]]
    assert (cfg.norm_weight, cfg.norm_eps, cfg.rope_bf16_tables) == (False, FLOAT32_EPS, True)
    assert (cfg.compute_dtype, cfg.param_dtype) == ("float32", "float32")
    assert cfg.attn_out_norm is oc["using_groupnorm"] and cfg.attn_out_norm_eps == 1e-5
    assert cfg.mla_norm_eps == 1e-6
    assert (cfg.vocab_size, cfg.n_layer, cfg.d_model, cfg.n_head) == (
        oc["vocab_size"], oc["n_layer"], oc["n_embd"], oc["n_head"])
    assert cfg.max_seq_len == oc["block_size"]
    assert cfg.ffn_dim == meta["derived"]["mlp_hidden"] == int(8 / 3 * oc["n_embd"])
    assert cfg.rope_dim == meta["derived"]["rope_dim"]
    if cfg.attention == "mha":
        assert cfg.head_dim == oc["n_embd"] // oc["n_head"]
    if cfg.attention == "gqa":
        assert cfg.n_kv_head == oc["n_head"] // oc["group_size"]
    if cfg.attention == "mla":
        assert (cfg.head_dim, cfg.rope_head_dim, cfg.v_head_dim, cfg.q_lora_rank, cfg.kv_lora_rank) == (
            oc["head_dim"], oc["qk_rope_head_dim"], oc["v_head_dim"], oc["q_lora_rank"], oc["kv_lora_rank"])


@pytest.mark.parametrize("name", ["T6_groupnorm_sharp", "llama_mla_sharp"])
def test_params_are_plain_arrays_in_the_init_tree(name):
    cfg, params = converted(name)
    want = jax.eval_shape(lambda key: tpa_jax.init_params(cfg, key), jax.random.key(0))
    assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(want)
    for got, spec in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(want)):
        assert isinstance(got, np.ndarray) and got.dtype == np.float32
        assert got.shape == spec.shape


def test_float32_rope_tables_break_parity():
    """The official bf16-rounded RoPE tables matter: float32 tables move sharp logits by > 1e-3."""
    _, _, arrays = load("T6_sharp")
    cfg, params = converted("T6_sharp")
    logits = run(dataclasses.replace(cfg, rope_bf16_tables=False), params, arrays["input_ids"])
    assert float(np.abs(logits - arrays["logits"]).max()) > 1e-3


# ------------------------------------------------------------------------------------ config defaults
def test_missing_config_fields_take_official_defaults():
    state_dict, meta, arrays = load("T6_sharp")
    partial = {k: v for k, v in meta["config"].items() if k not in ("q_rank", "block_size", "using_groupnorm")}
    cfg, params = torch_t6.convert(state_dict, partial, "T6")
    assert cfg.q_rank == 6 and cfg.max_seq_len == 1024 and cfg.attn_out_norm is False  # T6.GPTConfig defaults
    assert_parity(cfg, params, arrays)


def test_model_config_defaults_per_arch():
    t6 = torch_t6.model_config({}, "T6")
    assert (t6.vocab_size, t6.n_layer, t6.d_model, t6.n_head, t6.head_dim) == (50304, 12, 768, 22, 64)
    assert (t6.q_rank, t6.k_rank, t6.v_rank, t6.max_seq_len) == (6, 2, 2, 1024)
    assert torch_t6.official_defaults("T6_kvonly")["q_rank"] == 12  # present but unused by kv-only
    mha = torch_t6.model_config({}, "llama-mha")
    assert (mha.n_head, mha.head_dim) == (6, 128)  # n_embd // n_head, config head_dim ignored
    assert torch_t6.model_config({"head_dim": 7}, "llama-mha").head_dim == 128
    gqa = torch_t6.model_config({}, "llama-gqa")
    assert (gqa.attention, gqa.n_head, gqa.n_kv_head, gqa.head_dim) == ("gqa", 24, 6, 64)
    mqa = torch_t6.model_config({"n_head": 8, "group_size": 8}, "llama-gqa")  # the official MQA runs
    assert (mqa.attention, mqa.n_kv_head) == ("gqa", 1)
    mla = torch_t6.model_config({}, "llama-mla")
    assert (mla.n_head, mla.head_dim, mla.rope_head_dim, mla.v_head_dim, mla.q_lora_rank, mla.kv_lora_rank) == (
        13, 64, 32, 64, 512, 256)


# ------------------------------------------------------------------------------------ key handling
def test_tied_head_under_either_name_and_compile_prefix():
    state_dict, meta, arrays = load("llama_gqa_sharp")
    only_head = {k: v for k, v in state_dict.items() if k != "transformer.wte.weight"}
    cfg, params = torch_t6.convert(only_head, meta["config"], "llama-gqa")
    _, ref = converted("llama_gqa_sharp")
    np.testing.assert_array_equal(params["embed"]["embedding"], ref["embed"]["embedding"])
    prefixed = {"_orig_mod." + k: v for k, v in state_dict.items() if k != "lm_head.weight"}
    _, params2 = torch_t6.convert(prefixed, meta["config"], "llama-gqa")
    jax.tree_util.tree_map(np.testing.assert_array_equal, params2, ref)


# ------------------------------------------------------------------------------------ errors
def test_unknown_arch():
    state_dict, meta, _ = load("T6_sharp")
    with pytest.raises(ValueError, match=r"unknown arch 'T7'") as e:
        torch_t6.convert(state_dict, meta["config"], "T7")
    assert "\n" not in str(e.value)


def test_missing_key():
    state_dict, meta, _ = load("T6_sharp")
    key = "transformer.h.1.attn.c_qkv.W_B_k.weight"
    broken = {k: v for k, v in state_dict.items() if k != key}
    with pytest.raises(ValueError, match=r"missing key 'transformer\.h\.1\.attn\.c_qkv\.W_B_k\.weight'") as e:
        torch_t6.convert(broken, meta["config"], "T6")
    assert "(32, 64)" in str(e.value) and "\n" not in str(e.value)
    no_embed = {k: v for k, v in state_dict.items() if k not in ("transformer.wte.weight", "lm_head.weight")}
    with pytest.raises(ValueError, match=r"missing key 'transformer\.wte\.weight'"):
        torch_t6.convert(no_embed, meta["config"], "T6")


def test_wrong_shape():
    state_dict, meta, _ = load("llama_mla_sharp")
    key = "transformer.h.0.attn.kv_b_proj.weight"
    broken = dict(state_dict, **{key: state_dict[key][:-1]})
    with pytest.raises(ValueError, match=r"'transformer\.h\.0\.attn\.kv_b_proj\.weight'.*expected shape \(112, 24\)"
                                         r".*got \(111, 24\)") as e:
        torch_t6.convert(broken, meta["config"], "llama-mla")
    assert "\n" not in str(e.value)


def test_config_that_does_not_match_the_weights():
    state_dict, meta, _ = load("T6_sharp")
    with pytest.raises(ValueError, match=r"W_A_q\.weight'.*expected shape \(48, 64\).*got \(36, 64\)"):
        torch_t6.convert(state_dict, dict(meta["config"], q_rank=8), "T6")
    # llama-gqa without group_size takes the class default 4, which does not divide n_head=6
    state_dict, meta, _ = load("llama_gqa_sharp")
    partial = {k: v for k, v in meta["config"].items() if k != "group_size"}
    with pytest.raises(ValueError, match=r"official_config\['group_size'\].*divisor of n_head=6, got 4"):
        torch_t6.convert(state_dict, partial, "llama-gqa")


def test_unexpected_and_inconsistent_keys():
    state_dict, meta, _ = load("T6_groupnorm_sharp")
    no_norm = dict(meta["config"], using_groupnorm=False)
    with pytest.raises(ValueError, match=r"unexpected key\(s\) \['transformer\.h\.0\.attn\.subln\.weight'"):
        torch_t6.convert(state_dict, no_norm, "T6")
    untied = dict(state_dict, **{"lm_head.weight": state_dict["lm_head.weight"] + 1})
    with pytest.raises(ValueError, match=r"'lm_head\.weight'\] differs from 'transformer\.wte\.weight'"):
        torch_t6.convert(untied, meta["config"], "T6")
    with pytest.raises(ValueError, match=r"official_config\['n_head'\]: expected an integer >= 1"):
        torch_t6.convert(state_dict, dict(meta["config"], n_head=None), "T6")


# ------------------------------------------------------------------------------------ RoPE tables
ROPE_DIMS = (8, 16, 32, 64, 128)


@pytest.mark.parametrize("dim", ROPE_DIMS)
def test_inv_frequencies_match_torch(dim):
    with np.load(FIXTURES / "rope_tables.npz") as z:
        ref = z[f"inv_freq.{dim}"]
    np.testing.assert_array_equal(inv_frequencies(dim).view(np.uint32), ref.view(np.uint32))


@pytest.mark.parametrize("dim", ROPE_DIMS)
def test_bf16_rope_tables_match_official(dim):
    """rope_tables(bf16_round=True) is bit-identical to torch's bf16 tables for positions 0..1023."""
    with np.load(FIXTURES / "rope_tables.npz") as z:
        ref = {"cos": z[f"cos_bf16bits.{dim}"], "sin": z[f"sin_bf16bits.{dim}"]}
    cos, sin = rope_tables(np.arange(1024, dtype=np.int32), dim, bf16_round=True)
    for name, table in (("cos", cos), ("sin", sin)):
        bits = np.asarray(table, np.float32).view(np.uint32)
        assert bits.shape == (1024, dim // 2)
        assert not (bits & 0xFFFF).any(), f"{name}: values are not bf16-representable"
        mismatches = int(((bits >> 16).astype(np.uint16) != ref[name]).sum())
        assert mismatches == 0, f"{name}, dim {dim}: {mismatches} bf16 entries differ from torch"
