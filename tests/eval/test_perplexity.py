"""perplexity(run): the token-weighted mean next-token loss over the full batches of a held-out
split, against an explicit log-softmax over windows read straight from the shard files."""
import json
import math
import os
import shutil
import types

import jax
import numpy as np
import pytest

import tpa_jax
from tpa_jax.config import DataConfig, TrainConfig
from tpa_jax.data import ByteTokenizer, load_manifest, prepare_files
from tpa_jax.eval.perplexity import perplexity
from _util import cfg_of, init_params

SEQ = 16
TEXTS = {"a.txt": "def f(x):\n    return x * 2\n" * 6, "b.txt": "class B:\n    pass\n" * 9,
         "c.txt": "import os\nprint(os.getcwd())\n" * 5}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    d = tmp_path_factory.mktemp("ppl")
    for name, text in TEXTS.items():
        (d / name).write_text(text)
    manifest = prepare_files([d / n for n in TEXTS], d / "shards", "byte", val_fraction=0.01)
    cfg = cfg_of("tpa", vocab_size=256, max_seq_len=32)
    _, params = init_params(cfg, seed=2)
    tcfg = TrainConfig(model=cfg, data=DataConfig(source="manifest", path=str(manifest), seq_len=SEQ))
    run = types.SimpleNamespace(config=cfg, params=params, train_config=tcfg, step=7, tokenizer=ByteTokenizer())
    return types.SimpleNamespace(run=run, manifest=str(manifest), fwd=jax.jit(tpa_jax.logits_fn(cfg)))


def split_tokens(manifest, split):
    """The split's tokens, concatenated from its shard files as stored."""
    m = load_manifest(manifest)
    dtype = np.dtype(m["dtype"]).newbyteorder("<")
    return np.concatenate([np.fromfile(os.path.join(m["root"], f["path"]), dtype=dtype)
                           for f in m["splits"][split]["files"]]).astype(np.int64)


def explicit_loss(env, split, seq, batch_size, max_batches=None):
    """(mean loss, tokens, batches): windows of seq + 1 tokens starting every seq tokens, full
    batches only, every position of every window scored."""
    toks = split_tokens(env.manifest, split)
    n_windows = (len(toks) - 1) // seq
    batches = n_windows // batch_size if max_batches is None else min(n_windows // batch_size, max_batches)
    windows = np.stack([toks[i * seq: i * seq + seq + 1] for i in range(batches * batch_size)])
    logits = np.asarray(env.fwd(env.run.params, windows[:, :-1].astype(np.int32)), np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, windows[:, 1:, None], -1)[..., 0]
    return float(nll.mean()), nll.size, batches


def test_default_data_is_the_runs_own_validation_split(env):
    res = perplexity(env.run, batch_size=2)
    loss, tokens, batches = explicit_loss(env, "val", SEQ, 2)
    assert batches >= 2, "the validation split should hold a few batches"
    assert (res["tokens"], res["batches"], res["seq_len"], res["split"], res["step"]) == (tokens, batches, SEQ,
                                                                                           "val", 7)
    np.testing.assert_allclose(res["loss"], loss, rtol=1e-5)
    np.testing.assert_allclose(res["ppl"], math.exp(loss), rtol=1e-5)


def test_explicit_manifest_split_seq_len_and_max_batches(env):
    res = perplexity(env.run, env.manifest, split="train", seq_len=SEQ, batch_size=2, max_batches=3)
    loss, tokens, batches = explicit_loss(env, "train", SEQ, 2, max_batches=3)
    assert (res["tokens"], res["batches"]) == (tokens, batches) == (3 * 2 * SEQ, 3)
    np.testing.assert_allclose(res["loss"], loss, rtol=1e-5)


def test_a_window_longer_than_the_model_is_refused(env):
    with pytest.raises(ValueError, match="exceeds the model's max_seq_len 32"):
        perplexity(env.run, seq_len=64)


def retokenized(src_manifest, dst, tokenizer):
    """A copy of the prepared shards whose manifest says another tokenizer made them."""
    shutil.copytree(os.path.dirname(src_manifest), dst)
    path = os.path.join(dst, "manifest.json")
    m = json.load(open(path))
    m["tokenizer"] = tokenizer
    json.dump(m, open(path, "w"))
    return path


@pytest.mark.parametrize("tok, what", [
    ({"kind": "hf", "name": "hf:tok.json", "sha256": "0" * 64, "vocab_size": 256}, "kind 'hf' vs 'byte'"),
    ({"kind": "byte", "name": "byte", "vocab_size": 200}, "vocab_size 200 vs 256"),
])
def test_data_from_another_tokenizer_is_refused_unless_allowed(env, tmp_path, tok, what):
    other = retokenized(env.manifest, tmp_path / "other", tok)
    with pytest.raises(ValueError, match="allow_tokenizer_mismatch") as e:
        perplexity(env.run, other, batch_size=2, max_batches=1)
    assert "\n" not in str(e.value) and what in str(e.value)
    res = perplexity(env.run, other, batch_size=2, max_batches=1, allow_tokenizer_mismatch=True)
    assert res["batches"] == 1 and math.isfinite(res["loss"])
