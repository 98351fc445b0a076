"""Checks of the strategies' constructor arguments, so that a bad value fails at construction."""

from __future__ import annotations

from ec_hooks.compressors import Compressor, make_compressor

__all__ = ["build_compressor", "reject_comm_hook_kwargs"]

# DDPStrategy arguments that would replace or wrap the communication our strategies install.
_COMM_HOOK_KWARGS = ("ddp_comm_state", "ddp_comm_hook", "ddp_comm_wrapper", "model_averaging_period")


def reject_comm_hook_kwargs(strategy: str, kwargs: dict) -> None:
    """Refuse DDPStrategy arguments that would install another communication hook.

    ``None`` (what a config system may pass for every argument left unset) is dropped.
    """
    for name in _COMM_HOOK_KWARGS:
        if kwargs.pop(name, None) is not None:
            raise ValueError(
                f"{name} cannot be given to {strategy}: the strategy installs its own communication "
                f"(use lightning's DDPStrategy for a custom hook)"
            )


def check_hierarchy(hierarchical, nodes) -> None:
    """ValueError unless ``hierarchical`` is a bool and ``nodes`` comes only with it."""
    if not isinstance(hierarchical, bool):
        raise ValueError(f"hierarchical must be True or False, got {hierarchical!r}")
    if nodes is not None and not hierarchical:
        raise ValueError("nodes is only used with hierarchical=True")


def node_layout(strategy, nodes: list[list[int]] | None) -> list[list[int]]:
    """``nodes``, or the Trainer's ``num_nodes`` x ``devices`` (Lightning numbers ranks node by
    node: global rank = node_rank * devices + local_rank)."""
    if nodes is not None:
        return nodes
    per_node = strategy.num_processes
    return [list(range(a * per_node, (a + 1) * per_node)) for a in range(strategy.num_nodes)]


def build_compressor(compressor: str | Compressor | None, density: float | None) -> Compressor | None:
    """A compressor from a name and a density, or the object itself (``None`` stays ``None``).

    ``density`` belongs to a compressor *name*; a compressor object already carries its own.
    """
    if compressor is None:
        if density is not None:
            raise ValueError(f"density={density!r} needs a compressor name (e.g. compressor='topk')")
        return None
    if isinstance(compressor, Compressor):
        if density is not None:
            raise ValueError(
                f"density={density!r} cannot be combined with the compressor object {compressor!r}: "
                "give the density to the compressor itself"
            )
        return compressor
    return make_compressor(compressor, **({} if density is None else {"density": density}))
