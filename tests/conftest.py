"""Test setup: 8 fake CPU devices (set before jax is imported), float32 compute for exact checks,
and a session-wide persistent compilation cache (train tests compile the same step many times)."""
import os
import tempfile

# 8 fake devices, and the CPU backend's quick compile (LLVM at -O0, no fusion emitters: the same flags
# as the benchmarks' smoke runs, tpa_jax.eval.bench_timing.SMOKE_XLA_FLAGS).  Most of the suite's time is
# spent compiling small programs, and these flags change how fast the code runs, not what it computes.
_FLAGS = ("--xla_force_host_platform_device_count=8", "--xla_backend_optimization_level=0",
          "--xla_cpu_use_fusion_emitters=false")
for _flag in _FLAGS:
    if _flag not in os.environ.get("XLA_FLAGS", ""):  # pytest-xdist workers inherit the controller's flags
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Inherited by the subprocesses the CLI tests start, and by the pytest-xdist workers (``-n 2``): the
# controller loads this file before it spawns them, so all of them share one cache directory.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="tpa_jax_test_xla_cache_"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
# A size limit (never reached) turns on the cache's file lock, so concurrent workers never read an
# entry another one is still writing.
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(16 << 30))

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
jax.config.update("jax_compilation_cache_max_size", int(os.environ["JAX_COMPILATION_CACHE_MAX_SIZE"]))
