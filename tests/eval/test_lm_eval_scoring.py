"""Scoring helpers of the lm-eval adapter: padded lengths and rolling prediction windows (the
scores themselves are checked against explicit forward passes in test_lm_eval_adapter.py)."""
import pytest

from tpa_jax.eval.lm_eval_scoring import MIN_BUCKET, bucket, next_pow2, rolling_windows


@pytest.mark.parametrize("n, expected", [(0, 1), (1, 1), (2, 2), (3, 4), (8, 8), (9, 16), (1000, 1024)])
def test_next_pow2(n, expected):
    assert next_pow2(n) == expected


def test_bucket_is_a_power_of_two_between_the_minimum_and_max_length():
    assert MIN_BUCKET == 8
    assert [bucket(n, 32) for n in (1, 8, 9, 16, 17, 32)] == [8, 8, 16, 16, 32, 32]
    assert bucket(20, 24) == 24 and bucket(3, 4) == 4  # capped at max_length


def test_rolling_windows_partition():
    toks = list(range(34))
    wins = rolling_windows(toks, -1, 10)
    assert [t for _, tgt in wins for t in tgt] == toks  # every token predicted once, in order
    assert wins[0] == ([-1] + toks[:9], toks[:10])
    assert wins[1] == (toks[9:19], toks[10:20])
    assert wins[-1] == (toks[23:33], toks[30:34])
    for inp, tgt in wins:  # each target is the next token after its input position
        assert len(inp) <= 10 and len(tgt) <= len(inp)
        assert inp[-len(tgt):][1:] == tgt[:-1]


def test_rolling_windows_edges():
    assert rolling_windows([], 0, 4) == []
    assert rolling_windows([5, 6], 9, 4) == [([9, 5], [5, 6])]
    assert rolling_windows([5, 6, 7], 9, 1) == [([9], [5]), ([5], [6]), ([6], [7])]
    with pytest.raises(ValueError, match="window must be >= 1"):
        rolling_windows([1], 0, 0)
