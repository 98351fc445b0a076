"""Gossip in one process: ``n`` workers of :meth:`GossipAlgorithm.simulated` stepped together with the
very same update code, messages handed over in memory (for experiments and tests)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Protocol

import torch

__all__ = ["SimulatedWorker", "simulate_step", "simulated_consensus_distance"]


class SimulatedWorker(Protocol):
    """What the simulation needs of a worker (a :class:`~ec_hooks.gossip.GossipAlgorithm`)."""

    _simulated: bool
    iteration: int

    def _post(self) -> tuple[Any, ...]: ...

    def _complete(self, *message: Any) -> None: ...

    def _model_fp64(self) -> torch.Tensor: ...


def simulate_step(workers: Sequence[SimulatedWorker]) -> None:
    """One gossip step of every worker of :meth:`GossipAlgorithm.simulated` (in rank order).

    Same code path as :meth:`GossipAlgorithm.step`; messages go through the workers' shared
    :class:`~ec_hooks.transport.InMemoryExchange`: every worker posts, then every worker collects.
    """
    if not workers or any(not w._simulated for w in workers):
        raise ValueError("workers must be the list returned by GossipAlgorithm.simulated(...)")
    if len(workers) == 1:
        workers[0].iteration += 1
        return
    with torch.no_grad():
        posted = [w._post() for w in workers]
        for w, message in zip(workers, posted):
            w._complete(*message)


def simulated_consensus_distance(workers: Sequence[SimulatedWorker]) -> float:
    """:meth:`GossipAlgorithm.consensus_distance` for simulated workers."""
    flats = torch.stack([w._model_fp64() for w in workers])
    return math.sqrt(float((flats - flats.mean(dim=0)).pow(2).sum()) / len(workers))
