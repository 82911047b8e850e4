"""The harness-facing helpers of TPAJaxLM: model_args parsing, integer options, request arguments,
the harness's own options (batch_size incl. auto, max_batch_size, device) and the stand-in base
class used when lm-evaluation-harness is not installed."""
import types

import pytest

from tpa_jax.eval import lm_eval_base
from tpa_jax.eval.lm_eval_base import (DEFAULT_BATCH_SIZE, check_device, harness_kwargs, int_arg, parse_model_args,
                                      request_args, resolve_batch_size)


def test_parse_model_args_reads_values_as_the_command_line_does():
    got = parse_model_args(" checkpoint=runs/t6 , step=100,batch_size=8,,temperature=0.5,flag=true,none=null")
    assert got == {"checkpoint": "runs/t6", "step": 100, "batch_size": 8, "temperature": 0.5, "flag": True,
                   "none": None}
    assert type(got["step"]) is int and type(got["temperature"]) is float
    assert parse_model_args("path=a=b") == {"path": "a=b"}  # only the first '=' splits
    assert parse_model_args("") == {} and parse_model_args(None) == {}
    with pytest.raises(ValueError, match="expected key=value, got 'oops'"):
        parse_model_args("step=1,oops")


@pytest.mark.parametrize("value, minimum, expected", [(3, 1, 3), ("12", 1, 12), (" 0 ", 0, 0), (0, 0, 0)])
def test_int_arg_accepts(value, minimum, expected):
    assert int_arg("n", value, minimum) == expected


@pytest.mark.parametrize("value, minimum", [(0, 1), ("-1", 0), (True, 0), (1.0, 1), ("auto", 1), (None, 0)])
def test_int_arg_rejects(value, minimum):
    with pytest.raises(ValueError, match=f"n must be an integer >= {minimum}"):
        int_arg("n", value, minimum)


def test_request_args():
    assert request_args(("ctx", "cont")) == ("ctx", "cont")
    assert request_args(["text"]) == ("text",)
    assert request_args(types.SimpleNamespace(args=("a", {"until": []}))) == ("a", {"until": []})
    for bad in ("a plain string", b"bytes", 3):
        with pytest.raises(ValueError, match="expected an lm_eval Instance or a tuple"):
            request_args(bad)


@pytest.mark.skipif(lm_eval_base.HAVE_LM_EVAL, reason="the harness is installed: its LM is the base")
def test_stand_in_base():
    assert lm_eval_base.register_model is None
    base = lm_eval_base.Base()
    assert (base.rank, base.world_size) == (0, 1)
    assert base.cache_hook.add_partial("loglikelihood", ("a", "b"), (0.0, True)) is None


def test_harness_kwargs_merges_the_harness_options_under_the_model_args():
    known = ("checkpoint", "batch_size", "max_batch_size", "device")
    extra = {"batch_size": 1, "max_batch_size": None, "device": "cuda:0", "something_new": 3}
    assert harness_kwargs({"checkpoint": "d"}, extra, known) == {"checkpoint": "d", "batch_size": 1,
                                                                 "device": "cuda:0"}
    # --model_args batch_size=4 wins over the harness's --batch_size (no duplicate keyword)
    assert harness_kwargs({"checkpoint": "d", "batch_size": 4}, extra, known)["batch_size"] == 4
    assert harness_kwargs(None, None, known) == {}
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['pretrained'\]"):
        harness_kwargs({"pretrained": "gpt2"}, {}, known)


@pytest.mark.parametrize("batch_size, max_batch_size, expected", [
    (4, None, 4), ("16", None, 16), (4, 64, 4), ("auto", None, DEFAULT_BATCH_SIZE), ("auto", 32, 32),
    ("AUTO:4", "2", 2), ("auto:3", None, DEFAULT_BATCH_SIZE)])
def test_resolve_batch_size(batch_size, max_batch_size, expected):
    assert resolve_batch_size(batch_size, max_batch_size) == expected


@pytest.mark.parametrize("batch_size, max_batch_size, match", [
    ("automatic", None, "batch_size must be an integer >= 1, 'auto' or 'auto:N', got 'automatic'"),
    (0, None, "batch_size must be"), (None, None, "batch_size must be"),
    ("auto", 0, "max_batch_size must be an integer >= 1")])
def test_resolve_batch_size_rejects(batch_size, max_batch_size, match):
    with pytest.raises(ValueError, match=match):
        resolve_batch_size(batch_size, max_batch_size)


def test_check_device_warns_on_a_platform_jax_does_not_run(caplog):
    import jax

    backend = jax.default_backend()
    assert check_device(None) is None
    with caplog.at_level("WARNING", logger=lm_eval_base.__name__):
        assert check_device(f" {backend} ") == backend
        assert not caplog.records
        other = "tpu:0" if backend != "tpu" else "cpu"
        assert check_device(other) == other
    assert len(caplog.records) == 1 and "ignored" in caplog.records[0].getMessage()
    for bad in ("", 3):
        with pytest.raises(ValueError, match="device must be a string"):
            check_device(bad)
