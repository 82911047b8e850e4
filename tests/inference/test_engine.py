"""The continuous-batching engine (``tpa_jax.inference.Engine``): for 14 requests of ragged lengths
arriving at different steps, each request's tokens equal ``tpa_jax.generate`` on that request alone
(TPA and GQA greedy; TPA sampled and int8), prompts prefilled in chunks while others decode, FIFO
waiting when the pool is full, no recompilation as requests come and go, stop tokens, cancelling,
and the one-line errors, after which the engine carries on undisturbed."""
import jax
import numpy as np
import pytest

import tpa_jax
from tpa_jax.inference import Engine, count_compiles
from tpa_jax.inference.paged import page_bytes

from _util import cfg_of, init_params

SETTINGS = dict(max_batch=4, page_size=8, max_len=64, prefill_chunk=16)  # one compiled pair per config


@pytest.fixture(scope="module")
def models():
    return {name: (cfg_of(name), init_params(cfg_of(name))[1]) for name in ("tpa", "gqa")}


def _requests(cfg, n=14, seed=0):
    rng = np.random.default_rng(seed)
    return [(rng.integers(0, cfg.vocab_size, int(rng.integers(1, 41))).tolist(), int(rng.integers(1, 17)))
            for _ in range(n)]


_ALONE = {}  # (config, request) -> tokens: several tests (and both bursts settings) ask for the same ones


def _alone(cfg, params, prompt, n, **kw):
    key = (cfg, id(params), tuple(int(t) for t in prompt), n, tuple(sorted((k, str(v)) for k, v in kw.items())))
    if key not in _ALONE:
        g = tpa_jax.generate(params, cfg, [prompt], n, **kw)
        _ALONE[key] = g.tokens[0, : g.lengths[0]].tolist()
    return _ALONE[key]


@pytest.mark.parametrize("name", ["tpa", "gqa"])
def test_ragged_requests_arriving_over_time_equal_generate_alone(models, name):
    cfg, params = models[name]
    eng = Engine(params, cfg, num_pages=14, **SETTINGS)  # 14 pages of 8: not every request fits at once
    reqs = _requests(cfg)
    ids, emitted, waited = {}, {}, 0
    for i, (prompt, n) in enumerate(reqs):
        ids[eng.submit(prompt, n)] = i
        if i % 3 == 2:  # a few arrive, then the engine steps twice
            for _ in range(2):
                for rid, tok, done in eng.step():
                    emitted.setdefault(rid, []).append(tok)
                waited = max(waited, eng.num_waiting)
    assert eng.num_running > 0 and waited > 0
    out = eng.run_until_done()
    assert eng.stats["max_running"] <= SETTINGS["max_batch"] and eng.stats["pages_in_use"] == 0
    assert eng.stats["prefill_calls"] > len(reqs)  # prompts over 16 tokens took several chunks
    for rid, i in ids.items():
        prompt, n = reqs[i]
        assert out[rid] == _alone(cfg, params, prompt, n), (i, len(prompt), n)
        assert emitted.get(rid, []) == out[rid][: len(emitted.get(rid, []))]
    with count_compiles() as c:  # a second wave, other lengths: the same two programs
        for prompt, n in _requests(cfg, n=6, seed=1):
            eng.submit(prompt, n)
        eng.run_until_done()
    assert c.count == 0, c.names


def test_sampled_and_int8_requests_equal_generate_alone(models):
    cfg, params = models["tpa"]
    eng = Engine(params, cfg, num_pages=32, cache_dtype="int8", **SETTINGS)
    kinds = [dict(temperature=0.9, top_k=5, top_p=0.8, seed=3), dict(temperature=1.2, seed=4), dict()]
    reqs = [(list(range(1, 12)), 9), (list(range(40, 45)), 12), (list(range(7, 20)), 6)]  # one prompt bucket
    ids = [eng.submit(p, n, **kw) for (p, n), kw in zip(reqs, kinds)]
    out = eng.run_until_done()
    for rid, (prompt, n), kw in zip(ids, reqs, kinds):
        assert out[rid] == _alone(cfg, params, prompt, n, cache_dtype="int8", **kw), kw


