"""TPAJaxLM (lm-evaluation-harness adapter) against explicit computations; no harness needed."""
import types
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from _util import cfg_of, forward, init_params
from tpa_jax.data.tokenizers import ByteTokenizer
from tpa_jax.eval import lm_eval_adapter
from tpa_jax.eval.lm_eval_adapter import TPAJaxLM

SEQ = 32
NL = 10  # "\n", the prefix token of the byte-model cases that want one


@pytest.fixture(scope="module")
def env():
    cfg = cfg_of("tpa", vocab_size=256, max_seq_len=SEQ)
    model, params = init_params(cfg, seed=3)
    run = types.SimpleNamespace(config=cfg, params=params, model=model, tokenizer=ByteTokenizer())
    return types.SimpleNamespace(cfg=cfg, model=model, params=params, run=run, fwd=forward(model))


def logprobs(env, ids):
    """log-softmax of one explicit full forward over ``ids``: [len(ids), vocab] float64."""
    logits = env.fwd(env.params, jnp.asarray([list(ids)], jnp.int32))[0]
    return np.asarray(jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1), np.float64)


def b(text):
    return list(text.encode("utf-8"))


def explicit_ll(env, ctx_ids, cont_ids):
    """(sum of log p(cont | ctx), every continuation token is the argmax) from one forward pass."""
    whole = list(ctx_ids) + list(cont_ids)
    lp = logprobs(env, whole[:-1])
    pos = [len(ctx_ids) - 1 + j for j in range(len(cont_ids))]
    total = sum(lp[p, t] for p, t in zip(pos, cont_ids))
    greedy = all(int(np.argmax(lp[p])) == t for p, t in zip(pos, cont_ids))
    return float(total), greedy


def greedy_tokens(env, ids, n):
    """n greedy tokens after ``ids``, one full forward pass per token."""
    ids = list(ids)
    out = []
    for _ in range(n):
        nxt = int(np.argmax(logprobs(env, ids)[-1]))
        out.append(nxt)
        ids.append(nxt)
    return out


def close(a, b_):
    return np.allclose(a, b_, rtol=1e-5, atol=2e-4)


# ----------------------------------------------------------------------------- loglikelihood
def test_loglikelihood_matches_explicit_forward_and_greedy(env):
    lm = TPAJaxLM(env.run, batch_size=4)
    # a continuation that IS the greedy continuation: search same-length contexts for one whose two
    # greedy next bytes are ASCII (so they round-trip through str)
    rng = np.random.default_rng(0)
    greedy_case = None
    for _ in range(40):
        ctx = "".join(chr(c) for c in rng.integers(ord("a"), ord("z") + 1, 6))
        g = greedy_tokens(env, b(ctx), 2)
        if all(t < 128 for t in g):
            greedy_case = (ctx, "".join(chr(t) for t in g))
            break
    assert greedy_case is not None, "no context with an ASCII greedy continuation found"
    # (input lengths are kept to a few values: each new length is one more compile of the reference)
    reqs = [("The cat sat", "!!"), greedy_case, ("abc", "defg"), ("hello world", "!!")]
    got = lm.loglikelihood(reqs)
    assert len(got) == len(reqs)
    for (ctx, cont), (lp, is_greedy) in zip(reqs, got):
        want_lp, want_greedy = explicit_ll(env, b(ctx), b(cont))
        assert isinstance(lp, float) and isinstance(is_greedy, bool)
        assert close(lp, want_lp), (ctx, cont, lp, want_lp)
        assert is_greedy == want_greedy
    assert got[1][1] is True
    assert not all(g for _, g in got)  # the False branch is exercised too


