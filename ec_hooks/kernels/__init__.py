"""Selection kernels: the top-k of ``|x|`` and the fused error-feedback top-k step.

Backends (``backend=`` of :func:`topk_magnitude`, :func:`error_feedback_topk_` and
:class:`ec_hooks.TopK`):

* ``"torch"``: :func:`topk_magnitude_reference`, ``torch.topk`` plus an exact tie rule.  The
  definition every other backend matches.
* ``"cpu"``: :func:`topk_magnitude_threshold`, torch ops: a sampled threshold, one streaming
  compare pass, exact selection among the few candidates.  Any device; meant for CPU tensors.
* ``"cuda"``: radix-select kernels (``cuda/topk_select.cu``) loaded through CuPy, for CUDA
  tensors; raises if CuPy or the device cannot run them.
* ``"auto"`` (default): ``"cuda"`` for CUDA tensors when the kernels work there, else
  ``"torch"``; ``"cpu"`` for CPU tensors of at least ``CPU_THRESHOLD_MIN_NUMEL`` entries
  (``"torch"`` below, where its fixed costs would dominate).  Logs its choice, and why, once per device.

Order, the same on every backend: larger ``|x|`` first; equal magnitudes go to the lower index;
NaN ranks below every number (zero included), so it is selected only when ``k`` exceeds the
number of non-NaN entries, and a NaN in the error-feedback memory stays there instead of being
sent; ``inf`` ranks above every finite value.  Indices come back in ascending order.
"""

from ec_hooks.kernels.cuda import cuda_status
from ec_hooks.kernels.dispatch import (
    BACKENDS,
    CPU_THRESHOLD_MIN_NUMEL,
    SelectedEntries,
    error_feedback_topk_,
    resolve_backend,
    to_wire,
    topk_magnitude,
    undo_accumulate_,
)
from ec_hooks.kernels.reference import topk_magnitude_reference
from ec_hooks.kernels.threshold import topk_magnitude_threshold

__all__ = [
    "BACKENDS",
    "CPU_THRESHOLD_MIN_NUMEL",
    "SelectedEntries",
    "cuda_status",
    "error_feedback_topk_",
    "resolve_backend",
    "topk_magnitude",
    "topk_magnitude_reference",
    "topk_magnitude_threshold",
    "to_wire",
    "undo_accumulate_",
]
