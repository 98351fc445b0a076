"""A short soak (the long one is ``benchmarks/soak.py``): 3 real gloo ranks, Mem-SGD (DDP hook) and
DeepSqueeze, a few hundred steps.  The memory norm and the consensus distance stay finite and do
not grow from the first half of the run to the second; the resident memory does not grow."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# Spawned ranks find the module by name: its folder must be on the path they inherit.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import soak  # noqa: E402

STEPS = 240
RSS_GROWTH_MIB = 30  # allocator noise; a leak per step (tensors kept in stats, payloads) would be far more


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", soak.ALGORITHMS)
def test_short_soak_stays_bounded(algorithm):
    result = soak.run(algorithm, steps=STEPS, world_size=3, every=20, timeout=240)
    s = soak.summarize(result)
    assert s["finite"]
    assert s["max_second_half"] <= 2.0 * s["max_first_half"], s
    assert s["loss_last"] < s["loss_first"], s
    assert s["rss_end_mib"] - s["rss_start_mib"] < RSS_GROWTH_MIB, s
    if algorithm == "memsgd":
        # Mem-SGD's memory holds at most a few steps' worth of gradient: it shrinks as training converges.
        assert s["last"] <= s["max_first_half"], s
