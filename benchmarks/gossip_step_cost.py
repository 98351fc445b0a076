"""Time and memory traffic of one gossip step, optionally against another git revision side by side.

Single-process simulation of ``--workers`` workers on a ring (``GossipAlgorithm.simulated``: the
same update code as ``step()``), ``--numel`` fp32 parameters each, CPU.  For each algorithm and
compressor it reports the median step time, the peak of extra memory during a step, the bytes
allocated per step and the number of allocations of at least 1 MiB (torch profiler).

    python benchmarks/gossip_step_cost.py                        # this checkout
    python benchmarks/gossip_step_cost.py --against cd03cdb      # and ec_hooks/gossip.py of that revision

``--against`` loads that revision's ``ec_hooks/gossip.py`` beside the current one and alternates
the two, so both are measured under the same load.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import statistics
import subprocess
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

import ec_hooks  # noqa: E402
from ec_hooks import gossip as current  # noqa: E402

COMPRESSORS = {
    "topk": lambda: ec_hooks.TopK(0.01),
    "identity": ec_hooks.Identity,
    "sign": ec_hooks.ScaledSign,
}


def _module_at(revision: str):
    source = subprocess.run(
        ["git", "-C", ROOT, "show", f"{revision}:ec_hooks/gossip.py"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    module = importlib.util.module_from_spec(
        importlib.util.spec_from_loader(f"gossip_{revision}", loader=None)
    )
    exec(compile(source, f"gossip@{revision}", "exec"), module.__dict__)
    return module


@contextlib.contextmanager
def _quiet_stdout():
    """The profiler's native side prints start/stop lines on file descriptor 1: keep the table clean."""
    sys.stdout.flush()
    saved = os.dup(1)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 1)
        try:
            yield
        finally:
            os.dup2(saved, 1)
            os.close(saved)


def _measure(module, algorithm: str, compressor, workers: int, numel: int, steps: int):
    params = [[torch.randn(numel, generator=torch.Generator().manual_seed(r))] for r in range(workers)]
    cls = getattr(module, algorithm)
    group = cls.simulated(params, "ring", compressor)
    module.simulate_step(group)  # state and buffers are allocated lazily at the first step
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        module.simulate_step(group)
        times.append(time.perf_counter() - started)
    with _quiet_stdout(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        module.simulate_step(group)
    events = sorted(
        (e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
        key=lambda e: e.start_ns(),
    )
    live = peak = allocated = big = 0
    for event in events:
        live += event.nbytes()
        peak = max(peak, live)
        if event.nbytes() > 0:
            allocated += event.nbytes()
            big += event.nbytes() >= 1 << 20
    return statistics.median(times), peak, allocated, big


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--numel", type=int, default=10_000_000)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--algorithms",
        nargs="+",
        default=["ChocoSGD", "DeepSqueeze"],
        choices=["ChocoSGD", "DeepSqueeze", "DPSGD"],
    )
    parser.add_argument("--compressors", nargs="+", default=["topk", "identity"], choices=sorted(COMPRESSORS))
    parser.add_argument(
        "--against", default=None, help="a git revision whose ec_hooks/gossip.py to compare with"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    versions = [("this checkout", current)]
    if args.against:
        versions.insert(0, (args.against, _module_at(args.against)))
    print(
        f"{args.workers} simulated workers on a ring, {args.numel:,} fp32 parameters each, "
        f"{args.threads} threads; per step of all workers\n"
    )
    print(
        "| algorithm | compressor | version | step (ms) | peak extra (MiB) | allocated / step (MiB) | allocations >= 1 MiB |"
    )
    print("|---|---|---|---:|---:|---:|---:|")
    for algorithm in args.algorithms:
        for name in args.compressors if algorithm != "DPSGD" else ["identity"]:
            runs: dict[str, list] = {}
            for label, module in versions * 2:  # alternated, so both see the same load
                runs.setdefault(label, []).append(
                    _measure(module, algorithm, COMPRESSORS[name](), args.workers, args.numel, args.steps)
                )
            for label, results in runs.items():
                seconds = min(r[0] for r in results)
                _, peak, allocated, big = results[-1]
                print(
                    f"| {algorithm} | {name} | {label} | {seconds * 1e3:.0f} | {peak / 2**20:.1f} | "
                    f"{allocated / 2**20:.1f} | {big} |"
                )


if __name__ == "__main__":
    main()