def test_loglikelihood_order_and_padding_independent_of_batching(env):
    reqs = [("a", "bcdefg"), ("a much longer context", " here"), ("mid ctx", "d"), ("q", "uestion mark"),
            ("zz", "zzzzz")]
    batched = TPAJaxLM(env.run, batch_size=2).loglikelihood(reqs)
    single = TPAJaxLM(env.run, batch_size=1).loglikelihood(reqs)
    one_by_one = [TPAJaxLM(env.run, batch_size=8).loglikelihood([r])[0] for r in reqs]
    for (ctx, cont), x, y, z in zip(reqs, batched, single, one_by_one):
        want = explicit_ll(env, b(ctx), b(cont))
        for res in (x, y, z):
            assert close(res[0], want[0]) and res[1] == want[1], (ctx, cont, res, want)


def test_loglikelihood_trailing_space_and_empty_context(env):
    lm = TPAJaxLM(env.run)
    (a, _), (c, _) = lm.loglikelihood([("the end ", "of it"), ("the end", " of it")])
    assert close(a, c)
    # byte tokenizer, no prefix token: the first continuation token is context and gets no score
    (lp, _), = lm.loglikelihood([("", "hello!x")])
    assert close(lp, explicit_ll(env, b("h"), b("ello!x"))[0])
    # with a prefix token every continuation token is scored
    (lp, _), = TPAJaxLM(env.run, prefix_token_id=NL).loglikelihood([("", "hello!x")])
    assert close(lp, explicit_ll(env, [NL], b("hello!x"))[0])


def test_loglikelihood_left_truncation(env):
    lm = TPAJaxLM(env.run, max_length=8)
    ctx, cont = "abcdefghij", "xyz"  # 13 tokens > max_length + 1
    (lp, greedy), = lm.loglikelihood([(ctx, cont)])
    whole = b(ctx) + b(cont)
    inputs = whole[-9:-1]  # the model sees only the last 8 input tokens
    lps = logprobs(env, inputs)
    want = sum(lps[5 + j, t] for j, t in enumerate(b(cont)))
    assert close(lp, want)
    assert greedy == all(int(np.argmax(lps[5 + j])) == t for j, t in enumerate(b(cont)))
    # the truncation really changed the result (the full-context score differs)
    assert not close(lp, explicit_ll(env, b(ctx), b(cont))[0])
    # a continuation exactly max_length long still fits (conditioned on one context token)
    (lp, _), = lm.loglikelihood([("ab", "cdefghij")])
    assert close(lp, explicit_ll(env, b("b"), b("cdefghij"))[0])


def test_bad_input_raises(env):
    lm = TPAJaxLM(env.run, max_length=8)
    with pytest.raises(ValueError, match="zero tokens"):
        lm.loglikelihood([("abc", "")])
    with pytest.raises(ValueError, match="exceeds max_length"):
        lm.loglikelihood([("a", "123456789")])
    with pytest.raises(ValueError, match="prefix_token_id"):
        lm.loglikelihood([("", "x")])
    with pytest.raises(ValueError, match="max_length 33 exceeds"):
        TPAJaxLM(env.run, max_length=33)
    with pytest.raises(ValueError, match="batch_size"):
        TPAJaxLM(env.run, batch_size=0)
    with pytest.raises(ValueError, match="run or checkpoint"):
        TPAJaxLM()
    with pytest.raises(ValueError, match="max_gen_toks 8 leaves no room"):
        lm._gen_options({"max_gen_toks": 8})


# ----------------------------------------------------------------------------- rolling
def explicit_rolling(env, ids, prefix, window):
    """Blocks of ``window`` targets; target ids[j] of a block ending at ``end`` is predicted from the
    ``window`` tokens of [prefix] + ids that end right before ids[end - 1]."""
    full = [prefix] + list(ids)  # full[j] is the token just before ids[j]
    total = 0.0
    for start in range(0, len(ids), window):
        end = min(start + window, len(ids))
        lo = max(0, end - window)
        lps = logprobs(env, full[lo:end])
        assert len(full[lo:end]) <= window
        total += sum(lps[j - lo, ids[j]] for j in range(start, end))
    return total


