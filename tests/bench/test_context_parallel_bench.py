"""bench/context_parallel.py --smoke: the bytes each device receives per token per layer are read
from the compiled HLO of a context-parallel training step and prefill, and TPA (the small family's
34 heads, ranks 6/2/2) moves at most 0.3x MHA's (12 heads): its factors, not K and V."""
import os
import sys

import pytest

from _util import ROOT

sys.path.insert(0, os.path.join(ROOT, "bench"))
import context_parallel  # noqa: E402


@pytest.fixture(scope="module")
def smoke():
    return context_parallel.main(["--smoke"])


def test_tpa_moves_a_quarter_of_mha(smoke):
    ratio = smoke["ratio_to_mha"]
    for kind in ("train_step", "prefill"):
        assert ratio["t6"][kind] <= 0.3, ratio
        for name, rs in smoke["bytes"].items():
            assert rs[kind]["by_kind"]["collective-permute"] > 0, (name, kind)  # the ring, seen in the HLO
    # The training step's ring: the items go round once forward (C - 1 passes) and once more in the
    # backward pass (C - 1), with float32 gradient accumulators beside them (C passes, the last one
    # home).  The smoke is float32 with C = 2: 1 + 1 + 2 = 4 times the prefill's one pass, or 3 when
    # XLA sends the backward's first pass of this shard's items once with the forward's (it does).
    for name, rs in smoke["bytes"].items():
        train, prefill = rs["train_step"]["bytes_per_layer"], rs["prefill"]["bytes_per_layer"]
        assert train in (3 * prefill, 4 * prefill), (name, train, prefill)


def test_hlo_bytes_are_the_cached_items(smoke):
    """Prefill: with C = 2 each device receives the other's T / 2 tokens of items once per layer,
    in float32 -- exactly the cache's numbers per token (an independent count: the cache layout), so
    nothing else (no K or V) crosses."""
    assert set(smoke["bytes"]) == {"t6", "mha"}
    for name, rs in smoke["bytes"].items():
        assert rs["prefill"]["bytes_per_token_per_layer"] == 4 * smoke["cache_elems_per_token_per_layer"][name], name


def test_memory_per_device_shrinks_with_context(smoke):
    for kind, mem in smoke["temp_bytes_per_device"].items():
        assert set(mem) == {"1", "2"} and mem["2"] < 0.8 * mem["1"], (kind, mem)


def test_received_bytes_parser():
    hlo = ("%cp = bf16[1,32,6,34]{3,2,1,0} collective-permute(bf16[1,32,6,34]{3,2,1,0} %x), channel_id=1\n"
           "%ag = f32[8,16]{1,0} all-gather(f32[2,16]{1,0} %y), dimensions={0}\n"
           "%aa = (f32[4,4]{1,0}, f32[4,4]{1,0}) all-to-all(f32[4,4]{1,0} %a, f32[4,4]{1,0} %b)\n")
    got = context_parallel.received_bytes(hlo, 4)
    assert got == {"collective-permute": 1 * 32 * 6 * 34 * 2, "all-gather": 8 * 16 * 4 * 3 // 4,
                   "all-to-all": 2 * 16 * 4 * 3 // 4}


def test_received_bytes_counts_loop_trips():
    """A collective inside a loop body counts once per trip (the ring's scan over its steps)."""
    hlo = """HloModule m

%body.1 (p: (s32[], f32[4,8])) -> (s32[], f32[4,8]) {
  %cp = f32[4,8]{1,0} collective-permute(f32[4,8]{1,0} %x), channel_id=1
}

%cond.1 (p: (s32[], f32[4,8])) -> pred[] {
  %lt = pred[] compare(s32[] %i, s32[] %n), direction=LT
}

ENTRY %main.2 (a: f32[4,8]) -> f32[4,8] {
  %first = f32[4,8]{1,0} collective-permute(f32[4,8]{1,0} %a), channel_id=2
  %w = (s32[], f32[4,8]) while((s32[], f32[4,8]) %t), condition=%cond.1, body=%body.1, backend_config={"known_trip_count":{"n":"6"}}
}
"""
    assert context_parallel.received_bytes(hlo, 8)["collective-permute"] == 7 * 4 * 8 * 4
