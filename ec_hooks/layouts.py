"""Saved DDP bucket layouts, to replay them at the first step after a resume.

A new ``DistributedDataParallel`` instance reduces its first step in one bucket that holds every
parameter, and only then rebuilds the buckets (of ``bucket_cap_mb``) that the run which saved a
checkpoint used all along.  A stateful hook that compresses per bucket (error-feedback top-k,
rand-k, PowerSGD) would select other entries at that step.  :class:`SavedLayouts` remembers the
saved layouts (tuples of parameter keys) and splits such a first bucket back into them, so that
each part is compressed and communicated as the uninterrupted run did it.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Iterable

__all__ = ["SavedLayouts"]

logger = logging.getLogger(__name__)


class SavedLayouts:
    """The bucket layouts of a loaded state, valid until the step after the load ends."""

    def __init__(self) -> None:
        self.layouts: list[tuple] = []
        self._owner: dict[Hashable, tuple] = {}
        self._warned = False

    def expect(self, layouts: Iterable[Iterable[Hashable]]) -> None:
        """Remember ``layouts`` (disjoint tuples of parameter keys) for the next step."""
        self.layouts = [tuple(layout) for layout in layouts]
        self._owner = {key: layout for layout in self.layouts for key in layout}
        self._warned = False

    def clear(self) -> None:
        """Call at the end of the first step: from then on DDP's rebuilt buckets are the saved ones."""
        self.layouts, self._owner = [], {}

    def split(self, keys: tuple) -> list[tuple] | None:
        """The saved layouts that make up a bucket of these parameters, in the bucket's order.

        ``None`` when nothing is saved, when the bucket is one saved layout as it is, or when it
        holds only part of a saved layout (DDP bucketed the first step across the saved layouts,
        e.g. after a change of ``bucket_cap_mb``): such a bucket is compressed as it comes, which
        loses nothing but selects other entries at that one step (logged once).
        """
        if not self.layouts or self._owner.get(keys[0]) == keys:
            return None
        units: dict[tuple, None] = {}  # an ordered set
        for key in keys:
            unit = self._owner.get(key)
            if unit is None:
                break
            units[unit] = None
        else:
            if sum(len(unit) for unit in units) == len(keys):
                return list(units)
        if not self._warned:
            self._warned = True
            logger.warning(
                "a DDP bucket of %d parameters holds part of a bucket layout saved in the loaded state: it is "
                "compressed as it comes (nothing is lost, but this step selects other entries than an "
                "uninterrupted run)",
                len(keys),
            )
        return None
