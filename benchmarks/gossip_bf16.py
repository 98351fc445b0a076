"""What a 16-bit model loses under gossip: consensus distance and movement of the mean model.

Single-process simulation (``GossipAlgorithm.simulated``, the same update code as ``step()``) of
``--workers`` workers on a ring, ``--numel`` parameters each, random models ``N(0, 1)``, for
CHOCO-SGD and DeepSqueeze (top-10%, default consensus steps) and D-PSGD, in fp32 and in bf16:

* without local steps: the workers should reach consensus and the mean model should not move;
* with local steps (``N(0, 0.01^2)`` per entry and step, applied in the parameters' dtype): the
  mean model should move exactly as the mean of the applied local steps.

Reported: the consensus distance of the parameters and of the models the gossip mixes (the fp32
master copy for 16-bit parameters), and the largest deviation of the mean model from where the
local steps alone put it.

    python benchmarks/gossip_bf16.py                  # 4 workers, 1000 entries, 2000 steps
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import ec_hooks  # noqa: E402
from ec_hooks.gossip import DPSGD, ChocoSGD, DeepSqueeze, simulate_step  # noqa: E402

CASES = (
    ("ChocoSGD", ChocoSGD, lambda: ec_hooks.TopK(0.1)),
    ("DeepSqueeze", DeepSqueeze, lambda: ec_hooks.TopK(0.1)),
    ("DPSGD", DPSGD, lambda: None),
)


def distance(models: torch.Tensor) -> float:
    return math.sqrt(float((models - models.mean(dim=0)).pow(2).sum()) / models.shape[0])


def run(cls, compressor, dtype, noise: float, workers: int, numel: int, steps: int) -> dict:
    generator = torch.Generator().manual_seed(0)
    params = [[torch.randn(numel, generator=generator).to(dtype)] for _ in range(workers)]
    gossips = cls.simulated(params, "ring", compressor, None)
    expected = torch.stack([p[0].double() for p in params]).mean(dim=0)
    for _ in range(steps):
        if noise:
            for p in params:
                before = p[0].double()
                p[0].add_(torch.randn(numel, generator=generator).to(dtype), alpha=noise)
                expected += (p[0].double() - before) / workers
        simulate_step(gossips)
    stored = torch.stack([p[0].double() for p in params])
    mixed = torch.stack([g._flatten().double() for g in gossips])  # the master copy where there is one
    return {
        "distance_params": distance(stored),
        "distance_mixed": distance(mixed),
        "drift_params": float((stored.mean(dim=0) - expected).abs().max()),
        "drift_mixed": float((mixed.mean(dim=0) - expected).abs().max()),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--numel", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=2000)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print(
        f"{args.workers} workers on a ring, {args.numel} entries, {args.steps} steps; distance = consensus "
        "distance, drift = max |mean model - where the local steps put it|\n"
    )
    print(
        "| algorithm | dtype | local steps | distance (parameters) | distance (mixed model) "
        "| drift (parameters) | drift (mixed model) |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, cls, compressor in CASES:
        for noise in (0.0, 0.01):
            for dtype in (torch.float32, torch.bfloat16):
                r = run(cls, compressor(), dtype, noise, args.workers, args.numel, args.steps)
                print(
                    f"| {name} | {str(dtype).removeprefix('torch.')} | {'yes' if noise else 'no'} "
                    f"| {r['distance_params']:.3g} | {r['distance_mixed']:.3g} | {r['drift_params']:.3g} "
                    f"| {r['drift_mixed']:.3g} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