def test_prefill_chunks_interleave_with_decoding_and_stop_tokens_end_early(models):
    cfg, params = models["tpa"]
    eng = Engine(params, cfg, num_pages=16, **SETTINGS)
    short = eng.submit([5, 6, 7], 10)
    assert eng.step() == [(short, eng.result(short)[0], False)]
    long_prompt = list(np.random.default_rng(4).integers(0, cfg.vocab_size, 40))
    long = eng.submit(long_prompt, 5)
    for _ in range(2):  # the 40-token prompt takes 3 chunks; the short request decodes meanwhile
        assert [rid for rid, _, _ in eng.step()] == [short]
    assert [rid for rid, _, _ in eng.step()] == [long, short]
    out = eng.run_until_done()
    assert out[long] == _alone(cfg, params, long_prompt, 5)
    stop = out[short][2]
    ended = eng.submit([5, 6, 7], 10, stop_tokens=[stop])
    got = eng.run_until_done()[ended]
    assert got == out[short][: out[short].index(stop) + 1] == _alone(cfg, params, [5, 6, 7], 10, stop_tokens=[stop])
    assert eng.is_finished(ended) and eng.stats["pages_in_use"] == 0


def test_waiting_is_first_come_first_served_and_memory_is_the_pool(models):
    cfg, params = models["gqa"]
    eng = Engine(params, cfg, num_pages=6, **SETTINGS)  # 48 rows in all
    big1, big2 = eng.submit(list(range(30)), 10), eng.submit(list(range(25)), 10)  # 5 pages each
    small = eng.submit([1, 2], 2)  # 1 page: fits beside big1, but waits behind big2
    first, finished, step = {}, {}, 0
    while eng.num_running or eng.num_waiting:
        step += 1
        for rid, _, done in eng.step():
            first.setdefault(rid, step)
            if done:
                finished[rid] = step
        assert eng.stats["pages_in_use"] <= 6 and eng.num_running <= 2
    assert first[big1] == 2 and first[big2] > finished[big1] and first[small] > finished[big1]
    assert eng.pool_bytes == 6 * page_bytes(cfg, 8) == sum(x.nbytes for x in jax.tree_util.tree_leaves(eng.pool))


def test_cancel_frees_pages_and_leaves_the_others_alone(models):
    cfg, params = models["tpa"]
    eng = Engine(params, cfg, num_pages=16, **SETTINGS)
    reqs = _requests(cfg, n=3, seed=5)
    ids = [eng.submit(p, n) for p, n in reqs]
    eng.step(), eng.step()
    in_use = eng.stats["pages_in_use"]
    eng.cancel(ids[1])
    assert eng.is_finished(ids[1]) and eng._alloc.in_use < in_use
    out = eng.run_until_done()
    for k in (0, 2):
        assert out[ids[k]] == _alone(cfg, params, *reqs[k])


@pytest.mark.parametrize("kwargs,message", [
    (dict(page_size=0), "page_size must be an integer >= 1, got 0"),
    (dict(page_size=2.5), "page_size must be an integer >= 1"),
    (dict(page_size=128), "page_size=128 is longer than max_len=64"),
    (dict(num_pages=3), "num_pages=3 is smaller than one page per batch slot"),
    (dict(max_batch=0), "max_batch must be an integer >= 1"),
    (dict(max_len=100), "max_len=100 exceeds the model's max_seq_len=64"),
    (dict(cache_dtype="int4"), "cache dtype 'int4' is not supported"),
])
def test_bad_engine_settings_are_one_line_errors(models, kwargs, message):
    cfg, params = models["gqa"]
    settings = {**SETTINGS, "num_pages": 8, **kwargs}
    with pytest.raises(ValueError, match=message) as e:
        Engine(params, cfg, **settings)
    assert "\n" not in str(e.value)


def test_pallas_decode_needs_pages_of_eight_rows(models):
    cfg, params = models["tpa"]
    pallas = tpa_jax.configs.replace(cfg, decode_impl="pallas")
    with pytest.raises(ValueError, match="page_size=4 must be a multiple of 8 for the Pallas decode kernel"):
        Engine(params, pallas, **{**SETTINGS, "page_size": 4, "num_pages": 8})


