"""Gossip state dicts: what a worker saves (step counter, buffers, master copy, watch, statistics),
and the checks that refuse a state of another algorithm, run, rank or model before it loads."""

from __future__ import annotations

import logging
from typing import Any

import torch

from ec_hooks import agreement, checkpoints

__all__ = ["GossipCheckpoint"]

logger = logging.getLogger("ec_hooks.gossip")


class GossipCheckpoint:
    """:meth:`state_dict`, :meth:`check_state_dict` and :meth:`load_state_dict` of a gossip algorithm."""

    params: list[torch.Tensor]
    numel: int
    device: torch.device
    rank: int
    world_size: int
    iteration: int
    topology: Any
    compressor: Any
    consensus_step: float
    watch: Any
    stats: Any
    _master: torch.Tensor | None
    _low_precision_slices: list
    #: buffers kept in another dtype than fp32
    _buffer_dtypes: dict[str, torch.dtype] = {}

    def _buffers(self) -> dict[str, torch.Tensor | None]:
        return {}

    def state_dict(self) -> dict:
        """Step counter, this worker's buffers, the watch and the statistics; not the parameters
        (save those, or :meth:`average_parameters`, with the model)."""
        return {
            "algorithm": type(self).__name__,
            "iteration": self.iteration,
            "world_size": self.world_size,
            "rank": self.rank,
            "numel": self.numel,
            "shapes": [list(p.shape) for p in self.params],
            "dtypes": [str(p.dtype).removeprefix("torch.") for p in self.params],
            "topology": {
                "name": self.topology.name,
                "size": self.topology.size,
                "weights": self.topology.weights(self.rank, 0),
                "period": self.topology.period,
            },
            "compressor": self.compressor.config(),
            "consensus_step": self.consensus_step,
            "buffers": {
                k: None if v is None else v.detach().cpu().clone() for k, v in self._buffers().items()
            },
            # fp32 master copy of a 16-bit model (None otherwise, or before the first step)
            "master": None if self._master is None else self._master.detach().cpu().clone(),
            "watch": self.watch.state_dict(),
            "stats": self.stats.state_dict(),
        }

    def check_state_dict(self, state_dict: dict) -> None:
        """Raise ValueError when :meth:`load_state_dict` would refuse ``state_dict`` (another
        algorithm, world size, rank, model or, for ChocoSGD, topology); changes nothing.

        The model is checked parameter by parameter (shape and dtype, in order) against the
        ``"shapes"`` and ``"dtypes"`` the state dict carries; one saved without them (by an
        earlier version) is checked by its total number of entries only."""
        name = type(self).__name__
        checkpoints.check_state_dict(
            state_dict,
            kind="a gossip state dict",
            required=("algorithm", "buffers"),
            owner=name,
            world_size=self.world_size,
            rank=self.rank,
            why_world_size="the state belongs to another run",
            why_rank="load each worker's own state",
        )
        if state_dict["algorithm"] != name:
            raise ValueError(f"state_dict was saved by {state_dict['algorithm']}, this is {name}")
        mismatch = self._parameter_mismatch(state_dict)
        if state_dict.get("numel") != self.numel:
            raise ValueError(
                f"state_dict was saved with numel={state_dict.get('numel')}, this {name} has {self.numel} parameter "
                f"entries: the state belongs to another model" + (f" ({mismatch})" if mismatch else "")
            )
        if mismatch:
            raise ValueError(f"state_dict does not fit this {name}'s parameters: {mismatch}")
        self._check_loaded_topology(state_dict.get("topology", {}))
        buffers = self._buffers()
        saved = state_dict["buffers"]
        if set(saved) != set(buffers):
            raise ValueError(f"state_dict has buffers {sorted(saved)}, {name} expects {sorted(buffers)}")
        for key, tensor in {**saved, "master": state_dict.get("master")}.items():
            if tensor is not None and torch.as_tensor(tensor).numel() != self.numel:
                raise ValueError(
                    f"state_dict buffer {key!r} has {torch.as_tensor(tensor).numel()} entries, "
                    f"the model has {self.numel}"
                )

    def _parameter_mismatch(self, state_dict: dict) -> str | None:
        """How the saved parameters differ from ``params`` (the first difference), or ``None``."""
        shapes, dtypes = state_dict.get("shapes"), state_dict.get("dtypes")
        if shapes is None:
            return None
        if len(shapes) != len(self.params):
            return f"it was saved for {len(shapes)} parameter tensors, this one gossips {len(self.params)}"
        if dtypes is None or len(dtypes) != len(shapes):
            dtypes = [None] * len(shapes)
        for i, (p, shape, dtype) in enumerate(zip(self.params, shapes, dtypes)):
            if tuple(shape) != tuple(p.shape):
                return (
                    f"parameter {i} was saved with shape {tuple(shape)}, here it has shape {tuple(p.shape)} "
                    "(another model, or the parameters come in another order)"
                )
            mine = str(p.dtype).removeprefix("torch.")
            # The dtype sets what travels (values in the model's dtype), so the saved buffers
            # describe another computation.
            if dtype is not None and dtype != mine:
                return f"parameter {i} was saved with dtype {dtype}, here it has dtype {mine}"
        return None

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore what :meth:`state_dict` saved, after :meth:`check_state_dict`."""
        self.check_state_dict(state_dict)
        name = type(self).__name__
        saved = state_dict["buffers"]
        checkpoints.warn_if_compressor_changed(
            logger, state_dict.get("compressor"), self.compressor, f"a {name} state"
        )
        for key, tensor in saved.items():
            dtype = self._buffer_dtypes.get(key, torch.float32)
            setattr(
                self,
                f"_{key}",
                None
                if tensor is None
                else torch.as_tensor(tensor).to(self.device, dtype).reshape(-1).clone(),
            )
        master = state_dict.get("master")
        # A state saved without one (an fp32 model, or an earlier version) leaves the parameters
        # as they are: the master copy starts from them at the next step.
        self._master = (
            None
            if master is None or not self._low_precision_slices
            else torch.as_tensor(master).to(self.device, torch.float32).reshape(-1).clone()
        )
        self.iteration = int(state_dict["iteration"])
        agreement.expect_gossip_check(self)
        self.watch.load_state_dict(state_dict.get("watch", {}))
        if "stats" in state_dict:
            self.stats.load_state_dict(state_dict["stats"])

    def _check_loaded_topology(self, saved: dict) -> None:
        if saved and (saved.get("name"), saved.get("size")) != (self.topology.name, self.topology.size):
            logger.warning(
                "loading a %s state saved on topology %s into one on %s",
                type(self).__name__,
                saved.get("name"),
                self.topology.name,
            )
