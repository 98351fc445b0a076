"""Error-feedback memory: what a worker did not send yet, kept per parameter in fp32.

DDP hands the hook flat buckets whose composition changes once (the rebuild after the first
iteration) and differs with ``bucket_cap_mb``.  The memory is therefore owned by *parameters*:
each parameter's memory is a view into a flat fp32 buffer laid out like the bucket that holds
it, so the hot path works on one contiguous tensor per bucket, and a new layout simply copies
each parameter's slice over (:meth:`ErrorFeedbackMemory.buffer_for`).

Memories are fp32 (fp64 for fp64 gradients, so that an fp64 model keeps its precision).  The
memory also knows each parameter's shape, so that a checkpoint of a ``(6, 4)`` parameter is
refused by a ``(4, 6)`` one, and refuses non-finite memories at load: an inf or NaN entry would
never be sent again (top-k ranks NaN last) and would poison every later step.

A step may leave some parameters out: DDP skips the parameters that no rank used in the step
(``find_unused_parameters=True``), and their memories must be neither selected from nor cleared.
:func:`live_mask` turns the live parameters of a bucket into a mask over its flat buffer, which
the compensation step receives, and :class:`Frozen` keeps the masked-out entries of any
per-parameter buffer (memory, velocity) as they were.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Hashable, Sequence

import torch

from ec_hooks import flat

__all__ = ["ErrorFeedbackMemory", "Frozen", "live_mask", "memory_dtype"]

logger = logging.getLogger(__name__)


def memory_dtype(grad_dtype: torch.dtype) -> torch.dtype:
    """fp32 memories for 16- and 32-bit gradients, fp64 for fp64 ones."""
    return torch.float64 if grad_dtype == torch.float64 else torch.float32


def live_mask(
    numels: Sequence[int], live: Sequence[bool], device: torch.device | str = "cpu"
) -> torch.Tensor | None:
    """A bool mask over a flat bucket of parameters of ``numels`` entries, true where the
    parameter is ``live`` at this step; ``None`` when every parameter is."""
    if all(live):
        return None
    return torch.repeat_interleave(
        torch.tensor(list(live), dtype=torch.bool), torch.tensor(list(numels), dtype=torch.long)
    ).to(device)


class Frozen:
    """Keeps the entries of ``buffer`` outside ``mask`` as they are now; :meth:`restore` puts them
    back after the step changed the whole buffer.  With ``mask=None`` it does nothing."""

    def __init__(self, buffer: torch.Tensor, mask: torch.Tensor | None) -> None:
        self.buffer, self.mask = buffer, mask
        self.values: torch.Tensor | None = None if mask is None else buffer[~mask]

    def restore(self) -> None:
        if self.mask is not None and self.values is not None:
            self.buffer[~self.mask] = self.values


class ErrorFeedbackMemory:
    """fp32 memories keyed by a stable parameter key (its name, or its order of first use)."""

    def __init__(self) -> None:
        self._views: dict[Hashable, torch.Tensor] = {}
        self._buffers: dict[tuple, torch.Tensor] = {}
        # Memories loaded from a state dict before the bucket that owns them was seen.
        self._pending: dict[Hashable, torch.Tensor] = {}
        #: parameter shapes, as met (from the model or the bucket) or loaded
        self.shapes: dict[Hashable, tuple[int, ...]] = {}

    def set_shape(self, key: Hashable, shape: Sequence[int]) -> None:
        """Record the shape of parameter ``key``; refuses one that a loaded memory contradicts."""
        shape = tuple(int(d) for d in shape)
        known = self.shapes.get(key)
        if known is not None and known != shape and (key in self._pending or key in self._views):
            raise ValueError(
                f"error-feedback memory for parameter {key!r} was saved for shape {known}, the parameter has "
                f"shape {shape}: the state dict belongs to another model"
            )
        self.shapes[key] = shape

    def buffer_for(
        self,
        keys: Sequence[Hashable],
        numels: Sequence[int],
        device: torch.device,
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """The flat memory (fp32, or ``dtype``) of a bucket made of these parameters, in this order.

        A new layout (first use, the DDP rebuild, a checkpoint from another ``bucket_cap_mb``)
        copies each parameter's memory into a fresh buffer; nothing is reset.
        """
        signature = tuple(keys)
        buffer = self._buffers.get(signature)
        if buffer is not None and buffer.device == device and buffer.dtype == dtype:
            return buffer
        buffer = torch.zeros(sum(numels), dtype=dtype, device=device)
        for key, numel, part in zip(keys, numels, flat.split(buffer, list(numels))):
            previous = self._views.get(key)
            if previous is None:
                previous = self._pending.pop(key, None)
            if previous is not None:
                if previous.numel() != numel:
                    raise ValueError(
                        f"error-feedback memory for parameter {key!r} has {previous.numel()} entries but the "
                        f"parameter has {numel}: the state dict belongs to another model"
                    )
                part.copy_(previous.reshape(-1))
            self._views[key] = part
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

    def check_state_dict(self, memories: dict[Hashable, torch.Tensor], shapes: dict | None = None) -> None:
        """Raise ValueError when :meth:`load_state_dict` would refuse these memories: non-finite
        entries, or a saved shape (``shapes``) other than a known parameter's shape."""
        if not isinstance(memories, dict):
            raise TypeError(
                f"memories must be a dict of parameter key -> tensor, got {type(memories).__name__}"
            )
        for key, tensor in memories.items():
            tensor = torch.as_tensor(tensor)
            if not bool(torch.isfinite(tensor).all()):
                bad = int((~torch.isfinite(tensor)).sum())
                raise ValueError(
                    f"error-feedback memory for parameter {key!r} has {bad} non-finite entries: such entries would "
                    "never be sent again and would poison every later step; the checkpoint is damaged (resume from "
                    "an earlier one, or drop its 'memories' entry to restart them from zero)"
                )
        for key, shape in (shapes or {}).items():
            saved, known = tuple(int(d) for d in shape), self.shapes.get(key)
            if key in memories and known is not None and saved != known:
                raise ValueError(
                    f"error-feedback memory for parameter {key!r} was saved for shape {saved}, the parameter has "
                    f"shape {known}: the state dict belongs to another model"
                )
            if key in memories and math.prod(saved) != torch.as_tensor(memories[key]).numel():
                raise ValueError(
                    f"error-feedback memory for parameter {key!r} has "
                    f"{torch.as_tensor(memories[key]).numel()} entries, its saved shape {saved} has "
                    f"{math.prod(saved)}"
                )

    def load_state_dict(self, memories: dict[Hashable, torch.Tensor], shapes: dict | None = None) -> None:
        """Restore memories (flat tensors by parameter key) and, when given, their shapes."""
        self.check_state_dict(memories, shapes)
        self._pending.clear()  # a later load replaces an earlier one whole
        for key, shape in (shapes or {}).items():
            if key in memories:
                self.shapes[key] = tuple(int(d) for d in shape)
        for key, tensor in memories.items():
            tensor = torch.as_tensor(tensor)
            tensor = tensor.to(tensor.dtype if tensor.dtype == torch.float64 else torch.float32)
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
