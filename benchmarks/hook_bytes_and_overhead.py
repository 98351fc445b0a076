"""Bytes per step, compression ratio and CPU overhead of the Mem-SGD hook against DDP's allreduce.

Runs ``world_size`` gloo ranks on this machine.  Every method trains the same model on the same
batches; the methods take turns step by step (interleaved), so machine noise hits them alike and
the ratios compare like with like.

    python benchmarks/hook_bytes_and_overhead.py --world-size 2 --steps 30

Prints a Markdown table: method, bytes sent per step per worker, compression ratio against the
dense allreduce, median step time and its ratio to DDP's default hook.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import ec_hooks  # noqa: E402
from recipes.models import resnet20  # noqa: E402

METHODS = {
    "allreduce (DDP default)": None,
    "top-k 1%": lambda: ec_hooks.TopK(0.01),
    "top-k 1% delta16": lambda: ec_hooks.TopK(0.01, index_encoding="delta16"),
    "top-k 1% delta16 + bf16 values": lambda: ec_hooks.TopK(
        0.01, index_encoding="delta16", value_dtype="bf16"
    ),
    "top-k 0.1%": lambda: ec_hooks.TopK(0.001),
    "rand-k 1%": lambda: ec_hooks.RandK(0.01),
    "rand-k 0.1%": lambda: ec_hooks.RandK(0.001),
    "scaled sign": lambda: ec_hooks.ScaledSign(),
    "QSGD 4-bit": lambda: ec_hooks.QSGD.from_bits(4),
    "fp16 + EF": lambda: ec_hooks.FP16(),
}


def _worker(rank, world_size, port, steps, batch_size, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    runs = {}
    for name, build in METHODS.items():
        torch.manual_seed(0)
        model = DDP(resnet20(num_classes=10))
        state = None
        if build is not None:
            state = ec_hooks.ErrorFeedbackState(compressor=build(), module=model)
            model.register_comm_hook(state, ec_hooks.error_feedback_hook)
        runs[name] = (model, state, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), [])
    generator = torch.Generator().manual_seed(rank)
    for step in range(steps + 2):
        x = torch.randn(batch_size, 3, 32, 32, generator=generator)
        y = torch.randint(0, 10, (batch_size,), generator=generator)
        for model, _, opt, times in runs.values():
            dist.barrier()
            start = time.perf_counter()
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            if step >= 2:  # the first steps include DDP's bucket rebuild
                times.append(time.perf_counter() - start)
    if rank == 0:
        numel = sum(p.numel() for p in runs["allreduce (DDP default)"][0].parameters())
        rows = []
        for name, (_, state, _, times) in runs.items():
            if state is None:
                sent = dense = numel * 4
            else:
                sent, dense = state.stats.last_bytes_sent, state.stats.last_bytes_dense
            rows.append((name, sent, dense / sent, statistics.median(times)))
        queue.put((numel, rows))
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [
        ctx.Process(target=_worker, args=(r, args.world_size, port, args.steps, args.batch_size, queue))
        for r in range(args.world_size)
    ]
    for p in procs:
        p.start()
    numel, rows = queue.get()
    for p in procs:
        p.join()
    base = rows[0][3]
    print(
        f"ResNet-20: {numel:,} parameters, {args.world_size} gloo ranks, batch {args.batch_size}/rank, "
        f"{args.steps} steps, one thread per rank\n"
    )
    print(
        "| method | bytes sent / step / worker | compression ratio | median step (ms) | step time vs allreduce |"
    )
    print("|---|---:|---:|---:|---:|")
    for name, sent, ratio, step in rows:
        print(f"| {name} | {sent:,} | {ratio:.1f}x | {step * 1e3:.1f} | {step / base:.2f} |")


if __name__ == "__main__":
    main()
