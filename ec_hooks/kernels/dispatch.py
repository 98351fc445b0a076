"""Backend choice and the selection entry points (see the package docstring)."""

from __future__ import annotations

import logging
import numbers
from typing import NamedTuple

import torch

from ec_hooks.kernels import cuda as _cuda
from ec_hooks.kernels.reference import topk_magnitude_reference
from ec_hooks.kernels.threshold import topk_magnitude_threshold

__all__ = [
    "BACKENDS",
    "SelectedEntries",
    "error_feedback_topk_",
    "resolve_backend",
    "topk_magnitude",
    "to_wire",
    "undo_accumulate_",
]

logger = logging.getLogger("ec_hooks.kernels")

BACKENDS = ("auto", "torch", "cpu", "cuda")
_WIRE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_announced: set = set()


class SelectedEntries(NamedTuple):
    """What :func:`error_feedback_topk_` returns."""

    #: int32, ascending: the positions of the ``k`` selected entries
    indices: torch.Tensor
    #: the accumulated values at those positions, rounded to the wire dtype
    values: torch.Tensor
    #: 0-dim bool on the tensors' device: every gradient entry was finite
    grad_finite: torch.Tensor


def to_wire(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``values`` cast to the wire dtype, clamped to its largest finite value (as the CUDA
    kernels do).

    An fp32 memory can outgrow fp16 (65504); cast as is, such an entry would travel as inf and
    leave -inf in memory for good.  Clamped, the excess stays in memory and goes out later.
    NaN stays NaN.
    """
    if (
        values.dtype != dtype
        and dtype in (torch.float16, torch.bfloat16)
        and values.is_floating_point()
        and torch.finfo(values.dtype).max > torch.finfo(dtype).max
    ):
        limit = torch.finfo(dtype).max
        values = values.float().clamp(-limit, limit)  # in fp32: bf16 cannot hold fp16's limit
    return values.to(dtype)


def _check_backend(backend) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {list(BACKENDS)}, got {backend!r}")


def _check_k(k, numel: int) -> int:
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 0 <= int(k) <= numel:
        raise ValueError(f"k must be an integer in [0, {numel}] (the number of entries selected), got {k!r}")
    return int(k)


def _announce(key, level: int, message: str, *args) -> None:
    if key not in _announced:
        _announced.add(key)
        logger.log(level, message, *args)


#: Below this many entries torch.topk beats the threshold path on CPU (its fixed costs dominate;
#: measured crossover between 128K and 256K entries at densities 0.1%-10%, one thread).
CPU_THRESHOLD_MIN_NUMEL = 1 << 18


def resolve_backend(backend: str, device: torch.device | str, numel: int | None = None) -> str:
    """The backend that runs for tensors on ``device``: ``"torch"``, ``"cpu"`` or ``"cuda"``.

    ``"auto"`` picks the CUDA kernels for CUDA tensors when CuPy imports and the kernels compile
    on that device, the torch reference otherwise; and for CPU tensors the threshold path, unless
    ``numel`` is below :data:`CPU_THRESHOLD_MIN_NUMEL` (then the torch reference).  The
    choice and its reason are logged once per device.  An explicit ``"cuda"`` that cannot run
    raises instead of falling back.
    """
    _check_backend(backend)
    device = torch.device(device)
    if backend in ("torch", "cpu"):
        return backend
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        ok, reason = _cuda.cuda_status(index)
        if backend == "cuda":
            if not ok:
                raise RuntimeError(f"backend='cuda' cannot run on cuda:{index}: {reason}")
            return "cuda"
        if ok:
            _announce(
                ("cuda", index),
                logging.INFO,
                "top-k selection on cuda:%d uses the CUDA kernels (%s)",
                index,
                reason,
            )
            return "cuda"
        _announce(
            ("cuda", index),
            logging.WARNING,
            "top-k selection on cuda:%d falls back to torch.topk: %s",
            index,
            reason,
        )
        return "torch"
    if backend == "cuda":
        raise ValueError(f"backend='cuda' needs CUDA tensors, got a tensor on {device}")
    if device.type == "cpu":
        _announce(
            ("cpu",),
            logging.INFO,
            "top-k selection on CPU uses the sampled-threshold path for tensors "
            "of %d entries or more, torch.topk below",
            CPU_THRESHOLD_MIN_NUMEL,
        )
        return "torch" if numel is not None and numel < CPU_THRESHOLD_MIN_NUMEL else "cpu"
    _announce((device.type,), logging.INFO, "top-k selection on %s uses torch.topk", device.type)
    return "torch"


def topk_magnitude(x: torch.Tensor, k: int, backend: str = "auto") -> torch.Tensor:
    """Indices (int64, ascending) of the ``k`` entries of largest ``|x|`` (``x`` is flattened).

    Order: larger magnitude first; equal magnitudes go to the lower index; NaN ranks below
    every number, so it is selected only when ``k`` exceeds the number of non-NaN entries; inf
    ranks above every finite value.  Every backend returns exactly this set.

    Args:
        x: tensor of any shape (fp32, bf16 or fp16 on the CUDA backend; any float elsewhere).
        k: number of entries, ``0 <= k <= x.numel()``.
        backend: ``"auto" | "torch" | "cpu" | "cuda"`` (see :func:`resolve_backend`).
    """
    _check_backend(backend)
    flat = x.reshape(-1)
    k = _check_k(k, flat.numel())
    if k == 0:
        return torch.empty(0, dtype=torch.long, device=flat.device)
    chosen = resolve_backend(backend, flat.device, flat.numel())
    if chosen == "cuda" and backend == "auto" and flat.dtype not in _WIRE_DTYPES:
        chosen = "torch"  # the kernels take 16- and 32-bit floats; fp64 models select with torch.topk
    if chosen == "cuda":
        return _cuda.topk_magnitude_cuda(flat, k)
    if chosen == "cpu":
        return topk_magnitude_threshold(flat, k)
    return topk_magnitude_reference(flat, k)


def error_feedback_topk_(
    memory: torch.Tensor,
    grad: torch.Tensor,
    k: int,
    *,
    wire_dtype: torch.dtype | None = None,
    subtract_sent: bool = True,
    backend: str = "auto",
) -> SelectedEntries:
    """The error-feedback top-k step, in place on ``memory``.

    1. ``memory += grad`` at every entry where ``grad`` is finite (a non-finite entry adds
       nothing, so it never reaches memory); ``grad_finite`` records whether all were finite.
    2. Select the ``k`` entries of largest ``|memory|`` (order of :func:`topk_magnitude`).
    3. ``values = memory[indices]`` rounded to ``wire_dtype``.
    4. If ``subtract_sent``: ``memory[indices] -= values`` (the rounded values, so that the
       rounding error of a 16-bit wire stays in memory; with fp32 values the entries become 0).
       This is :meth:`ec_hooks.TopK.subtract_sent_`.

    On the CUDA backend steps 1-4 are one pipeline of kernels on torch's current stream: a
    fused pass reads ``memory`` and ``grad`` and writes ``memory`` once, one more pass reads
    ``memory``, the rest touches only the candidates.  No host synchronization.

    A step that the caller voids afterwards is undone with ``memory[indices] += values`` (if
    subtracted), then :func:`undo_accumulate_`; the undone accumulation is exact up to the
    rounding of ``memory + grad``.

    Args:
        memory: contiguous fp32 tensor (the error-feedback memory), updated in place.
        grad: gradient with ``memory.numel()`` entries, fp32, bf16 or fp16.
        k: number of entries selected, ``0 <= k <= memory.numel()``.
        wire_dtype: dtype of ``values`` (default ``grad.dtype``): fp32, bf16 or fp16.
        subtract_sent: whether to apply step 4.
        backend: ``"auto" | "torch" | "cpu" | "cuda"``.

    Returns:
        :class:`SelectedEntries` ``(indices int32 ascending, values, grad_finite)``.
    """
    _check_backend(backend)
    if memory.dtype != torch.float32 or not memory.is_contiguous():
        raise ValueError(
            f"memory must be a contiguous fp32 tensor, got {memory.dtype} "
            f"({'contiguous' if memory.is_contiguous() else 'not contiguous'})"
        )
    if grad.numel() != memory.numel() or grad.device != memory.device:
        raise ValueError(
            f"grad must have memory's {memory.numel()} entries on {memory.device}, "
            f"got {grad.numel()} on {grad.device}"
        )
    wire_dtype = grad.dtype if wire_dtype is None else wire_dtype
    if wire_dtype not in _WIRE_DTYPES:
        raise ValueError(f"wire_dtype must be one of {[str(d) for d in _WIRE_DTYPES]}, got {wire_dtype}")
    if not isinstance(subtract_sent, bool):
        raise ValueError(f"subtract_sent must be True or False, got {subtract_sent!r}")
    k = _check_k(k, memory.numel())
    chosen = resolve_backend(backend, memory.device, memory.numel())
    if chosen == "cuda" and 0 < k < memory.numel():
        return SelectedEntries(*_cuda.error_feedback_topk_cuda_(memory, grad, k, wire_dtype, subtract_sent))
    flat = memory.view(-1)
    g = grad.reshape(-1)
    if flat.device.type == "cpu" and bool(torch.isfinite(g.sum(dtype=torch.float32))):
        # A finite sum means finite entries, and the sum reads g 50x faster than isfinite() does
        # on CPU; an overflowing sum of finite entries just takes the general path.
        grad_finite = torch.tensor(True)
        flat.add_(g)
    else:
        finite = torch.isfinite(g)
        grad_finite = finite.all()
        flat.add_(torch.where(finite, g, 0))
    if k == 0:
        indices = torch.empty(0, dtype=torch.long, device=flat.device)
    elif chosen == "cpu":
        indices = topk_magnitude_threshold(flat, k)
    else:
        indices = topk_magnitude_reference(flat, k)
    values = to_wire(flat[indices], wire_dtype)
    if subtract_sent:
        flat.index_put_((indices,), flat[indices] - values.float())
    return SelectedEntries(indices.to(torch.int32), values, grad_finite)


def undo_accumulate_(
    memory: torch.Tensor, grad: torch.Tensor, keep: torch.Tensor, *, backend: str = "auto"
) -> None:
    """Undo step 1 of :func:`error_feedback_topk_` unless ``keep``: ``memory -= grad`` where finite.

    ``keep`` is a 0-dim bool tensor (typically "every worker's gradient was finite").  On the
    CUDA backend the flag is read by the kernel, so a kept step costs one launch and no host
    sync; elsewhere the flag is read on the host.
    """
    _check_backend(backend)
    chosen = resolve_backend(backend, memory.device, memory.numel())
    if (
        chosen == "cuda" and memory.dtype == torch.float32
    ):  # the kernel takes fp32 memories (fp64 ones: below)
        _cuda.undo_accumulate_cuda_(memory, grad, keep)
        return
    flat = memory.view(-1)
    g = grad.reshape(-1)
    if flat.device.type == "cpu":
        if not bool(keep):
            flat.sub_(torch.where(torch.isfinite(g), g, 0))
    else:
        flat.sub_(torch.where(torch.isfinite(g) & ~keep.to(torch.bool), g, 0))
