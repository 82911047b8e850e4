"""Timing and environment records shared by the benchmarks.

* :func:`time_interleaved` -- runs several compiled steps round robin (the starting step rotates
  every repetition, so drift in machine load hits each alike), every call ended by
  ``block_until_ready``, and records wall-clock and process CPU seconds per call;
* :func:`compile_timed` -- ahead-of-time compile of a jitted function, with its seconds;
* :func:`environment` -- backend, device, library and machine versions for a benchmark's JSON;
* :func:`cpu_only` and :func:`use_smoke_xla_flags` -- for smoke runs only: XLA:CPU flags that skip
  LLVM's optimisation passes (compiles are about 3x faster; never used for real numbers).  They must
  be set before jax creates its backend, i.e. before the first array is made.
"""
from __future__ import annotations

import importlib.util
import os
import platform
import time
from typing import Any, Callable, Mapping, Optional

import jax

__all__ = ["time_interleaved", "rotation", "compile_timed", "environment", "cpu_only", "use_smoke_xla_flags"]

SMOKE_XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"
_ACCELERATOR_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin", "jax_rocm7_plugin", "libtpu")


def rotation(names: list, rep: int) -> list:
    """The order of repetition ``rep``: ``names`` rotated left by ``rep % len(names)``."""
    k = rep % max(1, len(names))
    return list(names[k:]) + list(names[:k])


def time_interleaved(steps: Mapping[str, Callable[[], Any]], reps: int,
                     times: Optional[dict] = None) -> dict:
    """Call each zero-argument step ``reps`` times, interleaved in :func:`rotation` order; each call
    is timed up to ``block_until_ready`` of what it returns.

    Returns ``{name: {"wall": [seconds, ...], "cpu": [seconds, ...]}}`` (appended to ``times``
    when given)."""
    times = {} if times is None else times
    names = list(steps)
    for name in names:
        times.setdefault(name, {"wall": [], "cpu": []})
    for r in range(reps):
        for name in rotation(names, r):
            t0, c0 = time.perf_counter(), time.process_time()
            jax.block_until_ready(steps[name]())
            times[name]["wall"].append(time.perf_counter() - t0)
            times[name]["cpu"].append(time.process_time() - c0)
    return times


def compile_timed(jitted: Any, *args: Any) -> tuple[Any, float]:
    """``(jitted.lower(*args).compile(), seconds it took)``."""
    t0 = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    return compiled, time.perf_counter() - t0


def _jaxlib_version() -> Optional[str]:
    try:
        import jaxlib

        return getattr(jaxlib, "__version__", None)
    except ImportError:
        return None


def environment() -> dict:
    """``{"backend", "device_kind", "device_count", "jax", "jaxlib", "python", "cpu_count"}``."""
    dev = jax.devices()[0]
    return {"backend": jax.default_backend(), "device_kind": getattr(dev, "device_kind", str(dev)),
            "device_count": jax.device_count(), "jax": jax.__version__, "jaxlib": _jaxlib_version(),
            "python": platform.python_version(), "cpu_count": os.cpu_count()}


def cpu_only() -> bool:
    """True when jax can only use the CPU here (``JAX_PLATFORMS=cpu``, or no GPU/TPU plugin installed);
    decided without creating a backend."""
    platforms = os.environ.get("JAX_PLATFORMS", "")
    if platforms:
        return platforms.split(",")[0].strip() == "cpu"
    return all(importlib.util.find_spec(p) is None for p in _ACCELERATOR_PLUGINS)


def use_smoke_xla_flags() -> bool:
    """Append :data:`SMOKE_XLA_FLAGS` to ``XLA_FLAGS`` when only the CPU can be used (they are CPU
    flags); returns whether they were set."""
    if not cpu_only():
        return False
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + SMOKE_XLA_FLAGS).strip()
    return True
