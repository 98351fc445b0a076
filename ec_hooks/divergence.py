"""The divergence watch of gossip: warn when the consensus distance keeps growing.

Geometric growth of the distance between the workers' models is the signature of a consensus
step too large for the compressor; the slower, polynomial growth of a run that starts from
identical models (or warms its learning rate up) does not pass the test, nor does growth far
below the scale of the model.
"""

from __future__ import annotations

import logging
import math
import numbers
import warnings
from collections.abc import Callable

from ec_hooks.validation import check_int

__all__ = ["DivergenceWatch"]

logger = logging.getLogger("ec_hooks.gossip")


class DivergenceWatch:
    """Warns (once per growing streak) when the distance grew at ``patience`` consecutive checks,
    each time by at least ``growth`` (> 1), and is at least ``min_relative`` of the mean model's
    norm (:attr:`mean_norm`, set by whoever measures the distance).

    Args:
        every: measure every this many steps (0: the watch is off).
        patience, growth, min_relative: the test above.
    """

    every: int
    patience: int
    growth: float
    min_relative: float
    history: list[float]
    warned: bool
    last_distance: float | None
    mean_norm: float

    def __init__(
        self, every: int = 100, patience: int = 3, growth: float = 1.5, min_relative: float = 0.01
    ) -> None:
        self.every = check_int("watch_every", every, 0)
        self.patience = check_int("watch_patience", patience, 1)
        if isinstance(growth, bool) or not isinstance(growth, numbers.Real) or not growth > 1:
            raise ValueError(f"watch_growth must be a float > 1, got {growth!r}")
        self.growth = float(growth)
        self.min_relative = min_relative
        self.history: list[float] = []
        self.warned = False
        #: the last distance measured, by the watch or by anybody
        self.last_distance: float | None = None
        self.mean_norm = 0.0

    def due(self, iteration: int) -> bool:
        """Whether the distance is to be measured at this step."""
        return bool(self.every) and iteration % self.every == 0

    def observe(self, distance: float, describe: Callable[[str], str], stacklevel: int = 2) -> None:
        """Record a measured ``distance``; warn with ``describe(trail)`` (``trail``: the recent
        distances) when it keeps growing.  ``stacklevel`` as for :func:`warnings.warn`, counted
        from the caller of this method."""
        history = self.history
        history.append(distance)
        del history[: -(self.patience + 1)]
        if not math.isfinite(distance):
            growing, trail = True, f"{distance}"
        else:
            growing = (
                len(history) == self.patience + 1
                and all(b > self.growth * a for a, b in zip(history, history[1:]))
                and distance >= self.min_relative * self.mean_norm
            )
            trail = " -> ".join(f"{d:.3g}" for d in history)
        if growing and not self.warned:
            message = describe(trail)
            logger.warning(message)
            warnings.warn(message, RuntimeWarning, stacklevel=stacklevel + 1)
        self.warned = growing

    def state_dict(self) -> dict:
        return {
            "history": list(self.history),
            "warned": self.warned,
            "last_consensus_distance": self.last_distance,
            "mean_norm": self.mean_norm,
        }

    def load_state_dict(self, watch: dict) -> None:
        self.history = [float(d) for d in watch.get("history", [])]
        self.warned = bool(watch.get("warned", False))
        self.last_distance = watch.get("last_consensus_distance")
        self.mean_norm = float(watch.get("mean_norm", 0.0))