def test_loglikelihood_rolling_windows(env):
    text = "Rolling windows, long text"  # 26 bytes > max_length
    ids = b(text)
    with_prefix = TPAJaxLM(env.run, max_length=8, prefix_token_id=NL, batch_size=3)
    no_prefix = TPAJaxLM(env.run, max_length=8, batch_size=3)
    got = with_prefix.loglikelihood_rolling([(text,), ("short!",)])
    assert close(got[0], explicit_rolling(env, ids, NL, 8))
    # byte tokenizer without a prefix: the first byte conditions the rest and gets no score
    (lp,) = no_prefix.loglikelihood_rolling([(text,)])
    assert close(lp, explicit_rolling(env, ids[1:], ids[0], 8))
    # windows do not cover the whole text, so they differ from one long forward
    assert not close(got[0], explicit_ll(env, [NL], ids)[0])
    # a short text is one window: the full-sequence sum, the same as loglikelihood("", text)
    short = b("short!")
    lps = logprobs(env, [NL] + short[:-1])
    assert close(got[1], sum(lps[j, t] for j, t in enumerate(short)))
    assert close(got[1], with_prefix.loglikelihood([("", "short!")])[0][0])
    assert no_prefix.loglikelihood_rolling([("",), ("x",)]) == [0.0, 0.0]


# ----------------------------------------------------------------------------- generation
class Generation(NamedTuple):
    tokens: np.ndarray
    lengths: np.ndarray


def fake_generate(env, calls, script=None):
    """Stand-in with ``tpa_jax.inference.generate.generate``'s signature: explicit greedy loop (or the
    scripted tokens), stopping at (and counting) a stop token."""
    def generate(params, cfg, prompt_tokens, max_new_tokens, *, temperature=0.0, top_k=None, top_p=None,
                 seed=0, stop_tokens=()):
        calls.append(dict(prompts=[list(p) for p in prompt_tokens], n=max_new_tokens, temperature=temperature,
                          top_k=top_k, top_p=top_p, stop_tokens=tuple(stop_tokens)))
        toks = np.zeros((len(prompt_tokens), max_new_tokens), np.int32)
        lens = np.zeros(len(prompt_tokens), np.int32)
        for i, p in enumerate(prompt_tokens):
            g = list(script) if script is not None else greedy_tokens(env, p, max_new_tokens)
            g = g[:max_new_tokens]
            for k, t in enumerate(g):
                if t in stop_tokens:
                    g = g[: k + 1]
                    break
            toks[i, : len(g)] = g
            lens[i] = len(g)
        return Generation(toks, lens)
    return generate


def check_generate_until(env, lm):
    """generate_until vs. an explicit greedy loop: clamping, ``until`` cut, request order."""
    n = 4
    prompts = ["Once upon a!", "a very long prompt that must be clamped", "tiny input"]
    full = {}
    for p in prompts:
        ids = b(p)[-(lm.max_length - n):]
        full[p] = ByteTokenizer().decode(greedy_tokens(env, ids, n))
    cut = full[prompts[0]][2]
    reqs = [(prompts[0], {"until": [cut], "max_gen_toks": n}),
            (prompts[1], {"until": [], "max_gen_toks": n, "do_sample": False}),
            (prompts[2], {"until": "\x00never", "max_gen_toks": n, "temperature": 0.0})]
    got = lm.generate_until(reqs)
    assert got == [full[prompts[0]].split(cut)[0], full[prompts[1]], full[prompts[2]]]
    assert len(got[0]) < len(full[prompts[0]])


