"""Generation and ``Run.logits`` without recompiling: lengths are bucketed (next power of two with a
floor), ``max_new_tokens`` is a traced bound, and compilations are counted through
``jax.monitoring`` (``count_compiles``), not timed."""
import dataclasses

import jax
import numpy as np
import pytest

import tpa_jax
from tpa_jax.config import TrainConfig
from tpa_jax.data.tokenizers import load_tokenizer
from tpa_jax.inference import generate
from tpa_jax.inference.generate import count_compiles, length_bucket
from tpa_jax.run import Run

from _util import cfg_of, init_params


def test_length_bucket():
    assert [length_bucket(n, 16) for n in (1, 15, 16, 17, 31, 32, 33, 100)] == [16, 16, 16, 32, 32, 32, 64, 128]
    assert [length_bucket(n, 1) for n in (1, 2, 3, 5, 8, 9)] == [1, 2, 4, 8, 8, 16]
    assert length_bucket(300, 64, cap=400) == 400 and length_bucket(100, 64, cap=400) == 128
    assert length_bucket(500, 64, cap=400) == 500  # a need above the cap is not cut


@pytest.fixture(scope="module")
def model():
    # a config of this file's own, so that no other test has compiled its programs already
    cfg = cfg_of("tpa", n_layer=1, max_seq_len=200, vocab_size=89)
    return cfg, init_params(cfg, seed=3)[1]


def _generate_counted(params, cfg, prompts, n, **kw):
    with count_compiles() as c:
        out = generate(params, cfg, prompts, n, **kw)
    return out, c


def test_same_bucket_compiles_nothing(model):
    cfg, params = model
    rng = np.random.default_rng(0)
    first, c1 = _generate_counted(params, cfg, [rng.integers(0, 89, 5).tolist()], 10)
    assert c1.count >= 1 and any("_generate" in n for n in c1.names)
    # another prompt length in the same bucket (16), fewer or more new tokens in the same bucket (16)
    for k, n in ((9, 10), (16, 3), (2, 16), (11, 7)):
        _, c = _generate_counted(params, cfg, [rng.integers(0, 89, k).tolist()], n)
        assert c.count == 0, (k, n, c.names)
    # sampling settings that are traced: temperature, top_p, seed
    _, c = _generate_counted(params, cfg, [[1, 2, 3]], 9, temperature=0.7, top_p=0.9, seed=1)
    _, c2 = _generate_counted(params, cfg, [[1, 2, 3, 4]], 12, temperature=1.3, top_p=0.5, seed=9)
    assert c2.count == 0
    # a new bucket compiles again: a 17-token prompt, or 17 new tokens
    _, c = _generate_counted(params, cfg, [rng.integers(0, 89, 17).tolist()], 10)
    assert any("_generate" in n for n in c.names)
    _, c = _generate_counted(params, cfg, [[4, 5]], 17)
    assert any("_generate" in n for n in c.names)


@pytest.mark.parametrize("sampling", [{}, dict(temperature=0.9, top_k=20, seed=4)])
def test_fewer_new_tokens_is_a_prefix_of_more(model, sampling):
    """The traced bound stops the loop at max_new_tokens; the tokens before it do not depend on it
    (each step's key is folded from the step index), across buckets too."""
    cfg, params = model
    prompts = [[3, 1, 4, 1, 5], [9, 2, 6]]
    full = generate(params, cfg, prompts, 40, **sampling)
    for n in (1, 5, 16, 17, 33):
        out = generate(params, cfg, prompts, n, **sampling)
        assert out.tokens.shape == (2, n)
        np.testing.assert_array_equal(out.tokens, full.tokens[:, :n])
        np.testing.assert_array_equal(out.lengths, np.minimum(full.lengths, n))


def test_run_logits_bucketed_equals_the_exact_length_forward(model):
    cfg, params = model
    cfg = dataclasses.replace(cfg, vocab_size=256)
    params = init_params(cfg, seed=5)[1]
    run = Run(config=cfg, params=params, tokenizer=load_tokenizer("byte"), train_config=TrainConfig(model=cfg),
              step=0, checkpoint_dir="")
    fwd = jax.jit(tpa_jax.logits_fn(cfg))
    rng = np.random.default_rng(1)
    counts = {}
    for t in (5, 9, 16, 17, 30, 3):
        ids = rng.integers(0, 256, (2, t)).astype(np.int32)
        with count_compiles() as c:
            got = run.logits(ids)
        counts[t] = c.count
        assert got.shape == (2, t, 256)
        np.testing.assert_allclose(got, np.asarray(fwd(params, ids)), rtol=1e-5, atol=1e-5)
    assert counts[9] == counts[16] == counts[30] == counts[3] == 0 and counts[5] >= 1 and counts[17] >= 1
    assert run.logits([1, 2, 3]).shape == (1, 3, 256)
    with pytest.raises(ValueError, match="length 201 outside 1..max_seq_len=200"):
        run.logits(np.zeros((1, 201), np.int32))
