"""The checks every ``load_state_dict`` starts with, shared by the hook state and gossip.

A state dict holds one worker's state (error-feedback memories, gossip buffers): it is refused
when it is not a state dict of that kind, or was saved on another number of workers or by
another rank.  A compressor other than the saved one is only worth a warning (its memory is
still what was not sent); :meth:`~ec_hooks.compressors.Compressor.config_differences` says which
fields differ.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

from ec_hooks.compressors import Compressor

__all__ = ["check_state_dict", "warn_if_compressor_changed"]


def check_state_dict(
    state_dict: object,
    *,
    kind: str,
    required: Sequence[str],
    owner: str,
    world_size: int,
    rank: int,
    why_world_size: str,
    why_rank: str = "",
    missing_ok: bool = False,
) -> Mapping:
    """Raise ValueError unless ``state_dict`` is a dict with the ``required`` entries, saved with
    this ``world_size`` and ``rank`` (when ``missing_ok``, a state dict that records neither
    passes: it was written before they were).  ``owner`` names the loading object in messages,
    ``why_*`` say why the state cannot move to another world size or rank."""
    if not isinstance(state_dict, dict) or any(key not in state_dict for key in required):
        entries = " / ".join(repr(key) for key in required)
        raise ValueError(
            f"state_dict is not {kind} (no {entries} entr{'y' if len(required) == 1 else 'ies'})"
        )
    for key, mine, why in (("world_size", world_size, why_world_size), ("rank", rank, why_rank)):
        saved = state_dict.get(key, mine if missing_ok else None)
        if saved != mine:
            raise ValueError(f"state_dict was saved with {key}={saved}, this {owner} has {key}={mine}: {why}")
    return state_dict


def warn_if_compressor_changed(log: logging.Logger, saved: object, compressor: Compressor, what: str) -> None:
    """Log a warning naming the fields in which ``compressor`` differs from the ``saved`` one."""
    differences = compressor.config_differences(saved)
    if differences:
        log.warning(
            "loading %s saved with another compressor into one using %s: %s",
            what,
            compressor,
            "; ".join(differences),
        )
