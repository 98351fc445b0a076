"""Run a function in ``world_size`` real processes on the gloo backend and collect the results.

Functions must be importable (defined at module level in a test module).  Each process calls
``fn(rank, world_size, *args)`` after ``init_process_group``; what it returns is sent back to
the test through a queue.  A failure in any rank fails the test with that rank's traceback.

The ranks are forked from one server process per test session that has imported torch and
ec_hooks once (``forkserver`` with a preload), instead of each rank importing them again
(``spawn``): on two loaded cores that import is most of a short test's time.  The server runs no
test code, so every rank still starts from the state those imports leave.
"""

from __future__ import annotations

import io
import os
import socket
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, fn, args, queue):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        result = fn(rank, world_size, *args)
        # Serialized, so no tensor shares memory with a process that is about to exit.
        buffer = io.BytesIO()
        torch.save(result, buffer)
        queue.put((rank, "ok", buffer.getvalue()))
    except BaseException:  # noqa: BLE001 - the traceback goes back to the test
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


PRELOAD = ["torch", "torch.distributed", "torch.nn.parallel", "ec_hooks", "tests.distributed"]


def context():
    """The multiprocessing context of the ranks: forked from a server that preloaded ``PRELOAD``."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    return ctx


def run_distributed(fn, world_size: int, *args, timeout: float = 240.0) -> list:
    """Run ``fn`` on ``world_size`` gloo ranks; return the list of per-rank results."""
    ctx = context()
    queue = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_worker, args=(r, world_size, port, fn, args, queue)) for r in range(world_size)
    ]
    for p in procs:
        p.start()
    results: dict[int, object] = {}
    errors: list[str] = []
    try:
        for _ in range(world_size):
            rank, status, value = queue.get(timeout=timeout)
            if status == "ok":
                results[rank] = torch.load(io.BytesIO(value), weights_only=False)
            else:
                errors.append(f"rank {rank}:\n{value}")
                break
    finally:
        for p in procs:
            p.join(timeout=5 if errors else 30)
            if p.is_alive():
                p.kill()
    if errors:
        raise AssertionError("distributed worker failed\n" + "\n".join(errors))
    return [results[r] for r in range(world_size)]
