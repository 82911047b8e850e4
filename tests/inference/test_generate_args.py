"""Generation arguments: ``seed`` must be an integer in 0..2**32-1 (one line), and a positive
temperature below ``GREEDY_BELOW`` samples greedily (the same tokens as temperature 0 and as a
full-forward argmax loop)."""
import numpy as np
import pytest

from tpa_jax.inference import generate
from tpa_jax.inference.generate import GREEDY_BELOW

from _util import cfg_of, init_params
from test_generate import greedy_reference


@pytest.fixture(scope="module")
def tpa():
    cfg = cfg_of("tpa")
    model, params = init_params(cfg)
    return cfg, model, params


@pytest.mark.parametrize("seed", [-1, 2**32, 1.5, True, "0", None])
def test_bad_seed_is_one_line(tpa, seed):
    cfg, _, params = tpa
    with pytest.raises(ValueError) as e:
        generate(params, cfg, [[1, 2, 3]], 2, temperature=1.0, seed=seed)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("seed:") and repr(seed) in msg


def test_edge_seeds_accepted(tpa):
    cfg, _, params = tpa
    for seed in (0, 2**32 - 1, np.int64(5)):
        assert generate(params, cfg, [[1, 2, 3]], 2, temperature=1.0, seed=seed).tokens.shape == (1, 2)


@pytest.mark.parametrize("temperature", [1e-50, 5e-324, GREEDY_BELOW / 2])
def test_tiny_temperature_is_greedy(tpa, temperature):
    cfg, model, params = tpa
    prompt = [7, 3, 11, 2]
    ref = greedy_reference(model, params, prompt, 6)
    out = generate(params, cfg, [prompt], 6, temperature=temperature, seed=3)
    assert out.tokens[0].tolist() == ref
    assert generate(params, cfg, [prompt], 6, temperature=0.0).tokens[0].tolist() == ref
