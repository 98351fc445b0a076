"""The shared base of the sparsifiers: compressors that send ``k = ceil(density * d)`` entries."""

from __future__ import annotations

import math

from ec_hooks.compressors.base import Compressor
from ec_hooks.validation import check_density

__all__ = ["Sparsifier", "entries_for"]


def entries_for(density: float, numel: int) -> int:
    """``k = ceil(density * numel)``, at least 1 and at most ``numel``."""
    # The small epsilon keeps density=k/d from rounding up to k+1.
    return min(numel, max(1, math.ceil(density * numel - 1e-9)))


class Sparsifier(Compressor):
    """A compressor that sends ``k`` of the ``d`` entries whole and drops the others.

    Subclasses choose which ``k`` (top-k by magnitude, rand-k from a shared seed) and how the
    pairs travel.

    Args:
        density: fraction of entries kept, in (0, 1].
    """

    density: float

    def __init__(self, density: float = 0.01) -> None:
        self.density = check_density(density)

    def consensus_unit(self) -> float:
        return self.density

    def k_for(self, numel: int) -> int:
        """``k = ceil(density * numel)``, at least 1 and at most ``numel``."""
        return entries_for(self.density, numel)

    def entries_sent(self, numel: int) -> int:
        """``k``: padding (``delta16`` fillers and tail slots of top-k) carries no entry of the tensor."""
        return self.k_for(numel)
