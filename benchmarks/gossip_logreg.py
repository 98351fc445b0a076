"""Decentralized logistic regression: DeepSqueeze / CHOCO-SGD / D-PSGD against allreduce SGD.

``--world-size`` gloo processes on this machine, each with its own data shard: a dense synthetic
problem in the spirit of the Mem-SGD paper's epsilon experiment (``--dim`` features, labels from
a hidden linear model with 10% of them flipped), where every shard's features are shifted by a
shard-specific mean so that the local optima differ.  Every method starts from zero and takes the
same ``--steps`` mini-batch SGD steps (same batches, same learning rate) on the local shard; the
gossip methods then mix over a ring, allreduce SGD averages the gradients.

    python benchmarks/gossip_logreg.py                         # 8 workers, ring, 1500 steps
    python benchmarks/gossip_logreg.py --world-size 4 --steps 500 --quick
    python benchmarks/gossip_logreg.py --algorithms DeepSqueeze --consensus-steps 0.02,0.05,0.1,0.2

Prints a Markdown table: algorithm, compressor, consensus step (the default is marked), final
training loss of the mean model on all data (and its excess over allreduce SGD; "diverged" above
10x), final consensus distance, bytes each worker sends per step, and their ratio to the bytes of
the model (what each worker contributes to a dense allreduce).
"""

from __future__ import annotations

import argparse
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
from ec_hooks.gossip import default_consensus_step  # noqa: E402

COMPRESSORS = {
    "top-k 1%": lambda: ec_hooks.TopK(0.01),
    "top-k 10%": lambda: ec_hooks.TopK(0.1),
    "rand-k 10%": lambda: ec_hooks.RandK(0.1),
    "scaled sign": lambda: ec_hooks.ScaledSign(),
    "QSGD 4-bit": lambda: ec_hooks.QSGD.from_bits(4),
}


def configurations(args) -> list[tuple]:
    """(algorithm class or None for allreduce, compressor name, consensus step or None)."""
    out = [(None, "-", None), (ec_hooks.DPSGD, "-", None)]
    for cls, key in ((ec_hooks.DeepSqueeze, "deepsqueeze"), (ec_hooks.ChocoSGD, "choco")):
        if cls.__name__ not in args.algorithms.split(","):
            continue
        for name, build in COMPRESSORS.items():
            if args.compressors and name not in args.compressors.split(","):
                continue
            default = default_consensus_step(key, build())
            if args.consensus_steps:
                steps = [float(e) for e in args.consensus_steps.split(",")]
            elif args.quick:
                steps = [default]
            else:
                steps = sorted({default, min(1.0, 4 * default), default / 4})
            out += [(cls, name, eta) for eta in steps]
    return out


def make_shard(rank: int, world_size: int, dim: int, samples: int):
    hidden = torch.Generator().manual_seed(12345)
    w_star = torch.randn(dim, generator=hidden) / dim**0.5
    g = torch.Generator().manual_seed(1000 + rank)
    shift = torch.randn(dim, generator=g) * 0.5
    features = (torch.randn(samples, dim, generator=g) + shift) / dim**0.5 * 4
    labels = (features @ w_star > 0).float()
    flip = torch.rand(samples, generator=g) < 0.1
    labels[flip] = 1 - labels[flip]
    return features, labels


def loss_fn(w, b, features, labels, l2):
    return torch.nn.functional.binary_cross_entropy_with_logits(features @ w + b, labels) + 0.5 * l2 * (
        w.pow(2).sum() + b.pow(2).sum()
    )


