"""The harness-facing helpers of TPAJaxLM: model_args parsing, integer options, request arguments
and the stand-in base class used when lm-evaluation-harness is not installed."""
import types

import pytest

from tpa_jax.eval import lm_eval_base
from tpa_jax.eval.lm_eval_base import int_arg, parse_model_args, request_args


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