def test_generate_until_with_stand_in(env, monkeypatch):
    calls = []
    monkeypatch.setattr(lm_eval_adapter, "_generate_fn", lambda: fake_generate(env, calls))
    lm = TPAJaxLM(env.run, max_length=16, batch_size=2)
    check_generate_until(env, lm)
    assert all(c["temperature"] == 0.0 and c["stop_tokens"] == () and c["n"] == 4 for c in calls)
    assert all(len(p) <= 16 - 4 for c in calls for p in c["prompts"])
    assert all(len(c["prompts"]) <= 2 for c in calls)
    # sampling options reach generate; different options are separate calls
    calls.clear()
    monkeypatch.setattr(lm_eval_adapter, "_generate_fn", lambda: fake_generate(env, calls, b("abcd")))
    lm.generate_until([("ab", {"do_sample": True, "temperature": 0.7, "top_p": 0.9, "max_gen_toks": 3}),
                       ("ab", {"max_gen_toks": 4})])
    assert sorted((c["n"], c["temperature"], c["top_p"]) for c in calls) == [(3, 0.7, 0.9), (4, 0.0, None)]


def test_generate_until_strips_eot(env, monkeypatch):
    class EotBytes(ByteTokenizer):
        eot_id = 255

    calls = []
    script = [ord("h"), ord("i"), 255, ord("x")]
    monkeypatch.setattr(lm_eval_adapter, "_generate_fn", lambda: fake_generate(env, calls, script))
    run = types.SimpleNamespace(**{**vars(env.run), "tokenizer": EotBytes()})
    lm = TPAJaxLM(run)
    assert lm.eot_token_id == 255 and lm.prefix_token_id == 255
    assert lm.generate_until([("", {"until": [], "max_gen_toks": 4})]) == ["hi"]
    assert calls[0]["stop_tokens"] == (255,) and calls[0]["prompts"] == [[255]]


def test_generate_until_real_generate(env):
    check_generate_until(env, TPAJaxLM(env.run, max_length=16, batch_size=2))


# ----------------------------------------------------------------------------- construction
def test_create_from_arg_string_and_properties(env, monkeypatch):
    import tpa_jax

    seen = []

    def load(checkpoint, step=None):
        seen.append((checkpoint, step))
        return env.run

    monkeypatch.setattr(tpa_jax, "load", load, raising=False)
    lm = TPAJaxLM.create_from_arg_string("checkpoint=some/dir,step=100,batch_size=4,max_length=16",
                                         {"batch_size": 1, "device": "cuda", "max_batch_size": None})
    assert seen == [("some/dir", 100)]
    assert (lm.batch_size, lm.max_length, lm.max_gen_toks) == (4, 16, 256)
    assert lm.tokenizer_name == "byte" and lm.eot_token_id is None and lm.prefix_token_id is None
    assert TPAJaxLM.create_from_arg_string("checkpoint=d", {"batch_size": "2"}).batch_size == 2
    assert TPAJaxLM.create_from_arg_string("checkpoint=d", {"batch_size": "auto"}).batch_size == 8
    assert TPAJaxLM(env.run).max_length == SEQ
    # create_from_arg_obj (simple_evaluate / the harness's command line): the harness's options are
    # keywords next to the model args, a model-args batch_size wins, auto means max_batch_size
    harness = {"batch_size": "auto", "max_batch_size": 4, "device": "cpu"}
    lm2 = TPAJaxLM.create_from_arg_obj({"checkpoint": "d"}, harness)
    assert (lm2.batch_size, lm2.device) == (4, "cpu")
    assert TPAJaxLM.create_from_arg_obj({"checkpoint": "d", "batch_size": 3}, {"batch_size": 1}).batch_size == 3
    assert TPAJaxLM.create_from_arg_obj({"checkpoint": "d"}, {"batch_size": "auto:2"}).batch_size == 8
    assert TPAJaxLM.create_from_arg_string("checkpoint=d,batch_size=5", harness).batch_size == 5
    with pytest.raises(ValueError, match="unknown key"):
        TPAJaxLM.create_from_arg_obj({"checkpoint": "d", "dtype": "float32"})
    with pytest.raises(ValueError, match="unknown key"):
        TPAJaxLM.create_from_arg_string("checkpoint=d,pretrained=x")
    # Instance-like requests (anything with .args) work like tuples
    req = types.SimpleNamespace(args=("ab", "cd"))
    assert lm.loglikelihood([req]) == lm.loglikelihood([("ab", "cd")])
