"""Peer baselines: DDP with torch's own communication hooks, on every device, with byte accounting.

Lightning's ``DDPStrategy`` registers ``ddp_comm_hook`` only when the root device is CUDA and says
nothing otherwise, so a CPU run given ``powerSGD_hook`` silently trains with plain allreduce.
:class:`TorchHookDDPStrategy` registers the hook on any device and counts the bytes each rank
contributes to the collectives, in an :class:`ec_hooks.CommStats` (``strategy.stats``; also
``strategy.comm_stats``, which ``lightning_plugin.CompressionMonitor`` reads):

* ``allreduce``: DDP's default, ``numel * element_size`` per bucket;
* ``fp16``: ``torch.distributed.algorithms.ddp_comm_hooks.default_hooks.fp16_compress_hook``,
  two bytes per entry;
* ``powersgd``: ``powerSGD_hook`` (Vogels et al., 2019): before ``start_powerSGD_iter`` a plain
  allreduce, afterwards the entries its state reports as communicated (the P and Q factors of
  the compressed matrices plus the tensors it leaves uncompressed), times the element size.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

from lightning.pytorch.strategies import DDPStrategy
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook

from ec_hooks import CommStats

__all__ = ["TorchHookDDPStrategy", "HOOK_NAMES"]

logger = logging.getLogger(__name__)

HOOK_NAMES = ("allreduce", "fp16", "powersgd")


class TorchHookDDPStrategy(DDPStrategy):
    """``DDPStrategy`` that registers one of torch's comm hooks on every device and counts bytes.

    Args:
        hook: ``"allreduce"`` (DDP's default), ``"fp16"`` or ``"powersgd"``.
        matrix_approximation_rank, start_powerSGD_iter, min_compression_rate, use_error_feedback,
            warm_start: passed to ``PowerSGDState`` (``hook="powersgd"`` only).
        **kwargs: passed to ``DDPStrategy`` (``process_group_backend``, ``find_unused_parameters``, ...).
    """

    strategy_name = "ddp_torch_hook"

    def __init__(
        self,
        hook: Literal["allreduce", "fp16", "powersgd"] = "allreduce",
        matrix_approximation_rank: int = 1,
        start_powerSGD_iter: int = 10,  # noqa: N803 - torch's name
        min_compression_rate: float = 2.0,
        use_error_feedback: bool = True,
        warm_start: bool = True,
        **kwargs: Any,
    ) -> None:
        if hook not in HOOK_NAMES:
            raise ValueError(f"hook must be one of {list(HOOK_NAMES)}, got {hook!r}")
        if hook == "powersgd":
            if isinstance(matrix_approximation_rank, bool) or not isinstance(matrix_approximation_rank, int) \
                    or matrix_approximation_rank < 1:
                raise ValueError(f"matrix_approximation_rank must be a positive integer, got {matrix_approximation_rank!r}")
            if (use_error_feedback or warm_start) and start_powerSGD_iter < 2:
                raise ValueError(
                    f"start_powerSGD_iter must be >= 2 with error feedback or warm start (DDP rebuilds its buckets "
                    f"after the first step), got {start_powerSGD_iter!r}"
                )
        for name in ("ddp_comm_hook", "ddp_comm_state", "ddp_comm_wrapper"):
            # None is what LightningCLI passes for every DDPStrategy argument left unset
            if kwargs.pop(name, None) is not None:
                raise ValueError(f"TorchHookDDPStrategy chooses the hook itself: pass hook=..., not {name}")
        super().__init__(**kwargs)
        self.hook = hook
        self.powersgd_options = dict(
            matrix_approximation_rank=matrix_approximation_rank,
            start_powerSGD_iter=start_powerSGD_iter,
            min_compression_rate=min_compression_rate,
            use_error_feedback=use_error_feedback,
            warm_start=warm_start,
        )
        self.stats = CommStats()
        self.hook_state: Any = None

    @property
    def comm_stats(self) -> list[CommStats]:
        """This worker's figures, read by ``lightning_plugin.CompressionMonitor``."""
        return [self.stats]

    def _register_ddp_hooks(self) -> None:
        # Unlike DDPStrategy, on every device: gloo runs these hooks as well as NCCL does.
        if self.hook == "allreduce":
            inner_state, inner_hook = None, default_hooks.allreduce_hook
        elif self.hook == "fp16":
            inner_state, inner_hook = None, default_hooks.fp16_compress_hook
        else:
            inner_state = powerSGD_hook.PowerSGDState(process_group=None, **self.powersgd_options)
            inner_hook = powerSGD_hook.powerSGD_hook
        self.hook_state = inner_state
        self.model.register_comm_hook(_CountingState(inner_state, self.stats, self.hook), _counting_hook(inner_hook))


class _CountingState:
    def __init__(self, inner: Any, stats: CommStats, hook: str) -> None:
        self.inner, self.stats, self.hook = inner, stats, hook


def _counting_hook(inner_hook):
    # No annotations: DDP checks them, and postponed (string) annotations fail its check.
    def hook(state, bucket):
        buffer = bucket.buffer()
        numel, size = buffer.numel(), buffer.element_size()
        inner = state.inner
        before = getattr(inner, "total_numel_after_compression", 0)
        fut = inner_hook(inner, bucket)
        if state.hook == "fp16":
            sent = numel * 2
        elif state.hook == "powersgd" and inner.total_numel_after_compression != before:
            sent = (inner.total_numel_after_compression - before) * size
        else:  # allreduce, and PowerSGD's allreduce warm-up
            sent = numel * size
        entries_sent = numel if state.hook == "fp16" else sent // size
        state.stats.record(bytes_sent=sent, bytes_dense=numel * size, entries_sent=entries_sent, entries=numel)
        if bucket.is_last():
            state.stats.end_step()
        return fut

    hook.__name__ = f"counting_{inner_hook.__name__}"
    return hook
