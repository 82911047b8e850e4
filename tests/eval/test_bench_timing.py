"""Benchmark timing: interleaved round robin with a rotating start, per-call wall and CPU seconds,
the environment record and the smoke-run XLA flags."""
import os
import time

import jax
import jax.numpy as jnp
import pytest

from tpa_jax.eval import bench_timing
from tpa_jax.eval.bench_timing import compile_timed, environment, rotation, time_interleaved


def test_rotation():
    names = ["a", "b", "c"]
    assert [rotation(names, r) for r in range(4)] == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"],
                                                      ["a", "b", "c"]]
    assert rotation([], 3) == []


def test_time_interleaved_order_and_times():
    calls, ready = [], jnp.zeros(())

    def step(name, seconds):
        def call():
            calls.append(name)
            time.sleep(seconds)
            return ready
        return call

    times = time_interleaved({"a": step("a", 0.0), "b": step("b", 0.1), "c": step("c", 0.0)}, reps=3)
    assert calls == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]
    assert {k: len(v["wall"]) for k, v in times.items()} == {"a": 3, "b": 3, "c": 3}
    assert all(len(v["cpu"]) == 3 for v in times.values())
    assert min(times["b"]["wall"]) >= 0.1 > max(times["a"]["wall"])
    # the sleep costs wall time, not this process's CPU time
    assert max(times["b"]["cpu"]) < min(times["b"]["wall"])
    more = time_interleaved({"a": step("a", 0.0)}, reps=2, times=times)
    assert more is times and len(times["a"]["wall"]) == 5


def test_compile_timed():
    compiled, seconds = compile_timed(jax.jit(lambda x: x * 2 + 1), jnp.arange(3.0))
    assert seconds > 0
    assert compiled(jnp.arange(3.0)).tolist() == [1.0, 3.0, 5.0]


def test_environment():
    env = environment()
    assert set(env) == {"backend", "device_kind", "device_count", "jax", "jaxlib", "python", "cpu_count"}
    assert env["backend"] == "cpu" and env["device_count"] >= 1 and env["cpu_count"] == os.cpu_count()


@pytest.mark.parametrize("platforms, cpu", [("cpu", True), ("cpu,cuda", True), ("cuda", False), ("tpu,cpu", False)])
def test_smoke_flags_only_where_jax_can_only_use_the_cpu(monkeypatch, platforms, cpu):
    monkeypatch.setenv("JAX_PLATFORMS", platforms)
    monkeypatch.setenv("XLA_FLAGS", "--existing")
    assert bench_timing.cpu_only() is cpu
    assert bench_timing.use_smoke_xla_flags() is cpu
    want = "--existing " + bench_timing.SMOKE_XLA_FLAGS if cpu else "--existing"
    assert os.environ["XLA_FLAGS"] == want
