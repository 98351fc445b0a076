"""Top-k selection and the error-feedback top-k step: torch.topk against our backends.

For each size and density, every method runs on the same data, taking turns repetition by
repetition (machines here are shared and noisy, so only side-by-side ratios mean much), and the
median time is reported.  Methods:

* ``torch.topk EF step`` -- what one writes with torch alone: ``m += g``;
  ``i = topk(|m|, k).indices``; ``v = m[i]``; ``m[i] = 0``.  The baseline.
* ``EF step, threshold`` (CPU) / ``EF step, CUDA kernels`` (GPU) --
  :func:`ec_hooks.kernels.error_feedback_topk_` with the same effect (and an exact tie rule).
* ``select, torch.topk`` / ``select, threshold`` / ``select, CUDA kernels`` -- selection alone
  on a fixed tensor (``topk(|x|, k)`` against :func:`ec_hooks.kernels.topk_magnitude`).

"one call" is the median time of a call started on an idle device (on a GPU it includes the
host's launch overhead); "back to back" is the time per call when ``--repeat`` calls are issued in
a row, as a training step issues one per bucket (the host runs ahead of the device).  GB/s and
``x bound`` use the back-to-back time and count the bytes a perfect implementation must move: 12
per entry for the EF step (read m, read g, write m; fp32) and 4 for selection alone (read x
once); ``x bound`` is the time over those bytes at the copy bandwidth measured in the same run.

    python benchmarks/selection.py --devices cpu --sizes 1M,10M --densities 0.01 --threads 1
    python benchmarks/selection.py --devices cuda --sizes 1M,10M,25M,100M --densities 0.001,0.01,0.1
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from ec_hooks.kernels import error_feedback_topk_, topk_magnitude  # noqa: E402

BASELINE = "torch.topk EF step"


def parse_size(text: str) -> int:
    text = text.strip().upper()
    scale = {"K": 10**3, "M": 10**6, "G": 10**9}.get(text[-1], 1)
    return int(float(text[:-1] if scale > 1 else text) * scale)


def torch_ef_step(m: torch.Tensor, g: torch.Tensor, k: int):
    m.add_(g)
    indices = torch.topk(m.abs(), k, sorted=False).indices
    values = m[indices]
    m.index_fill_(0, indices, 0.0)
    return indices, values


class Timer:
    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __call__(self, fn) -> float:
        if self.cuda:
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            stop.record()
            stop.synchronize()
            return start.elapsed_time(stop) / 1e3
        begin = time.perf_counter()
        fn()
        return time.perf_counter() - begin


def copy_bandwidth(device: torch.device, timer: Timer) -> float:
    """Bytes read plus written per second by a large tensor copy."""
    numel = 64 * 2**20 if device.type == "cuda" else 16 * 2**20
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    times = [timer(lambda: dst.copy_(src)) for _ in range(10)]
    return 2 * 4 * numel / statistics.median(times[2:])


def methods_for(device: torch.device) -> dict:
    if device.type == "cuda":
        return {
            BASELINE: ("ef", torch_ef_step),
            "EF step, CUDA kernels": ("ef", lambda m, g, k: error_feedback_topk_(m, g, k, backend="cuda")),
            "select, torch.topk": ("select", lambda x, k: torch.topk(x.abs(), k, sorted=False).indices),
            "select, CUDA kernels": ("select", lambda x, k: topk_magnitude(x, k, backend="cuda")),
        }
    return {
        BASELINE: ("ef", torch_ef_step),
        "EF step, threshold": ("ef", lambda m, g, k: error_feedback_topk_(m, g, k, backend="cpu")),
        "select, torch.topk": ("select", lambda x, k: torch.topk(x.abs(), k, sorted=False).indices),
        "select, threshold": ("select", lambda x, k: topk_magnitude(x, k, backend="cpu")),
    }


def run_case(device, n, density, repeat, warmup, grad_dtype, timer, bandwidth):
    k = max(1, round(density * n))
    generator = torch.Generator(device=device).manual_seed(n)
    g = torch.randn(n, device=device, generator=generator).to(grad_dtype)
    x = torch.randn(n, device=device, generator=generator)
    methods = methods_for(device)
    memories = {name: torch.randn(n, device=device, generator=generator) * 0.1 for name in methods}
    times = {name: [] for name in methods}
    for rep in range(warmup + repeat):
        for name, (kind, fn) in methods.items():
            if kind == "ef":
                m = memories[name]
                elapsed = timer(lambda m=m, fn=fn, g=g, k=k: fn(m, g, k))
            else:
                elapsed = timer(lambda fn=fn, x=x, k=k: fn(x, k))
            if rep >= warmup:
                times[name].append(elapsed)
    # Back to back: `repeat` calls issued in a row, as a training step issues one per bucket; the
    # host runs ahead of the device, so launch overhead hides behind the device work.
    pipelined = {}
    for name, (kind, fn) in methods.items():
        call = (
            (lambda m=memories[name], fn=fn, g=g, k=k: fn(m, g, k))
            if kind == "ef"
            else (lambda fn=fn, x=x, k=k: fn(x, k))
        )
        pipelined[name] = timer(lambda call=call: [call() for _ in range(repeat)]) / repeat
    rows = []
    base, select_base = BASELINE, "select, torch.topk"
    for name, (kind, _) in methods.items():
        seconds = statistics.median(times[name])
        nbytes = (12 if kind == "ef" else 4) * n
        reference = base if kind == "ef" else select_base
        rows.append(
            {
                "device": device.type,
                "n": n,
                "density": density,
                "k": k,
                "method": name,
                "seconds": seconds,
                "pipelined": pipelined[name],
                "gbps": nbytes / pipelined[name] / 1e9,
                "speedup": statistics.median(times[reference]) / seconds,
                "speedup_pipelined": pipelined[reference] / pipelined[name],
                "x_bound": pipelined[name] / (nbytes / bandwidth),
            }
        )
    return rows


def profile(device: torch.device, n: int, density: float, grad_dtype: torch.dtype) -> None:
    """Where the time of one CUDA error-feedback step goes: host time per call, the same steps
    replayed from a CUDA graph (no launch gaps: the GPU-bound time), and the per-kernel times."""
    k = max(1, round(density * n))
    m = torch.randn(n, device=device)
    g = torch.randn(n, device=device).to(grad_dtype)
    steps = {
        BASELINE: lambda: torch_ef_step(m, g, k),
        "EF step, CUDA kernels": lambda: error_feedback_topk_(m, g, k, backend="cuda"),
    }
    for name, fn in steps.items():
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        begin = time.perf_counter()
        for _ in range(50):
            fn()
        host = (time.perf_counter() - begin) / 50
        torch.cuda.synchronize()
        wall = (time.perf_counter() - begin) / 50
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            fn()  # the capture stream gets its workspace outside the capture
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            fn()
        timer = Timer(device)
        replay = statistics.median(timer(graph.replay) for _ in range(30))
        print(
            f"{name}, n={n:,}, k={k:,}: host {host * 1e6:.0f} us/call, wall {wall * 1e6:.0f} us/call, "
            f"graph replay {replay * 1e6:.0f} us"
        )
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            steps["EF step, CUDA kernels"]()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12))


def format_time(seconds: float) -> str:
    return f"{seconds * 1e3:.2f} ms" if seconds >= 1e-3 else f"{seconds * 1e6:.0f} us"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--devices",
        default="cpu" + (",cuda" if torch.cuda.is_available() else ""),
        help="comma-separated: cpu, cuda",
    )
    parser.add_argument(
        "--sizes", default="1M,10M", help="comma-separated entry counts, e.g. 1M,10M,25M,100M"
    )
    parser.add_argument("--densities", default="0.001,0.01,0.1", help="comma-separated fractions kept")
    parser.add_argument("--repeat", type=int, default=None, help="timed repetitions (default: 5 CPU, 30 GPU)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--grad-dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="CUDA only: host time, graph-replay time and per-kernel times at the first size/density",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    sizes = [parse_size(s) for s in args.sizes.split(",")]
    densities = [float(d) for d in args.densities.split(",")]
    grad_dtype = getattr(torch, args.grad_dtype)
    rows, header = [], []
    for name in args.devices.split(","):
        device = torch.device(name.strip())
        if device.type == "cuda":
            device = torch.device("cuda", torch.cuda.current_device())
            label = torch.cuda.get_device_name(device)
        else:
            label = f"{platform.processor() or platform.machine()}, {args.threads} thread(s)"
        timer = Timer(device)
        if args.profile and device.type == "cuda":
            profile(device, sizes[0], densities[0], grad_dtype)
            continue
        bandwidth = copy_bandwidth(device, timer)
        header.append(f"{device.type}: {label}; copy bandwidth {bandwidth / 1e9:.0f} GB/s (read + write)")
        repeat = args.repeat or (30 if device.type == "cuda" else 5)
        for n in sizes:
            for density in densities:
                rows += run_case(device, n, density, repeat, args.warmup, grad_dtype, timer, bandwidth)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                last = rows[-4:]
                print(
                    f"# {device.type} n={n} density={density}: "
                    + ", ".join(f"{r['method']} {format_time(r['seconds'])}" for r in last),
                    file=sys.stderr,
                )
    print(f"torch {torch.__version__}; grad dtype {args.grad_dtype}; median of the timed repetitions")
    for line in header:
        print(f"- {line}")
    print()
    print(
        "| device | entries | density | method | one call | speed-up | back to back, per call | speed-up "
        "| GB/s | x bandwidth bound |"
    )
    print("|---|---:|---:|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['device']} | {r['n']:,} | {r['density']:g} | {r['method']} | {format_time(r['seconds'])} | "
            f"{r['speedup']:.1f}x | {format_time(r['pipelined'])} | {r['speedup_pipelined']:.1f}x | "
            f"{r['gbps']:.1f} | {r['x_bound']:.1f} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"header": header, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
