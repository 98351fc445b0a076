"""Which parameters DDP skips at a step: those that no rank used (``find_unused_parameters``).

With ``find_unused_parameters=True`` (or ``static_graph=True``) DDP leaves the ``.grad`` of a
parameter untouched when no rank used it since the last synchronized step: the bucket's output
for it is dropped.  A hook that selected entries of such a parameter's error-feedback memory
and cleared them would lose them for good.  DDP's own record of use (the reducer's
``local_used_map``) is reduced across ranks only after the last bucket was handed to the hook,
so the hook keeps its own: a post-accumulate-grad hook on every parameter marks it used
whenever a gradient is accumulated into it (as DDP does, ``no_sync`` steps included), and one
small ``MAX`` allreduce of a bucket's flags, before its compression, says which of its
parameters some rank used.  The cost: one collective of a byte per parameter per bucket, only
for DDP models that look for unused parameters.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Sequence

import torch
import torch.distributed as dist

__all__ = ["ParameterUse", "skips_unused_parameters"]

logger = logging.getLogger(__name__)


def skips_unused_parameters(ddp) -> bool:
    """Whether DDP drops the gradient of parameters no rank used at a step."""
    return bool(getattr(ddp, "find_unused_parameters", False) or getattr(ddp, "static_graph", False))


class ParameterUse:
    """Records which parameters of a DDP model received a gradient since the last synchronized step."""

    def __init__(self, ddp) -> None:
        self._used: set[int] = set()
        self._handles = []
        this = weakref.ref(self)

        def mark(param: torch.Tensor) -> None:
            tracker = this()
            if tracker is not None:
                tracker._used.add(id(param))

        # The tensor's post-accumulate-grad hooks run inside AccumulateGrad, before DDP's own
        # hook on the same node marks the parameter ready: a bucket's flags are complete when
        # the comm hook sees the bucket.
        for param in ddp.module.parameters():
            if param.requires_grad:
                self._handles.append(param.register_post_accumulate_grad_hook(mark))

    def live(
        self, params: Sequence[torch.Tensor], group=None, device: torch.device | str = "cpu"
    ) -> list[bool]:
        """For each of ``params``, whether some rank used it (collective, blocking)."""
        flags = torch.tensor([id(p) in self._used for p in params], dtype=torch.uint8)
        if dist.get_backend(group) != dist.Backend.GLOO:
            flags = flags.to(device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=group)
        return flags.bool().tolist()

    def end_step(self) -> None:
        """A synchronized step ended: usage starts afresh (as DDP's map does)."""
        self._used.clear()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __del__(self) -> None:
        self.remove()
