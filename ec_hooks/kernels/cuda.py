"""The CUDA selection kernels (``cuda/topk_select.cu``), loaded through CuPy.

* The sources ship inside the wheel as package data of ``ec_hooks._cuda``; in a source checkout
  they are read from ``cuda/`` beside the package.
* One ``cupy.RawModule`` per device, compiled by NVRTC on first use (CuPy also caches the binary
  on disk) and kept for the life of the process.  CuPy is imported only here, lazily.
* Every launch goes to torch's current stream of the tensor's device, through
  ``cupy.cuda.ExternalStream``; tensors are handed over zero-copy as raw device pointers (what
  DLPack would hand over, without building a capsule per tensor per call).  Nothing
  synchronizes with the host.
* Scratch memory: one workspace per stream, from torch's caching allocator, kept and reused
  (about 4 bytes per entry of the largest input seen on that stream).

The pipeline and the order it selects in are described at the top of ``topk_select.cu``.
"""

from __future__ import annotations

import importlib.resources
import logging
import math
import pathlib
import threading

import torch

__all__ = [
    "KERNEL_NAMES",
    "SOURCE_FILES",
    "cuda_status",
    "error_feedback_topk_cuda_",
    "topk_magnitude_cuda",
    "undo_accumulate_cuda_",
]

logger = logging.getLogger(__name__)

SOURCE_FILES = ("topk_select.cu",)

# Must match topk_select.cu.
_THREADS = 256
_TILE = 4096
_SELECT_THREADS = 1024
_MAX_BLOCKS = 4096
_HEADER = 6672 + 2 * _MAX_BLOCKS
_SAMPLES = 64 * 256
_MAX_NUMEL = 2**31 - 1  # int32 indices

_TYPE_NAMES = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}
# 16-byte loads of 4 fp32, 8-byte loads of 4 16-bit entries
_ALIGN = {torch.float32: 16, torch.bfloat16: 8, torch.float16: 8}

#: every kernel the launchers use (the nvcc test checks that the sources define them all)
KERNEL_NAMES = (
    tuple(
        f"ec_{stage}_{name}"
        for stage in ("sample_acc", "sample", "accumulate", "histogram", "filter", "undo_accumulate")
        for name in _TYPE_NAMES.values()
    )
    + ("ec_refine", "ec_count", "ec_emit_index_only")
    + tuple(f"ec_emit_{name}_{mode}" for name in _TYPE_NAMES.values() for mode in ("keep", "subtract"))
)

_lock = threading.Lock()
_modules: dict[int, _DeviceKernels] = {}
_status: dict[int, tuple[bool, str]] = {}


def read_sources() -> str:
    """The concatenated CUDA sources, from the installed package data or the source checkout."""
    try:
        root = importlib.resources.files("ec_hooks._cuda")
        texts = [root.joinpath(name).read_text() for name in SOURCE_FILES]
    except (ModuleNotFoundError, FileNotFoundError, TypeError):
        root = pathlib.Path(__file__).resolve().parents[2] / "cuda"
        texts = [(root / name).read_text() for name in SOURCE_FILES]
    return "\n".join(texts)


