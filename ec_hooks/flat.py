"""Flat buffers of several tensors: one contiguous buffer instead of one message (or one kernel)
per tensor.  Gossip flattens the model, the hook lays memories out like DDP's buckets, the
Lightning strategies average a state dict in one allreduce; all of them through these three
functions, so that the layout (tensor order, no padding) is the same everywhere.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

__all__ = ["flatten", "spans", "split"]


def flatten(
    tensors: Iterable[torch.Tensor], dtype: torch.dtype = torch.float32, out: torch.Tensor | None = None
) -> torch.Tensor:
    """The tensors, detached and converted to ``dtype``, one after the other in one flat buffer
    (a new one, or ``out``)."""
    return torch.cat([t.detach().reshape(-1).to(dtype) for t in tensors], out=out)


def spans(numels: Iterable[int]) -> list[tuple[int, int]]:
    """``(start, stop)`` of consecutive parts of ``numels`` entries in a flat buffer."""
    out, offset = [], 0
    for numel in numels:
        out.append((offset, offset + numel))
        offset += numel
    return out


def split(flat: torch.Tensor, like: Sequence[torch.Tensor | int]) -> list[torch.Tensor]:
    """Views of ``flat``, one per item of ``like``: shaped like it for a tensor, flat with that
    many entries for an int.  The inverse of :func:`flatten` (up to the dtype)."""
    numels = [item if isinstance(item, int) else item.numel() for item in like]
    return [
        flat[start:stop] if isinstance(item, int) else flat[start:stop].view_as(item)
        for item, (start, stop) in zip(like, spans(numels))
    ]
