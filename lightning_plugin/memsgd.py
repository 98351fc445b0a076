"""``Trainer(strategy="memsgd")``: DDP whose gradient allreduce is Mem-SGD (compression with memory)."""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Optimizer
from typing_extensions import override

from ec_hooks.compressors import Compressor
from ec_hooks.compressors.factory import compressor_arguments
from ec_hooks.hooks import ErrorFeedbackState, error_feedback_hook
from ec_hooks.momentum import MomentumCorrection
from ec_hooks.stats import CommStats
from ec_hooks.validation import check_int, check_unit_interval
from lightning_plugin.arguments import build_compressor, check_hierarchy, node_layout, reject_comm_hook_kwargs
from lightning_plugin.worker_state import WorkerStateDDPStrategy

__all__ = ["MemSGDStrategy"]

logger = logging.getLogger(__name__)


class MemSGDStrategy(WorkerStateDDPStrategy):
    """Data-parallel training whose gradients are compressed with error feedback (Mem-SGD).

    Every worker adds its gradient to its fp32 memory, sends the compressed sum, and keeps what
    it did not send (:func:`ec_hooks.error_feedback_hook`, registered on every device, CPU
    included).  The learning rate is applied after aggregation, by the optimizer: the memory
    holds gradients, not updates.

    Momentum correction (DGC; ``docs/momentum-correction.md``).  When the optimizer is
    ``torch.optim.SGD`` with momentum, the strategy moves the momentum, Nesterov and the weight
    decay into the hook at setup (the optimizer then steps with momentum 0 and weight decay 0 on
    the aggregated velocities) and says so once in the log.  With ``gradient_clip_val`` (norm)
    each worker then clips its own gradient before it enters the velocity, at
    ``gradient_clip_val / sqrt(world_size)``, instead of Lightning clipping the aggregated step.
    Other optimizers (Adam, AdamW...) keep plain error feedback.

    Args:
        compressor: a :class:`~ec_hooks.Compressor` or a name from ``ec_hooks.COMPRESSOR_NAMES``.
        density: fraction of the entries kept, for a compressor given by name (``topk``,
            ``randk``, ``cyclic_topk``); default 0.01.
        start_iter: number of initial steps that use plain allreduce.
        dense_fallback: allreduce the densified compressed bucket when that is cheaper than
            gathering every worker's payload.
        momentum_correction: move an SGD optimizer's momentum into the hook; ``False`` keeps plain
            error feedback with the optimizer's own momentum.  ``None`` (default): on, unless the
            compressor says it does better without (``prefers_momentum_correction = False``:
            :class:`~ec_hooks.CyclicTopK`, see ``docs/transports.md``).
        density_warmup_steps: ramp the density from ``density_warmup_start`` to the compressor's
            over this many steps (DGC's warm-up, top-k and rand-k; default 0, off).
        density_warmup_start: the ramp's first density (default 0.25, DGC's).
        momentum_masking: DGC's momentum factor masking (default ``False``; see
            :class:`~ec_hooks.ErrorFeedbackState`).
        send_momentum_tail: masking that keeps the mass: each sent entry also carries the momentum
            its velocity would still add, and its velocity is cleared (top-k, rand-k, shared-index
            top-k; needs the momentum in the hook; default ``False``; see
            :class:`~ec_hooks.ErrorFeedbackState`).
        hierarchical: dense inside each node, compressed only between nodes
            (:mod:`ec_hooks.hierarchical`); the nodes are the Trainer's ``num_nodes`` x
            ``devices`` unless ``nodes`` lists them.  The optimizer then keeps its own momentum
            (momentum correction and the density warm-up are not combined with it yet).
        nodes: with ``hierarchical``, the global ranks of every node.
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
        momentum_correction: bool | None = None,
        density_warmup_steps: int = 0,
        momentum_masking: bool = False,
        density_warmup_start: float = 0.25,
        hierarchical: bool = False,
        nodes: list[list[int]] | None = None,
        send_momentum_tail: bool = False,
        **kwargs: Any,
    ) -> None:
        reject_comm_hook_kwargs(type(self).__name__, kwargs)
        if compressor is None:
            raise ValueError("compressor must be a Compressor or a compressor name, got None")
        if density is None and isinstance(compressor, str) and "density" in compressor_arguments(compressor):
            density = 0.01
        built = build_compressor(compressor, density)
        assert built is not None  # a name or an object: never None
        self.compressor: Compressor = built
        self.start_iter = check_int("start_iter", start_iter, 0)
        if not isinstance(dense_fallback, bool):
            raise ValueError(f"dense_fallback must be True or False, got {dense_fallback!r}")
        self.dense_fallback = dense_fallback
        if momentum_correction is not None and not isinstance(momentum_correction, bool):
            raise ValueError(
                f"momentum_correction must be True, False or None (the compressor's choice), "
                f"got {momentum_correction!r}"
            )
        if momentum_correction is None:
            momentum_correction = self.compressor.prefers_momentum_correction
            if not momentum_correction:
                rank_zero_info(
                    f"{type(self).__name__}: {self.compressor!r} keeps plain error feedback with the "
                    "optimizer's own momentum (momentum_correction=True moves it into the hook)"
                )
        self.density_warmup_steps = check_int("density_warmup_steps", density_warmup_steps, 0)
        self.density_warmup_start = check_unit_interval(
            "density_warmup_start", density_warmup_start, "the ramp's first density"
        )
        if not isinstance(momentum_masking, bool):
            raise ValueError(f"momentum_masking must be True or False, got {momentum_masking!r}")
        self.momentum_masking = momentum_masking
        if not isinstance(send_momentum_tail, bool):
            raise ValueError(f"send_momentum_tail must be True or False, got {send_momentum_tail!r}")
        if send_momentum_tail and momentum_masking:
            raise ValueError(
                "send_momentum_tail=True masks and sends what masking would drop: leave momentum_masking=False"
            )
        self.send_momentum_tail = send_momentum_tail
        check_hierarchy(hierarchical, nodes)
        if hierarchical and density_warmup_steps:
            raise ValueError("hierarchical=True is not combined with density_warmup_steps yet: leave it at 0")
        # The hierarchical hook does not apply momentum correction yet: the optimizer keeps its own.
        self.momentum_correction = momentum_correction and not hierarchical
        if send_momentum_tail and not self.momentum_correction:
            raise ValueError(
                "send_momentum_tail=True needs the momentum in the hook: pass momentum_correction=True "
                "(and hierarchical=False, where the optimizer keeps its momentum)"
            )
        self.hierarchical = hierarchical
        self.nodes = nodes
        super().__init__(**kwargs)
        self.comm_state: ErrorFeedbackState | None = None
        # what setup moved into the hook (MomentumCorrection's arguments); kept for a second fit
        self._moved: dict | None = None

    @property
    def comm_stats(self) -> list[CommStats]:
        """Communication statistics of this worker (empty before setup and on one device)."""
        return [] if self.comm_state is None else [self.comm_state.stats]

    @override
    def _register_ddp_hooks(self) -> None:
        if self.world_size == 1:
            rank_zero_info(
                f"{type(self).__name__}: one device, nothing to communicate; gradients are not compressed"
            )
            return
        state = ErrorFeedbackState(
            compressor=self.compressor,
            start_iter=self.start_iter,
            module=self.model,
            dense_fallback=self.dense_fallback,
            density_warmup_steps=self.density_warmup_steps,
            density_warmup_start=self.density_warmup_start,
            hierarchical=self.hierarchical,
            nodes=node_layout(self, self.nodes) if self.hierarchical else None,
        )
        if self._moved is not None:
            # a second fit: the first one's settings, so that its velocities load
            state.momentum_correction = MomentumCorrection(**self._moved)
        if self.comm_state is not None:
            # A second fit with the same strategy keeps the memories of the first.
            state.load_state_dict(self.comm_state.state_dict())
        self.comm_state = state
        assert isinstance(self.model, DistributedDataParallel)
        self.model.register_comm_hook(state, error_feedback_hook)

    @override
    def setup_optimizers(self, trainer) -> None:
        super().setup_optimizers(trainer)
        if self.comm_state is None or not self.momentum_correction:
            return
        assert self.model is not None
        moved = _movable_momentum(self.optimizers, self.model)
        if moved is not None:
            moved["masking"] = self.momentum_masking
            moved["send_tail"] = self.send_momentum_tail
        if moved is None:
            if self._moved is not None:
                raise ValueError(
                    "the optimizer changed between fits: momentum correction can no longer apply"
                )
            rank_zero_info(
                f"{type(self).__name__}: the optimizer is not SGD with momentum (one optimizer, "
                "the same momentum, nesterov and weight decay in every group); plain error feedback"
            )
            return
        clip = trainer.gradient_clip_val
        if clip is not None and trainer.gradient_clip_algorithm in (None, "norm"):
            # DGC: each worker clips before accumulating; n such gradients sum to a norm ~ sqrt(n) * local
            moved["clip_norm"] = float(clip) / math.sqrt(self.world_size)
            trainer.gradient_clip_val = None
        for optimizer in self.optimizers:
            for group in optimizer.param_groups:
                group.update(momentum=0.0, nesterov=False, weight_decay=0.0)
        if self._moved is None:
            self._moved = moved
            rank_zero_info(
                f"{type(self).__name__}: momentum correction: SGD's momentum={moved['momentum']}, "
                f"nesterov={moved['nesterov']} and weight_decay={moved['weight_decay']} now apply in the "
                "communication hook, before compression; the optimizer steps with momentum 0"
                + (
                    f"; gradients are clipped on each worker to norm {moved['clip_norm']:.4g} (gradient_clip_val"
                    " / sqrt(world_size)) before they enter the velocity"
                    if "clip_norm" in moved
                    else ""
                )
                + " (MemSGDStrategy(momentum_correction=False) turns this off)"
            )
        if self.comm_state.momentum_correction is None:
            self.comm_state.momentum_correction = MomentumCorrection(**moved)
        scaler = getattr(self.precision_plugin, "scaler", None)
        if scaler is not None:
            # the hook sees loss-scaled gradients; rescale_memories() keeps the threshold in step
            self.comm_state.momentum_correction.clip_scale = float(scaler.get_scale())

    @override
    def has_worker_state(self) -> bool:
        return self.comm_state is not None

    @override
    def worker_state(self) -> dict | None:
        if self.comm_state is None:
            return None
        # Parameters and optimizer states are identical on every worker; the memories are not.
        return {"error_feedback": self.comm_state.state_dict()}

    @override
    def load_worker_state(self, state: dict) -> None:
        if self.comm_state is None:
            raise ValueError(
                "the checkpoint carries error-feedback memories but this run has no Mem-SGD hook"
            )
        if "error_feedback" not in state:
            raise ValueError(
                f"the checkpoint's per-worker state has no error-feedback memories (it holds {sorted(state)}): it "
                "was saved by another strategy; resume it with the strategy that saved it"
            )
        try:
            self.comm_state.load_state_dict(state["error_feedback"])
        except ValueError as exc:
            if "momentum_correction" not in str(exc):
                raise
            raise ValueError(
                f"{exc}. A checkpoint written without momentum correction resumes with "
                "MemSGDStrategy(momentum_correction=False)"
            ) from exc

    @override
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
    @override
    def register_strategies(cls, strategy_registry) -> None:
        for name, start_method in (("memsgd", "popen"), ("memsgd_spawn", "spawn")):
            strategy_registry.register(
                name,
                cls,
                description=f"Mem-SGD (top-k with error feedback) DDP, start_method '{start_method}'",
                override=True,
                start_method=start_method,
            )


def _movable_momentum(optimizers: list[Optimizer], model: torch.nn.Module) -> dict | None:
    """The SGD settings the hook can take over, or ``None``.

    It can when there is one ``torch.optim.SGD`` optimizer whose groups share one momentum > 0,
    nesterov and weight decay, without dampening or ``maximize``, and that holds every trained
    parameter: the hook applies one velocity rule to every parameter it sees.
    """
    if len(optimizers) != 1 or type(optimizers[0]) is not torch.optim.SGD:
        return None
    groups = optimizers[0].param_groups
    settings = {
        (g["momentum"], g["nesterov"], g["weight_decay"], g["dampening"], g.get("maximize", False))
        for g in groups
    }
    if len(settings) != 1:
        return None
    momentum, nesterov, weight_decay, dampening, maximize = settings.pop()
    if not momentum > 0 or dampening or maximize:
        return None
    held = {id(p) for g in groups for p in g["params"]}
    if any(p.requires_grad and id(p) not in held for p in model.parameters()):
        return None
    return {"momentum": float(momentum), "nesterov": bool(nesterov), "weight_decay": float(weight_decay)}