class _Workspace:
    """The kernels' scratch memory for one stream: a header (histograms and state, zero between
    calls: the kernels clear what they used), per-tile counts, and the candidates' indices and
    values (8 bytes per entry of capacity).  Reused by every call on that stream (stream order
    keeps calls apart) and grown when a larger input comes."""

    def __init__(self, capacity: int, device: torch.device):
        import numpy

        self.capacity = capacity
        max_tiles = -(-capacity // _TILE)
        self.tensor = torch.zeros(_HEADER + 3 * max_tiles + 2 * capacity, dtype=torch.int32, device=device)
        base = self.tensor.data_ptr()
        offsets = (
            0,
            _HEADER,
            _HEADER + max_tiles,
            _HEADER + 2 * max_tiles,
            _HEADER + 3 * max_tiles,
            _HEADER + 3 * max_tiles + capacity,
        )
        (self.ws, self.tile_count, self.tile_above, self.tile_tied, self.seg_index, self.seg_value) = (
            numpy.uint64(base + 4 * offset) for offset in offsets
        )


class _DeviceKernels:
    """The compiled module of one device, its kernels, the grid that fills the device, and one
    workspace per stream."""

    def __init__(self, device_index: int):
        import cupy

        self.cupy = cupy
        self.device_index = device_index
        with cupy.cuda.Device(device_index):
            self.module = cupy.RawModule(code=read_sources())
            self.module.compile()
            self.functions = {name: self.module.get_function(name) for name in KERNEL_NAMES}
            self.sm_count = cupy.cuda.runtime.getDeviceProperties(device_index)["multiProcessorCount"]
            # The streaming kernels keep 4 blocks of 256 threads per SM resident (the heaviest
            # uses 53 registers): a persistent grid of that size covers the device in one wave.
            # The kernels over candidates are latency-bound: twice as many warps.
            self.grid = 4 * self.sm_count
            self.candidate_grid = min(8 * self.sm_count, _MAX_BLOCKS)
        self._streams: dict[int, object] = {}
        self._workspaces: dict[int, _Workspace] = {}
        # Calls that share a stream share its workspace: their launches must not interleave.
        self.lock = threading.Lock()

    def stream(self, handle: int):
        stream = self._streams.get(handle)
        if stream is None:
            stream = self._streams[handle] = self.cupy.cuda.ExternalStream(handle, self.device_index)
        return stream

    def workspace(self, handle: int, n: int, device: torch.device) -> _Workspace:
        ws = self._workspaces.get(handle)
        if ws is None or ws.capacity < n:
            # Allocated on the current stream (torch's allocator is stream-aware); the old one is
            # released after the launches already queued on this stream.
            ws = self._workspaces[handle] = _Workspace(n, device)
        return ws


def _kernels(device_index: int) -> _DeviceKernels:
    kernels = _modules.get(device_index)
    if kernels is None:
        with _lock:
            kernels = _modules.get(device_index)
            if kernels is None:
                kernels = _modules[device_index] = _DeviceKernels(device_index)
    return kernels


def cuda_status(device_index: int = 0) -> tuple[bool, str]:
    """Whether the CUDA kernels work on this device, and why not (checked once per device).

    Checks that CuPy imports, sees the device, and compiles and loads the module.
    """
    status = _status.get(device_index)
    if status is not None:
        return status
    try:
        import cupy
    except Exception as exc:  # ImportError, or a CuPy that fails at import (CUDA mismatch)
        status = (False, f"CuPy is not importable ({type(exc).__name__}: {exc}); install ec-hooks[cuda]")
    else:
        try:
            _kernels(device_index)
            status = (True, f"CuPy {cupy.__version__}, kernels compiled for device {device_index}")
        except Exception as exc:
            status = (False, f"CuPy {cupy.__version__} cannot run the kernels ({type(exc).__name__}: {exc})")
    _status[device_index] = status
    return status


def _pointer(tensor: torch.Tensor):
    import numpy

    return numpy.uint64(tensor.data_ptr())


def _aligned(tensor: torch.Tensor) -> bool:
    return tensor.data_ptr() % _ALIGN[tensor.dtype] == 0


def _check(name: str, tensor: torch.Tensor, dtypes) -> None:
    if not tensor.is_cuda:
        raise ValueError(f"{name} must be a CUDA tensor for the 'cuda' backend, got device {tensor.device}")
    if tensor.dtype not in dtypes:
        raise ValueError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {tensor.dtype}")
    if tensor.numel() > _MAX_NUMEL:
        raise ValueError(f"{name} has {tensor.numel()} entries; the CUDA kernels take at most {_MAX_NUMEL}")


def _sample_rank(n: int, k: int) -> int:
    """Rank in the 16K-entry sample whose D1 bucket bounds stage 1's candidates from below.

    The expected rank of the k-th largest entry plus four binomial standard deviations plus 8:
    the true k-th entry is almost never below that bucket (if it is, stage 2 makes one more pass;
    the result is the same).  0 (no sample) for small inputs and large densities, where a second
    pass costs little or the candidates would be most of the input.
    """
    if n < 8 * _SAMPLES:
        return 0
    expected = k * _SAMPLES / n
    rank = math.ceil(expected + 4.0 * math.sqrt(expected) + 8)
    return rank if rank <= _SAMPLES // 2 else 0


def _run(
    flat: torch.Tensor,
    k: int,
    stage0: str,
    stage1: str,
    stage1_args: tuple,
    type_name: str,
    emit: str,
    emit_args: tuple,
) -> None:
    """Launches the pipeline of ``topk_select.cu`` on torch's current stream: stages 0 and 1 with
    their pointer arguments, stage 2 on ``flat`` (``type_name`` entries), stages 3-4, and stage 5
    ``emit`` with ``emit_args`` = (memory or null, out_index, out_value or null, k, grad_finite
    or null)."""
    import numpy

    device = flat.device
    n = flat.numel()
    kernels = _kernels(device.index)
    fn = kernels.functions
    handle = torch.cuda.current_stream(device).cuda_stream
    ntiles = -(-n // _TILE)
    grid = (min(ntiles, kernels.grid),)
    candidate_grid = (min(-(-ntiles // 4), kernels.candidate_grid),)  # stages 4 and 5 must share it
    block = (_THREADS,)
    x, n_c, k_c = _pointer(flat), numpy.int64(n), numpy.uint32(k)
    rank = _sample_rank(n, k)
    with kernels.lock, kernels.cupy.cuda.Device(device.index), kernels.stream(handle):
        ws = kernels.workspace(handle, n, device)
        seg = (ws.seg_index, ws.seg_value, ws.tile_count)
        if rank:
            fn[stage0]((_SAMPLES // _THREADS,), block, (*stage1_args, n_c, ws.ws))
        fn[stage1](grid, block, (*stage1_args, n_c, numpy.uint32(rank), ws.ws, *seg))
        fn[f"ec_filter_{type_name}"](grid, block, (x, n_c, k_c, ws.ws, *seg))
        fn["ec_refine"](candidate_grid, block, (n_c, ws.ws, ws.seg_value, ws.tile_count))
        fn["ec_count"](
            candidate_grid, block, (n_c, ws.ws, ws.seg_value, ws.tile_count, ws.tile_above, ws.tile_tied)
        )
        fn[emit](
            candidate_grid,
            block,
            (emit_args[0], n_c, ws.ws, *seg, ws.tile_above, ws.tile_tied, *emit_args[1:]),
        )


def topk_magnitude_cuda(x: torch.Tensor, k: int) -> torch.Tensor:
    """Indices (int64, ascending) of the ``k`` entries of largest ``|x|``, ties to the lower index.

    ``x``: a CUDA tensor of fp32, bf16 or fp16; ``1 <= k <= x.numel()``.
    """
    _check("x", x, _TYPE_NAMES)
    flat = x.reshape(-1)
    n = flat.numel()
    if k >= n:
        return torch.arange(n, device=flat.device)
    if not (flat.is_contiguous() and _aligned(flat)):
        flat = flat.clone()
    name = _TYPE_NAMES[flat.dtype]
    import numpy

    out = torch.empty(k, dtype=torch.int32, device=flat.device)
    null = numpy.uint64(0)
    _run(
        flat,
        k,
        f"ec_sample_{name}",
        f"ec_histogram_{name}",
        (_pointer(flat),),
        name,
        "ec_emit_index_only",
        (null, _pointer(out), null, numpy.uint32(k), null),
    )
    return out.long()


def error_feedback_topk_cuda_(
    memory: torch.Tensor, grad: torch.Tensor, k: int, wire_dtype: torch.dtype, subtract_sent: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fused error-feedback step on the GPU; see :func:`ec_hooks.kernels.error_feedback_topk_`."""
    _check("memory", memory, (torch.float32,))
    _check("grad", grad, _TYPE_NAMES)
    _check_wire(wire_dtype)
    target = memory
    if not (memory.is_contiguous() and _aligned(memory)):
        target = memory.reshape(-1).clone()
    flat = target.view(-1)
    g = grad.reshape(-1)
    if not (g.is_contiguous() and _aligned(g)):
        g = g.clone()
    device = flat.device
    indices = torch.empty(k, dtype=torch.int32, device=device)
    values = torch.empty(k, dtype=wire_dtype, device=device)
    grad_finite = torch.empty((), dtype=torch.bool, device=device)
    import numpy

    emit = f"ec_emit_{_TYPE_NAMES[wire_dtype]}_{'subtract' if subtract_sent else 'keep'}"
    name = _TYPE_NAMES[g.dtype]
    _run(
        flat,
        k,
        f"ec_sample_acc_{name}",
        f"ec_accumulate_{name}",
        (_pointer(flat), _pointer(g)),
        "f32",
        emit,
        (_pointer(flat), _pointer(indices), _pointer(values), numpy.uint32(k), _pointer(grad_finite)),
    )
    if target is not memory:
        memory.copy_(target.view_as(memory))
    return indices, values, grad_finite


def undo_accumulate_cuda_(memory: torch.Tensor, grad: torch.Tensor, keep: torch.Tensor) -> None:
    """``memory -= grad`` where ``grad`` is finite, unless the device flag ``keep`` is true."""
    _check("memory", memory, (torch.float32,))
    _check("grad", grad, _TYPE_NAMES)
    if not memory.is_contiguous():
        raise ValueError("memory must be contiguous")
    g = grad.reshape(-1).contiguous()
    keep = keep.reshape(()).to(device=memory.device, dtype=torch.bool)
    n = memory.numel()
    import numpy

    kernels = _kernels(memory.device.index)
    handle = torch.cuda.current_stream(memory.device).cuda_stream
    with kernels.cupy.cuda.Device(memory.device.index), kernels.stream(handle):
        grid = (max(1, min(-(-n // _THREADS), kernels.grid)),)
        kernels.functions[f"ec_undo_accumulate_{_TYPE_NAMES[g.dtype]}"](
            grid, (_THREADS,), (_pointer(memory), _pointer(g), numpy.int64(n), _pointer(keep))
        )


def _check_wire(wire_dtype: torch.dtype) -> None:
    if wire_dtype not in _TYPE_NAMES:
        raise ValueError(f"wire_dtype must be one of {[str(d) for d in _TYPE_NAMES]}, got {wire_dtype}")
