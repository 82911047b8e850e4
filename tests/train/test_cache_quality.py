"""Quality of the int8 decode cache on trained models: teacher-forced decoding through a float32
cache scores the validation split exactly as the plain forward does (``perplexity``, an independent
path), and through an int8 cache its perplexity stays within 0.5% of the float cache's -- for the
trained T6 (the reference run) and a trained MLA baseline (one scale per token for all of c_KV).  The
trained run also serves requests through ``load(dir).engine(...)``."""
import json

import jax
import numpy as np
import pytest

import tpa_jax
from tpa_jax import configs
from tpa_jax.config import MeshConfig
from tpa_jax.eval.cache_quality import cache_quality, decode_logits
from tpa_jax.eval.perplexity import perplexity
from tpa_jax.train import train

from _train_util import make_cfg

BATCHES = 2


@pytest.fixture(scope="module")
def trained_mla(tmp_path_factory, corpus):
    run = tmp_path_factory.mktemp("mla")
    model = configs.get("mla-tiny", compute_dtype="float32", max_seq_len=64)
    # one device: no collectives each step (tpa_jax.load restores it as it would an 8-device run)
    train(make_cfg(run, corpus, model=model, steps=16, save_every=16, mesh=MeshConfig(1, 1, 1)),
          devices=jax.devices()[:1], progress=False)
    return run


@pytest.mark.parametrize("which", ["t6", "mla"])
def test_int8_cache_perplexity_within_half_a_percent(which, straight, request):
    run_dir = straight[0] if which == "t6" else request.getfixturevalue("trained_mla")
    run = tpa_jax.load(run_dir)
    got = cache_quality(run, cache_dtypes=("float32", "int8"), batch_size=8, max_batches=BATCHES)
    f32, int8 = got["rows"]["float32"], got["rows"]["int8"]
    plain = perplexity(run, batch_size=8, max_batches=BATCHES)
    assert f32["tokens"] == int8["tokens"] == plain["tokens"] > 0
    np.testing.assert_allclose(f32["loss"], plain["loss"], rtol=1e-5)  # decoding through the cache == forward
    assert plain["loss"] < 0.8 * np.log(run.config.vocab_size)  # a trained model, far from uniform
    assert f32["max_abs_dlogits"] == 0.0 and 0.0 < int8["max_abs_dlogits"] < 0.5, got
    assert abs(int8["ppl_change"]) < 0.005, got


def test_decode_logits_follow_the_forward(straight):
    """Per position, not just on average: float32-cache decoding gives the forward's logits."""
    run = tpa_jax.load(straight[0])
    tokens = np.random.default_rng(0).integers(0, run.config.vocab_size, (2, 12))
    want = jax.jit(tpa_jax.logits_fn(run.config))(run.params, tokens)
    np.testing.assert_allclose(decode_logits(run.config, run.params, tokens, "float32"), want, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="cache dtype 'int4'"):
        decode_logits(run.config, run.params, tokens, "int4")


def test_eval_cli_cache_quality(straight, tmp_path, capsys):
    from tpa_jax.eval.cli import main

    out = tmp_path / "q.json"
    assert main(["cache-quality", "--checkpoint", str(straight[0]), "--max-batches", "1", "--out", str(out)]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res == json.loads(out.read_text()) and set(res["rows"]) == {"float32", "int8"} and res["batches"] == 1
    assert main(["cache-quality", "--checkpoint", str(straight[0]), "--cache-dtype", "float32", "int4"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: cache dtype 'int4'") and "\n" not in err


def test_a_loaded_run_serves_through_an_engine(straight):
    """``tpa_jax.load(dir).engine(...)``: the trained T6 (params sharded over 8 devices) served with an
    int8 paged cache gives each request what ``generate`` gives it alone."""
    run = tpa_jax.load(straight[0])
    eng = run.engine(max_batch=2, page_size=8, cache_dtype="int8", max_len=64, prefill_chunk=16)
    assert eng.num_pages == 2 * 8 and eng.cache_dtype == np.int8
    prompts = [run.encode(t) for t in ("def main(", "import numpy as np\n", "return")]
    ids = [eng.submit(p, 12) for p in prompts]
    out = eng.run_until_done()
    for rid, p in zip(ids, prompts):
        g = tpa_jax.generate(run.params, run.config, [p], 12, cache_dtype="int8")
        assert out[rid] == g.tokens[0, : g.lengths[0]].tolist()
    assert run.decode(out[ids[0]])
