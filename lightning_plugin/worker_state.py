"""Checkpoints that carry every worker's own training state.

Error-feedback memories, DeepSqueeze's compression error, CHOCO's public copies and the local
models of decentralized training differ from worker to worker, while Lightning saves the
checkpoint of rank 0 only.  :class:`WorkerStateDDPStrategy` therefore gathers each worker's
state to rank 0 when a checkpoint is saved, and hands every worker its own entry back when the
checkpoint is loaded for ``trainer.fit(ckpt_path=...)``:

    checkpoint["ec_hooks"] = {
        "format": 1,
        "strategy": "DeepSqueezeStrategy",
        "world_size": n,
        "workers": [state of rank 0, ..., state of rank n - 1],
    }

A worker's state may carry ``"optimizer_states"`` and ``"precision_plugin"``: they replace
Lightning's own entries (rank 0's) on that worker when it resumes.  Weights-only checkpoints
carry no worker state.  Evaluation (``validate``/``test``/``predict`` with ``ckpt_path``)
ignores the entry and uses the checkpoint's ``state_dict``.
"""

from __future__ import annotations

import atexit
import logging
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from lightning_utilities.core.apply_func import apply_to_collection
from typing_extensions import override

__all__ = ["CHECKPOINT_KEY", "WorkerStateDDPStrategy", "gather_to_rank_zero"]

logger = logging.getLogger(__name__)

CHECKPOINT_KEY = "ec_hooks"
_FORMAT = 1


def _to_cpu(obj: Any) -> Any:
    return apply_to_collection(obj, torch.Tensor, lambda t: t.detach().cpu())


def _local_path(filepath) -> Path | None:
    """The checkpoint's path when it is on the local filesystem (``None`` for remote URLs)."""
    text = os.fspath(filepath)
    if "://" in text and not text.startswith("file://"):
        return None
    return Path(text.removeprefix("file://"))


def _destroy_process_group() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


_destroy_at_exit_registered = False


def _destroy_process_group_at_exit() -> None:
    """Destroy the default process group before the interpreter shuts down (registered once).

    Lightning registers this for NCCL only.  A gloo group left to the interpreter's shutdown
    can abort the process ("terminate called without an active exception", exit -6) after a
    successful run, because its worker threads are torn down with the interpreter half gone.
    """
    global _destroy_at_exit_registered
    if not _destroy_at_exit_registered:
        atexit.register(_destroy_process_group)
        _destroy_at_exit_registered = True


def gather_to_rank_zero(obj: Any) -> list[Any] | None:
    """Every worker's ``obj`` (tensors moved to the CPU) on rank 0, ``None`` elsewhere."""
    obj = _to_cpu(obj)
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


class WorkerStateDDPStrategy(DDPStrategy):
    """A :class:`~lightning.pytorch.strategies.DDPStrategy` whose checkpoints carry each worker's state.

    Subclasses say what a worker's state is (:meth:`worker_state`, ``None`` for "nothing to
    save") and how to take it back (:meth:`load_worker_state`).  The checkpoint is restored
    after :meth:`setup`, once the model is wrapped and the communication state exists.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._restored_worker_state: dict | None = None

    # -- to override -------------------------------------------------------------------------
    def worker_state(self) -> dict | None:
        """This worker's state to save (called on every rank, at the same points)."""
        return None

    def load_worker_state(self, state: dict) -> None:
        """Take back this worker's state (called after the model weights were loaded)."""

    def has_worker_state(self) -> bool:
        """Whether :meth:`worker_state` has anything to save (cheap; same on every rank)."""
        return False

    # -- Lightning hooks ---------------------------------------------------------------------
    @override
    def setup_distributed(self) -> None:
        super().setup_distributed()
        _destroy_process_group_at_exit()

    @property
    @override
    def restore_checkpoint_after_setup(self) -> bool:
        # DDP's constructor broadcasts rank 0's weights: worker states go in after it.
        return True

    def _fitting(self) -> bool:
        module = self.lightning_module
        trainer = getattr(module, "_trainer", None) if module is not None else None
        return trainer is not None and trainer.state.fn == TrainerFn.FITTING

    @override
    def save_checkpoint(
        self, checkpoint: dict[str, Any], filepath, storage_options: Any | None = None
    ) -> None:
        # Weights-only checkpoints (no optimizer states) get no worker state: they cannot resume.
        if "optimizer_states" in checkpoint:
            state = self.worker_state()
            # ``state is None`` is the same on every rank (it depends on the strategy's setup only).
            if state is not None:
                states = gather_to_rank_zero(state)
                if self.is_global_zero:
                    checkpoint[CHECKPOINT_KEY] = {
                        "format": _FORMAT,
                        "strategy": type(self).__name__,
                        "world_size": self.world_size,
                        "workers": states,
                    }
        local = _local_path(filepath)
        if local is None or not self.is_global_zero or type(self.checkpoint_io) is not TorchCheckpointIO:
            super().save_checkpoint(checkpoint, filepath, storage_options=storage_options)
            return
        # Lightning's local save moves a temporary file from $TMPDIR over the checkpoint; across
        # filesystems (a tmpfs /tmp) that move is a copy into the final path, and a crash during
        # it leaves a truncated checkpoint in place of the last good one.  A temporary file in
        # the same directory and a rename keep the previous checkpoint until the new one is whole.
        tmp = local.with_name(f".{local.name}.tmp-{os.getpid()}")
        try:
            super().save_checkpoint(checkpoint, tmp, storage_options=storage_options)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, local)
        finally:
            if tmp.exists():
                tmp.unlink()

    @override
    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None) -> dict[str, Any]:
        checkpoint = super().load_checkpoint(checkpoint_path, weights_only=weights_only)
        self._restored_worker_state = None
        entry = checkpoint.pop(CHECKPOINT_KEY, None)
        if not self._fitting():
            return checkpoint
        if entry is None:
            if "optimizer_states" in checkpoint and self.has_worker_state():
                rank_zero_warn(
                    f"{type(self).__name__}: the checkpoint {checkpoint_path} carries no per-worker state; "
                    "every worker starts from its weights with empty communication state"
                )
            return checkpoint
        if entry.get("world_size") != self.world_size:
            raise ValueError(
                f"the checkpoint {checkpoint_path} holds the state of {entry.get('world_size')} workers and "
                f"this run has {self.world_size}: per-worker state cannot be redistributed. To start a new "
                "run from its (average) weights, load them into the module and call fit without ckpt_path"
            )
        if entry.get("strategy") != type(self).__name__:
            rank_zero_warn(
                f"loading worker state saved by {entry.get('strategy')} into {type(self).__name__}"
            )
        state = entry["workers"][self.global_rank]
        if "optimizer_states" in state:
            checkpoint["optimizer_states"] = state["optimizer_states"]
        if state.get("precision_plugin"):
            checkpoint[type(self.precision_plugin).__qualname__] = state["precision_plugin"]
        self._restored_worker_state = state
        return checkpoint

    @override
    def load_model_state_dict(self, checkpoint, strict: bool = True) -> None:
        super().load_model_state_dict(checkpoint, strict=strict)
        if self._restored_worker_state is not None:
            state, self._restored_worker_state = self._restored_worker_state, None
            self.load_worker_state(state)
