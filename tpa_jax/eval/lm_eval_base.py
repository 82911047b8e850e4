"""What ``TPAJaxLM`` (``tpa_jax.eval.lm_eval_adapter``) needs from lm-evaluation-harness, with a
stand-in when the harness is not installed, and the parsing of its arguments and requests.

* ``Base``: ``lm_eval.api.model.LM``, or without the harness a small stand-in with the same
  ``rank`` / ``world_size`` / ``cache_hook`` members; ``register_model``: the harness's registry
  decorator (``None`` without it); ``HAVE_LM_EVAL`` says which.
* :func:`parse_model_args` -- ``--model_args key=value,...`` into a dict (values read by
  ``tpa_jax.configs.parse_value``, the project's one command-line value parser);
* :func:`int_arg` -- an integer option (also given as a digit string) with a lower bound;
* :func:`request_args` -- the argument tuple of a harness ``Instance`` or of a plain tuple;
* :func:`harness_kwargs` -- constructor keywords from ``--model_args`` plus the harness's own options
  (``batch_size``, ``max_batch_size``, ``device``), which the harness passes to
  ``create_from_arg_obj`` / ``create_from_arg_string`` alongside the model args;
* :func:`resolve_batch_size` -- an integer, or ``auto`` / ``auto:N`` (then ``max_batch_size``);
* :func:`check_device` -- the harness's ``--device`` against JAX's backend (a warning, never an error).
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Iterable, Optional, Sequence

import numpy as np

from ..configs import parse_value

__all__ = ["Base", "HAVE_LM_EVAL", "register_model", "parse_model_args", "int_arg", "request_args",
           "harness_kwargs", "resolve_batch_size", "check_device", "DEFAULT_BATCH_SIZE", "HARNESS_KEYS"]

DEFAULT_BATCH_SIZE = 8
HARNESS_KEYS = ("batch_size", "max_batch_size", "device")  # what the harness adds to the model args
_log = logging.getLogger(__name__)

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
            self._device = None
            self.cache_hook = _NoCache()

        @property
        def device(self) -> Optional[str]:
            return self._device

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


def harness_kwargs(model_args: Optional[dict], additional_config: Optional[dict], known: Iterable[str]) -> dict:
    """Constructor keywords: ``model_args`` (every key must be in ``known``), then each of the
    harness's own options (``HARNESS_KEYS``) that is not ``None`` and not already set by the model
    args (``--model_args batch_size=4`` wins over ``--batch_size``).  Other harness keys are ignored."""
    args = dict(model_args or {})
    known = tuple(known)
    unknown = sorted(set(args) - set(known))
    if unknown:
        raise ValueError(f"tpa_jax model_args: unknown key(s) {unknown}; known keys are {list(known)}")
    for k, v in (additional_config or {}).items():
        if k in HARNESS_KEYS and k in known and v is not None and k not in args:
            args[k] = v
    return args


def resolve_batch_size(batch_size: Any, max_batch_size: Any = None) -> int:
    """An integer batch size (digit strings accepted), or ``"auto"`` / ``"auto:N"``: then
    ``max_batch_size`` when given, else ``DEFAULT_BATCH_SIZE`` (no memory probe is run; ``N``, the
    harness's re-tuning count, is ignored)."""
    cap = None if max_batch_size is None else int_arg("max_batch_size", max_batch_size)
    if isinstance(batch_size, str) and batch_size.strip().lower().split(":", 1)[0] == "auto":
        return DEFAULT_BATCH_SIZE if cap is None else cap
    try:
        return int_arg("batch_size", batch_size)
    except ValueError:
        raise ValueError(f"TPAJaxLM: batch_size must be an integer >= 1, 'auto' or 'auto:N', "
                         f"got {batch_size!r}") from None


def check_device(device: Any) -> Optional[str]:
    """The harness's ``device`` (``cpu``, ``cuda``, ``cuda:0``, ``tpu``, ...) as a string, or ``None``.
    JAX places the model itself, so the device is not used; a platform that differs from
    ``jax.default_backend()`` is logged as a warning."""
    if device is None:
        return None
    if not isinstance(device, str) or not device.strip():
        raise ValueError(f"TPAJaxLM: device must be a string such as 'cpu' or 'cuda:0', got {device!r}")
    import jax

    platform = device.strip().split(":", 1)[0].lower()
    platform = {"cuda": "gpu", "rocm": "gpu"}.get(platform, platform)
    backend = jax.default_backend()
    if platform != backend:
        _log.warning("TPAJaxLM: device %r ignored; JAX runs on its default backend %r", device, backend)
    return device.strip()
