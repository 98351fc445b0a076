"""Error-feedback memory: what a worker did not send yet, kept per parameter in fp32.

DDP hands the hook flat buckets whose composition changes once (the rebuild after the first
iteration) and differs with ``bucket_cap_mb``.  The memory is therefore owned by *parameters*:
each parameter's memory is a view into a flat fp32 buffer laid out like the bucket that holds
it, so the hot path works on one contiguous tensor per bucket, and a new layout simply copies
each parameter's slice over (:meth:`ErrorFeedbackMemory.buffer_for`).
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Sequence

import torch

__all__ = ["ErrorFeedbackMemory"]

logger = logging.getLogger(__name__)


class ErrorFeedbackMemory:
    """fp32 memories keyed by a stable parameter key (its name, or its order of first use)."""

    def __init__(self) -> None:
        self._views: dict[Hashable, torch.Tensor] = {}
        self._buffers: dict[tuple, torch.Tensor] = {}
        # Memories loaded from a state dict before the bucket that owns them was seen.
        self._pending: dict[Hashable, torch.Tensor] = {}

    def buffer_for(self, keys: Sequence[Hashable], numels: Sequence[int], device: torch.device) -> torch.Tensor:
        """The flat fp32 memory of a bucket made of these parameters, in this order.

        A new layout (first use, the DDP rebuild, a checkpoint from another ``bucket_cap_mb``)
        copies each parameter's memory into a fresh buffer; nothing is reset.
        """
        signature = tuple(keys)
        buffer = self._buffers.get(signature)
        if buffer is not None and buffer.device == device:
            return buffer
        buffer = torch.zeros(sum(numels), dtype=torch.float32, device=device)
        offset = 0
        for key, numel in zip(keys, numels):
            previous = self._views.get(key)
            if previous is None:
                previous = self._pending.pop(key, None)
            if previous is not None:
                if previous.numel() != numel:
                    raise ValueError(
                        f"error-feedback memory for parameter {key!r} has {previous.numel()} entries but the "
                        f"parameter has {numel}: the state dict belongs to another model"
                    )
                buffer[offset : offset + numel].copy_(previous.reshape(-1))
            self._views[key] = buffer[offset : offset + numel]
            offset += numel
        # Layouts that shared a parameter with this one are stale now.
        for other in [s for s in self._buffers if s != signature and not set(s).isdisjoint(signature)]:
            del self._buffers[other]
        self._buffers[signature] = buffer
        return buffer

    def scale_(self, factor: float) -> None:
        """Multiply every memory by ``factor`` in place (a GradScaler changed the loss scale)."""
        for tensor in [*self._views.values(), *self._pending.values()]:
            tensor.mul_(factor)

    def layouts(self) -> set[tuple]:
        """The bucket layouts (tuples of parameter keys) whose buffers are current."""
        return set(self._buffers)

    def norm(self) -> float:
        """L2 norm over all memories (host sync; for logging, not the hot path)."""
        total = 0.0
        for view in self._views.values():
            total += float(view.double().pow(2).sum())
        for view in self._pending.values():
            total += float(view.double().pow(2).sum())
        return total**0.5

    def keys(self):
        return list(self._views) + [k for k in self._pending if k not in self._views]

    def state_dict(self) -> dict[Hashable, torch.Tensor]:
        out = {key: view.detach().cpu().clone() for key, view in self._views.items()}
        for key, tensor in self._pending.items():
            out.setdefault(key, tensor.clone())
        return out

    def load_state_dict(self, memories: dict[Hashable, torch.Tensor]) -> None:
        if not isinstance(memories, dict):
            raise TypeError(f"memories must be a dict of parameter key -> tensor, got {type(memories).__name__}")
        self._pending.clear()  # a later load replaces an earlier one whole
        for key, tensor in memories.items():
            tensor = torch.as_tensor(tensor, dtype=torch.float32)
            if key in self._views:
                view = self._views[key]
                if view.numel() != tensor.numel():
                    raise ValueError(
                        f"error-feedback memory for parameter {key!r} has {tensor.numel()} entries, the "
                        f"parameter has {view.numel()}: the state dict belongs to another model"
                    )
                view.copy_(tensor.reshape(-1))
            else:
                self._pending[key] = tensor.reshape(-1).clone()
        # Memories not in the state dict restart from zero, as at the start of training.
        for key, view in self._views.items():
            if key not in memories:
                view.zero_()
