"""``Trainer(strategy="memsgd")``: DDP whose gradient allreduce is Mem-SGD (compression with memory)."""

from __future__ import annotations

import logging
from typing import Any

from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch.optim import Optimizer

from ec_hooks.compressors import Compressor, _check_int
from ec_hooks.hooks import ErrorFeedbackState, error_feedback_hook
from ec_hooks.stats import CommStats
from lightning_plugin.arguments import build_compressor, reject_comm_hook_kwargs
from lightning_plugin.worker_state import WorkerStateDDPStrategy

__all__ = ["MemSGDStrategy"]

logger = logging.getLogger(__name__)


class MemSGDStrategy(WorkerStateDDPStrategy):
    """Data-parallel training whose gradients are compressed with error feedback (Mem-SGD).

    Every worker adds its gradient to its fp32 memory, sends the compressed sum, and keeps what
    it did not send (:func:`ec_hooks.error_feedback_hook`, registered on every device, CPU
    included).  The learning rate is applied after aggregation, by the optimizer: the memory
    holds gradients, not updates.

    Args:
        compressor: a :class:`~ec_hooks.Compressor` or a name from ``ec_hooks.COMPRESSOR_NAMES``.
        density: fraction of the entries kept, for a compressor given by name (``topk``,
            ``randk``); default 0.01.
        start_iter: number of initial steps that use plain allreduce.
        dense_fallback: allreduce the densified compressed bucket when that is cheaper than
            gathering every worker's payload.
        **kwargs: passed to :class:`~lightning.pytorch.strategies.DDPStrategy` (``bucket_cap_mb``,
            ``static_graph``, ``process_group_backend``, ``start_method``...).

    On one device there is nothing to communicate: no hook is registered and training is plain
    SGD.  Checkpoints carry every worker's memories (see :mod:`lightning_plugin.worker_state`).
    """

    def __init__(
        self,
        compressor: str | Compressor = "topk",
        density: float | None = None,
        start_iter: int = 0,
        dense_fallback: bool = True,
        **kwargs: Any,
    ) -> None:
        reject_comm_hook_kwargs(type(self).__name__, kwargs)
        if compressor is None:
            raise ValueError("compressor must be a Compressor or a compressor name, got None")
        if density is None and isinstance(compressor, str) and compressor.lower() in ("topk", "randk"):
            density = 0.01
        self.compressor = build_compressor(compressor, density)
        self.start_iter = _check_int("start_iter", start_iter, 0)
        if not isinstance(dense_fallback, bool):
            raise ValueError(f"dense_fallback must be True or False, got {dense_fallback!r}")
        self.dense_fallback = dense_fallback
        super().__init__(**kwargs)
        self.comm_state: ErrorFeedbackState | None = None

    @property
    def comm_stats(self) -> list[CommStats]:
        """Communication statistics of this worker (empty before setup and on one device)."""
        return [] if self.comm_state is None else [self.comm_state.stats]

    def _register_ddp_hooks(self) -> None:
        if self.world_size == 1:
            rank_zero_info(f"{type(self).__name__}: one device, nothing to communicate; gradients are not compressed")
            return
        state = ErrorFeedbackState(
            compressor=self.compressor,
            start_iter=self.start_iter,
            module=self.model,
            dense_fallback=self.dense_fallback,
        )
        if self.comm_state is not None:
            # A second fit with the same strategy keeps the memories of the first.
            state.load_state_dict(self.comm_state.state_dict())
        self.comm_state = state
        self.model.register_comm_hook(state, error_feedback_hook)

    def has_worker_state(self) -> bool:
        return self.comm_state is not None

    def worker_state(self) -> dict | None:
        if self.comm_state is None:
            return None
        # Parameters and optimizer states are identical on every worker; the memories are not.
        return {"error_feedback": self.comm_state.state_dict()}

    def load_worker_state(self, state: dict) -> None:
        if self.comm_state is None:
            raise ValueError("the checkpoint carries error-feedback memories but this run has no Mem-SGD hook")
        if "error_feedback" not in state:
            raise ValueError(
                f"the checkpoint's per-worker state has no error-feedback memories (it holds {sorted(state)}): it "
                "was saved by another strategy; resume it with the strategy that saved it"
            )
        self.comm_state.load_state_dict(state["error_feedback"])

    def optimizer_step(self, optimizer: Optimizer, closure, model=None, **kwargs: Any) -> Any:
        """The optimizer step; with a GradScaler, the memories follow changes of the loss scale.

        Under ``16-mixed`` the hook sees gradients multiplied by the loss scale ``S``, so the
        memories hold residuals in units of ``S``.  When the scaler changes the scale (backoff
        after an overflow, growth after a run of good steps), the memories are multiplied by
        ``S_new / S_old`` so that they add up with the next, differently scaled, gradients.
        """
        scaler = getattr(self.precision_plugin, "scaler", None)
        if scaler is None or self.comm_state is None:
            return super().optimizer_step(optimizer, closure, model, **kwargs)
        before = scaler.get_scale()
        output = super().optimizer_step(optimizer, closure, model, **kwargs)
        after = scaler.get_scale()
        if after != before:
            self.comm_state.rescale_memories(after / before)
        return output

    @classmethod
    def register_strategies(cls, strategy_registry) -> None:
        for name, start_method in (("memsgd", "popen"), ("memsgd_spawn", "spawn")):
            strategy_registry.register(
                name,
                cls,
                description=f"Mem-SGD (top-k with error feedback) DDP, start_method '{start_method}'",
                override=True,
                start_method=start_method,
            )
