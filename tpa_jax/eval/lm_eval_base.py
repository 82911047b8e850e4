"""What ``TPAJaxLM`` (``tpa_jax.eval.lm_eval_adapter``) needs from lm-evaluation-harness, with a
stand-in when the harness is not installed, and the parsing of its arguments and requests.

* ``Base``: ``lm_eval.api.model.LM``, or without the harness a small stand-in with the same
  ``rank`` / ``world_size`` / ``cache_hook`` members; ``register_model``: the harness's registry
  decorator (``None`` without it); ``HAVE_LM_EVAL`` says which.
* :func:`parse_model_args` -- ``--model_args key=value,...`` into a dict (values read by
  ``tpa_jax.configs.parse_value``, the project's one command-line value parser);
* :func:`int_arg` -- an integer option (also given as a digit string) with a lower bound;
* :func:`request_args` -- the argument tuple of a harness ``Instance`` or of a plain tuple.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import numpy as np

from ..configs import parse_value

__all__ = ["Base", "HAVE_LM_EVAL", "register_model", "parse_model_args", "int_arg", "request_args"]

register_model: Optional[Callable] = None
try:  # the harness is optional
    from lm_eval.api.model import LM as Base

    try:
        from lm_eval.api.registry import register_model
    except Exception:  # pragma: no cover - registry moved in some release
        register_model = None
    HAVE_LM_EVAL = True
except Exception:  # ImportError, or a broken install
    HAVE_LM_EVAL = False

    class _NoCache:
        def add_partial(self, *args, **kwargs) -> None:
            pass

    class Base:  # type: ignore[no-redef]
        """Stand-in for ``lm_eval.api.model.LM`` when the harness is not installed."""

        def __init__(self) -> None:
            self._rank = 0
            self._world_size = 1
            self.cache_hook = _NoCache()

        @property
        def rank(self) -> int:
            return self._rank

        @property
        def world_size(self) -> int:
            return self._world_size


def parse_model_args(arg_string: str) -> dict:
    """``"checkpoint=DIR,step=100"`` -> ``{"checkpoint": "DIR", "step": 100}`` (each value read by
    ``tpa_jax.configs.parse_value``: JSON numbers, ``true``/``false``/``null``, else the string);
    a piece without ``=`` raises ``ValueError``."""
    out: dict = {}
    for piece in (arg_string or "").split(","):
        if not piece.strip():
            continue
        if "=" not in piece:
            raise ValueError(f"model_args: expected key=value, got {piece.strip()!r}")
        k, v = piece.split("=", 1)
        out[k.strip()] = parse_value(v.strip())
    return out


def int_arg(name: str, value: Any, minimum: int = 1) -> int:
    """``value`` as an int >= ``minimum`` (digit strings accepted); ``ValueError`` otherwise."""
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"TPAJaxLM: {name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def request_args(req: Any) -> tuple:
    """``req.args`` of a harness ``Instance``, or the request itself when it is a plain tuple."""
    args = getattr(req, "args", req)
    if isinstance(args, (str, bytes)) or not isinstance(args, Sequence):
        raise ValueError(f"request: expected an lm_eval Instance or a tuple of arguments, got {type(req).__name__}")
    return tuple(args)
