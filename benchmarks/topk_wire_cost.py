"""CPU cost and size of TopK's wire formats: encoding, decoding, densifying one payload.

One bucket of ``--numel`` fp32 entries, top-k at ``--density``, one thread.  The selection is
the same for every format, so it is timed once, for scale, and the formats are timed on its
result: encoding (indices and values into the payload bytes), decoding (back to indices and
values) and the dense decompression the hook's aggregation does.

    python benchmarks/topk_wire_cost.py                  # 10M entries, 1%
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from ec_hooks import TopK  # noqa: E402
from ec_hooks.compressors import Payload  # noqa: E402
from ec_hooks.kernels import to_wire, topk_magnitude  # noqa: E402

FORMATS = {
    "int32 + fp32": {},
    "delta16 + fp32": {"index_encoding": "delta16"},
    "delta16 + bf16": {"index_encoding": "delta16", "value_dtype": "bf16"},
}


def _median_ms(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--numel", type=int, default=10_000_000)
    parser.add_argument("--density", type=float, default=0.01)
    parser.add_argument("--repeat", type=int, default=25)
    args = parser.parse_args()
    torch.set_num_threads(1)
    x = torch.randn(args.numel, generator=torch.Generator().manual_seed(0))
    k = TopK(args.density).k_for(args.numel)
    indices = topk_magnitude(x, k, backend="cpu")
    print(
        f"{args.numel:,} entries, k = {k:,}, one thread; selection (cpu backend): "
        f"{_median_ms(lambda: topk_magnitude(x, k, backend='cpu'), 5):.1f} ms\n"
    )
    print("| format | payload bytes | bytes / entry | encode (ms) | decode (ms) | densify (ms) |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, options in FORMATS.items():
        compressor = TopK(args.density, **options)
        values = to_wire(x[indices], compressor.value_dtype or torch.float32)
        # _pack is the encoding step of compress() without the selection
        data = compressor._pack(indices, values, args.numel)
        payload = Payload(data=data, shape=x.shape, value_dtype=values.dtype)
        encode = _median_ms(lambda c=compressor, v=values: c._pack(indices, v, args.numel), args.repeat)
        decode = _median_ms(lambda c=compressor, p=payload: c.decode(p), args.repeat)
        densify = _median_ms(lambda c=compressor, p=payload: c.decompress(p), max(3, args.repeat // 5))
        print(
            f"| {name} | {payload.nbytes:,} | {payload.nbytes / k:.2f} | {encode:.2f} | {decode:.2f} | {densify:.1f} |"
        )
    # Two gaps above 65535 take the general encoding path (filler slots).
    far = torch.cat(
        [indices[indices < args.numel - 300_000], torch.tensor([args.numel - 200_000, args.numel - 1])]
    )
    compressor = TopK(args.density, index_encoding="delta16")
    print(
        f"\ndelta16 encoding with filler slots (two gaps above 65535): "
        f"{_median_ms(lambda: compressor._pack(far, x[far], args.numel), args.repeat):.2f} ms"
    )


if __name__ == "__main__":
    main()