def test_request_errors_leave_the_running_engine_undisturbed(models):
    cfg, params = models["tpa"]
    eng = Engine(params, cfg, num_pages=6, **SETTINGS)
    reqs = [(list(range(3, 13)), 5), (list(range(20, 40)), 6)]  # 2 and 4 pages: both run
    ids = [eng.submit(p, n) for p, n in reqs]
    eng.step()
    bad = [
        (lambda: eng.submit(list(range(50)), 8), "submit: the request needs 8 pages of 8 tokens but the pool has only 6"),
        (lambda: eng.submit(list(range(60)), 10), "60 \\+ max_new_tokens 10 = 70 tokens exceeds the engine's max_len=64"),
        (lambda: eng.submit([1, cfg.vocab_size], 3), f"token id {cfg.vocab_size} outside the vocabulary"),
        (lambda: eng.submit([], 3), "prompt 0 is empty"),
        (lambda: eng.submit([1], 0), "max_new_tokens must be an integer >= 1, got 0"),
        (lambda: eng.submit([1], 2, top_p=1.5), "top_p must be None or a number in \\(0, 1\\]"),
        (lambda: eng.result(99), "result: unknown request id 99"),
        (lambda: eng.cancel(-1), "cancel: unknown request id -1"),
        (lambda: eng.is_finished("a"), "unknown request id 'a'"),
    ]
    for call, message in bad:
        with pytest.raises(ValueError, match=message) as e:
            call()
        assert "\n" not in str(e.value)
    assert eng.num_waiting + eng.num_running == 2
    out = eng.run_until_done()
    assert [out[i] for i in ids] == [_alone(cfg, params, p, n) for p, n in reqs]


@pytest.mark.parametrize("name", ["tpa", "gqa"])
def test_a_decode_step_never_copies_the_pool(models, name):
    """A bfloat16 pool of 512 pages: the compiled decode step updates the donated pool in place, and its
    scratch does not grow with the pool (no per-step cast, bitcast or slice of a whole layer's pool)."""
    cfg, params = models[name]
    temps = {}
    for pages in (64, 512):
        eng = Engine(params, cfg, num_pages=pages, cache_dtype="bfloat16", **SETTINGS)
        b, j = eng.max_batch, eng.pages_per_seq
        packed = eng._pack([None] * b, np.zeros((b, 1), np.int32), np.zeros(b, np.int32), np.ones(b, np.int32),
                           np.full((b, j), pages, np.int32))
        for burst in (1, 4):  # one decode step, and a burst of them in an on-device loop
            lowered = eng._step.lower(params, eng.pool, *packed, np.int32(1), t=1, burst=burst)
            memory = lowered.compile().memory_analysis()
            assert memory.alias_size_in_bytes == eng.pool_bytes
            temps[pages, burst] = memory.temp_size_in_bytes
    assert temps[512, 1] == temps[64, 1] < eng.pool_bytes / 4, temps
    assert temps[512, 4] == temps[64, 4] < eng.pool_bytes / 4, temps


def test_warmup_compiles_every_program_and_changes_nothing(models):
    cfg, params = models["gqa"]
    eng = Engine(params, cfg, **{**SETTINGS, "prefill_chunk": 8, "num_pages": 12})  # shapes no other test uses
    with count_compiles() as c:
        eng.warmup()
    # decode, and prefill chunks of 1, 2 and 4 prompts (max_batch 4)
    assert c.count == 4 and all(not np.asarray(x).any() for x in jax.tree_util.tree_leaves(eng.pool))
    reqs = [(list(range(1, 20)), 3), (list(range(5, 9)), 4), (list(range(30, 33)), 2)]
    with count_compiles() as c:
        ids = [eng.submit(p, n) for p, n in reqs]
        out = eng.run_until_done()
    assert c.count == 0, c.names
    assert [out[i] for i in ids] == [_alone(cfg, params, p, n) for p, n in reqs]


def test_decode_bursts_give_the_same_tokens_in_fewer_calls(models):
    """``decode_steps=8``: while nothing else is pending, up to 8 tokens per call (an on-device loop);
    a request with stop tokens brings single steps back.  Every request still equals generate alone."""
    cfg, params = models["tpa"]
    reqs = _requests(cfg, n=8, seed=7)
    calls = {}
    for steps in (1, 8):
        eng = Engine(params, cfg, num_pages=32, decode_steps=steps, **SETTINGS)
        ids = [eng.submit(p, n) for p, n in reqs]
        out = eng.run_until_done()
        calls[steps] = eng.stats["decode_calls"]
        for rid, (prompt, n) in zip(ids, reqs):
            assert out[rid] == _alone(cfg, params, prompt, n)
    assert calls[8] < calls[1] / 2, calls
    stop = out[ids[0]][1]
    with_stop = eng.submit(reqs[0][0], reqs[0][1], stop_tokens=[stop])
    other = eng.submit(reqs[1][0], reqs[1][1])
    out = eng.run_until_done()
    assert out[with_stop] == _alone(cfg, params, *reqs[0], stop_tokens=[stop]) and len(out[with_stop]) == 2
    assert out[other] == _alone(cfg, params, *reqs[1])