def _worker(rank, world_size, port, args, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    features, labels = make_shard(rank, world_size, args.dim, args.samples)
    l2 = 1.0 / (args.samples * world_size)
    rows = []
    for cls, compressor_name, eta in configurations(args):
        w = torch.zeros(args.dim, requires_grad=True)
        b = torch.zeros(1, requires_grad=True)
        optimizer = torch.optim.SGD([w, b], lr=args.lr)
        gossip = None
        if cls is ec_hooks.DPSGD:
            gossip = cls([w, b], args.topology, watch_every=0)
        elif cls is not None:
            gossip = cls([w, b], args.topology, COMPRESSORS[compressor_name](), eta, watch_every=0)
        batches = torch.Generator().manual_seed(rank)
        started = time.perf_counter()
        for _ in range(args.steps):
            index = torch.randint(args.samples, (args.batch_size,), generator=batches)
            optimizer.zero_grad()
            loss_fn(w, b, features[index], labels[index], l2).backward()
            if gossip is None:
                for p in (w, b):
                    dist.all_reduce(p.grad)
                    p.grad.div_(world_size)
            optimizer.step()
            if gossip is not None:
                gossip.step()
        seconds = time.perf_counter() - started
        if gossip is None:
            mean, distance = [w.detach(), b.detach()], 0.0
            bytes_per_step = dense = (args.dim + 1) * 4
        else:
            mean, distance = gossip.average_parameters(), gossip.consensus_distance()
            bytes_per_step = gossip.stats.bytes_sent / gossip.stats.steps
            dense = gossip.stats.bytes_dense / gossip.stats.steps
        with torch.no_grad():
            final = loss_fn(mean[0], mean[1], features, labels, l2).reshape(1)
        dist.all_reduce(final)
        name = "allreduce SGD" if cls is None else cls.__name__
        rows.append(
            (
                name,
                compressor_name,
                eta if gossip is None or eta is not None else gossip.consensus_step,
                float(final) / world_size,
                distance,
                bytes_per_step,
                dense,
                seconds,
            )
        )
    if rank == 0:
        queue.put(rows)
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--world-size", type=int, default=8)
    parser.add_argument("--topology", default="ring")
    parser.add_argument("--dim", type=int, default=2000)
    parser.add_argument("--samples", type=int, default=1000, help="per worker")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--lr", type=float, default=0.5)
    parser.add_argument("--quick", action="store_true", help="default consensus steps only")
    parser.add_argument("--algorithms", default="DeepSqueeze,ChocoSGD")
    parser.add_argument("--compressors", default="", help=f"comma-separated subset of {list(COMPRESSORS)}")
    parser.add_argument(
        "--consensus-steps",
        default="",
        help="comma-separated steps to try (default: the default, 4x and 1/4 of it)",
    )
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    started = time.perf_counter()
    procs = [
        ctx.Process(target=_worker, args=(r, args.world_size, port, args, queue))
        for r in range(args.world_size)
    ]
    for p in procs:
        p.start()
    rows = queue.get()
    for p in procs:
        p.join()
    topology = ec_hooks.Topology.make(args.topology, args.world_size)
    print(
        f"{args.world_size} workers, {topology}, dim {args.dim}, {args.samples} samples per worker, batch "
        f"{args.batch_size}, lr {args.lr}, {args.steps} steps ({time.perf_counter() - started:.0f} s)\n"
    )
    reference = rows[0][3]
    print(
        "| algorithm | compressor | consensus step | final loss | vs allreduce | consensus distance "
        "| bytes/step/worker | vs dense allreduce |"
    )
    print("|---|---|---|---|---|---|---|---|")
    defaults = {
        (cls.__name__, name): default_consensus_step(key, build())
        for cls, key in ((ec_hooks.DeepSqueeze, "deepsqueeze"), (ec_hooks.ChocoSGD, "choco"))
        for name, build in COMPRESSORS.items()
    }
    for name, compressor, eta, loss, distance, sent, dense, _ in rows:
        step = "-" if eta is None else f"{eta:g}"
        if defaults.get((name, compressor)) == eta:
            step += " (default)"
        if math.isfinite(loss) and loss < 10 * reference:
            result = f"{loss:.4f} | {100 * (loss - reference) / reference:+.2f}%"
        else:
            result = "diverged | -"
        print(
            f"| {name} | {compressor} | {step} | {result} | {distance:.3g} | {sent:,.0f} | {sent / dense:.3g}x |"
        )


if __name__ == "__main__":
    main()
