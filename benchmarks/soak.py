"""Soak run: many steps of Mem-SGD (DDP hook) and DeepSqueeze on CPU, watching what could creep.

``--world-size`` real gloo processes train a small MLP on a fixed synthetic regression task.
Every ``--every`` steps each rank records

* Mem-SGD: the L2 norm of its error-feedback memory (``state.memory.norm()``),
* DeepSqueeze: the consensus distance ``sqrt((1/n) sum_i ||x_i - x_bar||^2)`` and the norm of its
  compression error ``delta``,
* the loss, and the process's resident memory (VmRSS from ``/proc/self/status``).

Printed: one Markdown table per algorithm (first / max / last of each figure, RSS after the
warm-up and at the end, rank maximum) and, with ``--json``, every sample.  Bounded means: the
figures of the second half of the run stay within a factor of those of the first half, and RSS
does not grow.

    python benchmarks/soak.py                          # 2,000 steps, 3 ranks, both algorithms
    python benchmarks/soak.py --steps 200 --json out.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import ec_hooks  # noqa: E402

ALGORITHMS = ("memsgd", "deepsqueeze")
WARMUP = 20  # RSS is taken once the allocator and the gloo buffers have settled


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1))


def _data(rank: int, steps: int, batch: int = 16):
    g = torch.Generator().manual_seed(1234)
    w = torch.randn(32, 1, generator=g)
    g.manual_seed(100 + rank)
    # A fixed pool of batches, cycled: the run is long, the data needs not be.
    x = torch.randn(64, batch, 32, generator=g)
    y = torch.tanh(x @ w) + 0.05 * torch.randn(64, batch, 1, generator=g)
    return x, y


def _run(rank: int, world_size: int, port: int, algorithm: str, steps: int, every: int, queue) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        model = _model(0)
        x, y = _data(rank, steps)
        samples = []
        if algorithm == "memsgd":
            ddp = torch.nn.parallel.DistributedDataParallel(model)
            state = ec_hooks.ErrorFeedbackState(compressor=ec_hooks.TopK(0.01), module=ddp)
            ddp.register_comm_hook(state, ec_hooks.error_feedback_hook)
            net, optimizer, gossip = ddp, torch.optim.SGD(model.parameters(), lr=0.05), None
        else:
            net, optimizer = model, torch.optim.SGD(model.parameters(), lr=0.05)
            gossip = ec_hooks.DeepSqueeze(
                model.parameters(), topology="ring", compressor=ec_hooks.TopK(0.01), watch_every=0
            )
        started = time.perf_counter()
        rss_start = None
        for step in range(1, steps + 1):
            i = step % x.shape[0]
            loss = torch.nn.functional.mse_loss(net(x[i]), y[i])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if gossip is not None:
                gossip.step()
            if step == WARMUP:
                rss_start = rss_mib()
            if step % every == 0 or step == steps:
                sample = {"step": step, "loss": float(loss.detach()), "rss_mib": rss_mib()}
                if gossip is None:
                    sample["memory_norm"] = state.memory.norm()
                else:
                    sample["consensus_distance"] = gossip.consensus_distance()
                    sample["delta_norm"] = float(gossip._delta.norm())
                samples.append(sample)
        queue.put(
            (
                rank,
                {
                    "samples": samples,
                    "rss_start_mib": rss_start,
                    "rss_end_mib": rss_mib(),
                    "seconds": time.perf_counter() - started,
                },
            )
        )
    finally:
        dist.destroy_process_group()


def run(
    algorithm: str, steps: int = 2000, world_size: int = 3, every: int = 100, timeout: float = 1800
) -> dict:
    """Run one soak; returns per-rank results (samples, RSS start/end, seconds)."""
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm must be one of {list(ALGORITHMS)}, got {algorithm!r}")
    if steps <= WARMUP:
        raise ValueError(f"steps must be > {WARMUP}, got {steps}")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [
        ctx.Process(target=_run, args=(r, world_size, port, algorithm, steps, every, queue))
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    try:
        results = dict(queue.get(timeout=timeout) for _ in procs)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    return {
        "algorithm": algorithm,
        "steps": steps,
        "world_size": world_size,
        "ranks": [results[r] for r in range(world_size)],
    }


def summarize(result: dict) -> dict:
    """Rank-maximum figures: first/max/last of the watched norm, first/second-half maxima, RSS."""
    key = "memory_norm" if result["algorithm"] == "memsgd" else "consensus_distance"
    per_step = {}
    for rank in result["ranks"]:
        for s in rank["samples"]:
            per_step[s["step"]] = max(per_step.get(s["step"], 0.0), s[key])
    steps = sorted(per_step)
    values = [per_step[s] for s in steps]
    half = len(values) // 2
    summary = {
        "watched": key,
        "first": values[0],
        "max": max(values),
        "last": values[-1],
        "max_first_half": max(values[:half] or values),
        "max_second_half": max(values[half:]),
        "finite": all(math.isfinite(v) for v in values),
        "rss_start_mib": max(r["rss_start_mib"] for r in result["ranks"]),
        "rss_end_mib": max(r["rss_end_mib"] for r in result["ranks"]),
        "loss_first": max(r["samples"][0]["loss"] for r in result["ranks"]),
        "loss_last": max(r["samples"][-1]["loss"] for r in result["ranks"]),
        "seconds": max(r["seconds"] for r in result["ranks"]),
    }
    if result["algorithm"] == "deepsqueeze":
        summary["delta_norm_max"] = max(s["delta_norm"] for r in result["ranks"] for s in r["samples"])
    return summary


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--world-size", type=int, default=3)
    parser.add_argument("--every", type=int, default=100)
    parser.add_argument("--algorithms", nargs="+", default=list(ALGORITHMS), choices=ALGORITHMS)
    parser.add_argument("--json", help="write every sample to this file")
    args = parser.parse_args(argv)
    out = {}
    print(
        f"| algorithm | steps | ranks | watched | first | max (1st half) | max (2nd half) | last | "
        f"loss first -> last | RSS after {WARMUP} steps MiB | RSS end MiB | seconds |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for algorithm in args.algorithms:
        result = run(algorithm, args.steps, args.world_size, args.every)
        s = summarize(result)
        out[algorithm] = {"summary": s, "result": result}
        print(
            f"| {algorithm} | {args.steps} | {args.world_size} | {s['watched']} | {s['first']:.4g} | "
            f"{s['max_first_half']:.4g} | {s['max_second_half']:.4g} | {s['last']:.4g} | "
            f"{s['loss_first']:.4g} -> {s['loss_last']:.4g} | {s['rss_start_mib']:.1f} | "
            f"{s['rss_end_mib']:.1f} | {s['seconds']:.1f} |",
            flush=True,
        )
        if algorithm == "deepsqueeze":
            print(f"|   (deepsqueeze max ||delta||: {s['delta_norm_max']:.4g}) |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
