"""Which consensus step suits which compressor?  Measures the defaults of ``ec_hooks.gossip``.

Single-process simulation of ``--workers`` workers (``GossipAlgorithm.simulated``: the same update
code as ``step()``), ``--dim`` parameters each, for DeepSqueeze and CHOCO-SGD with every compressor
over a grid of consensus steps, in two settings:

* **drift** (the one the defaults are chosen on): all workers start from the same model
  ``x_0 ~ N(0, 1)``; before every gossip step each worker adds its own noise ``N(0, sigma^2)`` per
  entry (``sigma = 0.01``), as heterogeneous SGD steps do.  Reported: the steady-state consensus
  distance (mean over the last half of the steps) divided by ``sigma * sqrt(dim)``, i.e. in units
  of one step's noise.  Lower is better; ``inf`` means it blew up.
* **consensus** (the setting of DESIGN.md's first simulation): independent random models
  ``N(0, 1)``, no noise; reported: final distance / initial distance.

    python benchmarks/consensus_step.py                       # ring of 8, dim 1000, 1000 steps
    python benchmarks/consensus_step.py --topology exponential

Prints Markdown tables (rows: compressor; columns: consensus step; the smallest entry in bold, its
step in the ``best`` column) with ``default_consensus_step`` beside.  The defaults are not simply
the ``best`` column: see the rule in ``default_consensus_step`` (the largest step that stays below
the no-gossip row, contracts in the consensus setting and keeps a factor 2 from divergence).
"""

from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import ec_hooks  # noqa: E402
from ec_hooks.gossip import (  # noqa: E402
    ChocoSGD,
    DeepSqueeze,
    default_consensus_step,
    simulate_step,
    simulated_consensus_distance,
)

STEPS_GRID = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0)
COMPRESSORS = {
    "top-k 1%": lambda: ec_hooks.TopK(0.01),
    "top-k 10%": lambda: ec_hooks.TopK(0.1),
    "rand-k 1%": lambda: ec_hooks.RandK(0.01),
    "rand-k 10%": lambda: ec_hooks.RandK(0.1),
    "scaled sign": lambda: ec_hooks.ScaledSign(),
    "QSGD 2-bit": lambda: ec_hooks.QSGD.from_bits(2),
    "QSGD 4-bit": lambda: ec_hooks.QSGD.from_bits(4),
    "fp16": lambda: ec_hooks.FP16(),
}
ALGORITHMS = {"DeepSqueeze": DeepSqueeze, "ChocoSGD": ChocoSGD}
SIGMA = 0.01


def run_one(args) -> tuple:
    algorithm, compressor_name, eta, setting, workers, dim, steps, topology = args
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(0)
    if setting == "drift":
        x0 = torch.randn(dim, generator=generator)
        params = [[x0.clone()] for _ in range(workers)]
    else:
        params = [[torch.randn(dim, generator=generator)] for _ in range(workers)]
    # eta = 0 is the reference without any communication.
    gossip = ALGORITHMS[algorithm].simulated(params, topology, COMPRESSORS[compressor_name](), eta or 1.0)
    start = simulated_consensus_distance(gossip)
    tail = []
    for t in range(steps):
        if setting == "drift":
            for p in params:
                p[0].add_(torch.randn(dim, generator=generator), alpha=SIGMA)
        if eta:
            simulate_step(gossip)
        if t >= steps // 2 and setting == "drift":
            tail.append(simulated_consensus_distance(gossip))
        if not all(math.isfinite(float(p[0].abs().max())) for p in params):
            return args, math.inf
    if setting == "drift":
        value = sum(tail) / len(tail) / (SIGMA * math.sqrt(dim))
    else:
        value = simulated_consensus_distance(gossip) / start
    return args, value if math.isfinite(value) and value < 1e6 else math.inf


def table(results, algorithm, setting, grid) -> str:
    lines = [
        "| compressor | " + " | ".join(f"eta={e:g}" for e in grid) + " | best | default |",
        "|---" * (len(grid) + 3) + "|",
    ]
    baseline = results[("none", "", 0, setting)]
    lines.append(f"| (no gossip) | {baseline:.3g} |" + " |" * (len(grid) + 1))
    for name, build in COMPRESSORS.items():
        row = [results[(algorithm, name, e, setting)] for e in grid]
        best = min(range(len(grid)), key=lambda i: row[i])
        cells = [("**%.3g**" if i == best else "%.3g") % v for i, v in enumerate(row)]
        key = "choco" if algorithm == "ChocoSGD" else "deepsqueeze"
        lines.append(
            f"| {name} | "
            + " | ".join(cells)
            + f" | {grid[best]:g} | {default_consensus_step(key, build()):g} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--dim", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--topology", default="ring")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--settings", default="drift,consensus")
    args = parser.parse_args()
    settings = args.settings.split(",")
    jobs = [
        (a, c, e, s, args.workers, args.dim, args.steps, args.topology)
        for s in settings
        for a in ALGORITHMS
        for c in COMPRESSORS
        for e in STEPS_GRID
    ]
    jobs += [
        ("DeepSqueeze", "fp16", 0, s, args.workers, args.dim, args.steps, args.topology) for s in settings
    ]
    started = time.perf_counter()
    with mp.get_context("spawn").Pool(args.processes) as pool:
        results = {
            (a, c, e, s) if e else ("none", "", 0, s): v
            for (a, c, e, s, *_), v in pool.imap_unordered(run_one, jobs)
        }
    topo = ec_hooks.Topology.make(args.topology, args.workers)
    print(
        f"{args.workers} workers, topology {topo}, dim {args.dim}, {args.steps} steps, "
        f"{time.perf_counter() - started:.0f} s\n"
    )
    for setting in settings:
        what = (
            "steady-state consensus distance / (sigma sqrt(dim)), lower is better"
            if setting == "drift"
            else "final / initial consensus distance"
        )
        for algorithm in ALGORITHMS:
            print(f"### {algorithm}, {setting}: {what}\n")
            print(table(results, algorithm, setting, STEPS_GRID) + "\n")


if __name__ == "__main__":
    main()
