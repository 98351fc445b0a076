"""``CompressionMonitor``: communication figures beside the loss, in every attached logger."""

from __future__ import annotations

import logging
import math

import torch
import torch.distributed as dist
from lightning.pytorch import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from typing_extensions import override

from ec_hooks.stats import CommStats

__all__ = ["CompressionMonitor"]

logger = logging.getLogger(__name__)


def _strategy_stats(strategy) -> list[CommStats] | None:
    """The strategy's :class:`~ec_hooks.stats.CommStats`, or ``None`` if it keeps none."""
    stats = getattr(strategy, "comm_stats", None)
    if stats is not None:
        return [stats] if isinstance(stats, CommStats) else list(stats)
    # Lightning's DDPStrategy given an ec_hooks state (ddp_comm_state=ErrorFeedbackState(...)).
    state_stats = getattr(getattr(strategy, "_ddp_comm_state", None), "stats", None)
    if isinstance(state_stats, CommStats):
        return [state_stats]
    return None


class CompressionMonitor(Callback):
    """Logs the communication of :class:`~lightning_plugin.MemSGDStrategy` and the gossip strategies.

    Keys, logged with ``on_step=True`` every ``Trainer(log_every_n_steps=...)`` optimizer steps
    through every logger of the trainer (CSV, TensorBoard, W&B, ...):

    * ``comm/bytes_sent``: bytes one worker has put on the wire since the start (gradient
      payloads for Mem-SGD, messages to all its neighbours for gossip), mean over the workers;
    * ``comm/bytes_dense``: what a dense allreduce of the same tensors would have sent, mean
      over the workers;
    * ``comm/compression_ratio``: ``bytes_dense / bytes_sent``, summed over the workers;
    * ``comm/residual_norm``: norm of what was not sent yet (error-feedback memory, or the
      gossip compression error), root mean square over the workers;
    * ``gossip/consensus_distance`` (gossip strategies only):
      ``sqrt((1/n) sum_i ||x_i - x_bar||^2)``, the spread of the local models.

    Every value is reduced over the workers (one allreduce of four numbers at a logging step,
    plus two allreduces of the model for the consensus distance), so every rank holds the same
    figures and the loggers of rank 0 write them.

    Args:
        consensus_distance: measure ``gossip/consensus_distance`` (costs an allreduce of the model
            at each logging step).
        prog_bar: also show the compression ratio in the progress bar.

    With a strategy that keeps no statistics (plain ``"ddp"``) it warns once and logs nothing.
    """

    def __init__(self, consensus_distance: bool = True, prog_bar: bool = False) -> None:
        if not isinstance(consensus_distance, bool):
            raise ValueError(f"consensus_distance must be True or False, got {consensus_distance!r}")
        if not isinstance(prog_bar, bool):
            raise ValueError(f"prog_bar must be True or False, got {prog_bar!r}")
        self.measure_consensus_distance = consensus_distance
        self.prog_bar = prog_bar
        self._last_step: int | None = None
        self._active = False

    @override
    def on_train_start(self, trainer, pl_module) -> None:
        self._last_step = trainer.global_step
        stats = _strategy_stats(trainer.strategy)
        self._active = bool(stats)
        if stats is None:
            rank_zero_warn(
                f"CompressionMonitor: the strategy {type(trainer.strategy).__name__} keeps no communication "
                "statistics; nothing will be logged (use strategy='memsgd' or 'deepsqueeze')"
            )
        elif not stats:
            rank_zero_info(
                "CompressionMonitor: nothing is communicated on one device; nothing will be logged"
            )

    @override
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if not self._active or step == self._last_step:  # accumulation micro-step: no optimizer step
            return
        self._last_step = step
        if trainer.log_every_n_steps == 0 or step % trainer.log_every_n_steps:
            return
        metrics = self.collect(trainer.strategy, pl_module.device)
        pl_module.log_dict(metrics, on_step=True, on_epoch=False, batch_size=1)
        if self.prog_bar:
            pl_module.log(
                "ratio",
                metrics["comm/compression_ratio"],
                on_step=True,
                on_epoch=False,
                prog_bar=True,
                logger=False,
                batch_size=1,
            )

    def collect(self, strategy, device: torch.device) -> dict[str, float]:
        """The figures, reduced over the workers.  Collective: every rank must call it."""
        stats = _strategy_stats(strategy) or []
        local = torch.tensor(
            [
                sum(s.bytes_sent for s in stats),
                sum(s.bytes_dense for s in stats),
                sum(s.residual_norm**2 for s in stats),
                1.0,
            ],
            dtype=torch.float64,
            device=device,
        )
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(local)
        sent, dense, residual_sq, workers = local.tolist()
        metrics = {
            "comm/bytes_sent": sent / workers,
            "comm/bytes_dense": dense / workers,
            "comm/compression_ratio": dense / sent if sent else 1.0,
            "comm/residual_norm": math.sqrt(max(residual_sq, 0.0) / workers),
        }
        if self.measure_consensus_distance and hasattr(strategy, "consensus_distance"):
            metrics["gossip/consensus_distance"] = float(strategy.consensus_distance())
        return metrics
