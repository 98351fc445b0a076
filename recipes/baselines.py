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

With ``hook="powersgd"`` a checkpoint carries every worker's ``PowerSGDState`` (error feedback,
the P and Q memories of warm start, the step counter, the random generator) in
``checkpoint["ec_hooks"]["workers"]`` (:mod:`lightning_plugin.worker_state`), and
``trainer.fit(ckpt_path=...)`` resumes bit for bit:

1. At a save, every worker gathers its state and the bucket layouts of its last step (the
   parameter names of each DDP bucket, by bucket index) to rank 0.
2. At a load, every worker takes back its own entry, after DDP is built.
3. The new DDP instance reduces its first step in one bucket of every parameter and only then
   rebuilds the buckets that the uninterrupted run used all along.  For that one step the hook
   splits the bucket into the saved layouts and runs PowerSGD on each, in bucket-index order, as
   a bucket of its own with its saved index: the same buffers, error and P/Q memories,
   collectives and random draws as the uninterrupted run.  (A bucket that holds only part of a
   saved layout, e.g. after a change of ``bucket_cap_mb``, is compressed as it comes: nothing is
   lost, but that step differs.)
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook
from torch.nn.parallel import DistributedDataParallel

from ec_hooks import CommStats
from ec_hooks.layouts import SavedLayouts
from lightning_plugin.worker_state import WorkerStateDDPStrategy

__all__ = ["HOOK_NAMES", "TorchHookDDPStrategy", "load_powersgd_state_dict", "powersgd_state_dict"]

logger = logging.getLogger(__name__)

HOOK_NAMES = ("allreduce", "fp16", "powersgd")


class TorchHookDDPStrategy(WorkerStateDDPStrategy):
    """``DDPStrategy`` that registers one of torch's comm hooks on every device and counts bytes.

    Args:
        hook: ``"allreduce"`` (DDP's default), ``"fp16"`` or ``"powersgd"``.
        matrix_approximation_rank, start_powerSGD_iter, min_compression_rate, use_error_feedback,
            warm_start: passed to ``PowerSGDState`` (``hook="powersgd"`` only).
        **kwargs: passed to ``DDPStrategy`` (``process_group_backend``, ``find_unused_parameters``, ...).

    Checkpoints of ``hook="powersgd"`` carry every worker's PowerSGD state and resume exactly
    (see the module docstring); the other hooks keep no state.
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
            if (
                isinstance(matrix_approximation_rank, bool)
                or not isinstance(matrix_approximation_rank, int)
                or matrix_approximation_rank < 1
            ):
                raise ValueError(
                    f"matrix_approximation_rank must be a positive integer, got {matrix_approximation_rank!r}"
                )
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
        self.powersgd_options: dict[str, Any] = dict(
            matrix_approximation_rank=matrix_approximation_rank,
            start_powerSGD_iter=start_powerSGD_iter,
            min_compression_rate=min_compression_rate,
            use_error_feedback=use_error_feedback,
            warm_start=warm_start,
        )
        self.stats = CommStats()
        self.hook_state: Any = None
        self._counting_state: _CountingState | None = None

    @property
    def comm_stats(self) -> list[CommStats]:
        """This worker's figures, read by ``lightning_plugin.CompressionMonitor``."""
        return [self.stats]

    def _register_ddp_hooks(self) -> None:
        # Unlike DDPStrategy, on every device: gloo runs these hooks as well as NCCL does.
        assert isinstance(self.model, DistributedDataParallel)
        inner_state: Any
        inner_hook: Callable[..., torch.futures.Future[torch.Tensor]]
        if self.hook == "allreduce":
            inner_state, inner_hook = None, default_hooks.allreduce_hook
        elif self.hook == "fp16":
            inner_state, inner_hook = None, default_hooks.fp16_compress_hook
        else:
            inner_state = powerSGD_hook.PowerSGDState(process_group=None, **self.powersgd_options)
            inner_hook = powerSGD_hook.powerSGD_hook
        self.hook_state = inner_state
        names = {id(p): name for name, p in self.model.module.named_parameters()}
        self._counting_state = _CountingState(inner_state, self.stats, self.hook, names)
        # powerSGD_hook issues its later collectives from future callbacks, which gloo runs either
        # inline or on its own thread: with two buckets or more the workers can then issue them in
        # different orders and wait for each other forever.  Off NCCL, each bucket finishes first.
        self._counting_state.synchronous = self.hook == "powersgd" and dist.get_backend() != "nccl"
        self.model.register_comm_hook(self._counting_state, _counting_hook(inner_hook))

    # -- per-worker checkpoint state (PowerSGD only) ---------------------------------------
    def has_worker_state(self) -> bool:
        return self.hook == "powersgd" and self.hook_state is not None

    def worker_state(self) -> dict | None:
        if not self.has_worker_state():
            return None
        assert self._counting_state is not None
        return {
            "powersgd": {
                "state": powersgd_state_dict(self.hook_state),
                "layouts": [list(layout) for layout in self._counting_state.layouts],
            }
        }

    def load_worker_state(self, state: dict) -> None:
        if "powersgd" not in state:
            raise ValueError(
                f"the checkpoint's per-worker state has no PowerSGD state (it holds {sorted(state)}): it was saved "
                "by another strategy; resume it with the strategy that saved it"
            )
        if not self.has_worker_state():
            raise ValueError(
                f"the checkpoint carries PowerSGD state but this run's hook is {self.hook!r}, not 'powersgd'"
            )
        entry = state["powersgd"]
        load_powersgd_state_dict(self.hook_state, entry["state"], self.root_device)
        assert self._counting_state is not None
        self._counting_state.expect_layouts([tuple(layout) for layout in entry["layouts"]])


# PowerSGDState fields that decide what the state means; a resume must not change them.
_POWERSGD_OPTIONS = (
    "matrix_approximation_rank",
    "start_powerSGD_iter",
    "min_compression_rate",
    "orthogonalization_epsilon",
    "use_error_feedback",
    "warm_start",
    "batch_tensors_with_same_shape",
)
_POWERSGD_COUNTERS = (
    "iter",
    "total_numel_before_compression",
    "total_numel_after_compression",
    "compression_stats_logging_frequency",
    "next_stats_report",
)
_POWERSGD_MEMORIES = ("error_dict", "p_memory_dict", "q_memory_dict")


def powersgd_state_dict(state: powerSGD_hook.PowerSGDState) -> dict:
    """Everything of a ``PowerSGDState`` but its process group, as tensors and numbers.

    The numpy generator is stored as its MT19937 state in a tensor, so the checkpoint loads
    with ``torch.load(weights_only=True)``.
    """
    rng_state = state.rng.get_state()
    assert isinstance(rng_state, tuple)  # the legacy form, the default
    kind, keys, pos, has_gauss, cached_gaussian = rng_state
    return {
        "options": {name: getattr(state, name) for name in _POWERSGD_OPTIONS},
        "counters": {name: int(getattr(state, name)) for name in _POWERSGD_COUNTERS},
        "rng": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        **{
            name: {int(index): tensor.detach().clone() for index, tensor in getattr(state, name).items()}
            for name in _POWERSGD_MEMORIES
        },
    }


def load_powersgd_state_dict(
    state: powerSGD_hook.PowerSGDState, state_dict: dict, device: torch.device
) -> None:
    """Restore :func:`powersgd_state_dict` into ``state``, its tensors moved to ``device``."""
    changed = [
        f"{name}={state_dict['options'].get(name)!r} (this run: {getattr(state, name)!r})"
        for name in _POWERSGD_OPTIONS
        if state_dict["options"].get(name) != getattr(state, name)
    ]
    if changed:
        raise ValueError(
            f"the checkpoint's PowerSGD state was saved with other options: {', '.join(changed)}; "
            "resume with the options that saved it"
        )
    for name in _POWERSGD_COUNTERS:
        setattr(state, name, state_dict["counters"][name])
    rng = state_dict["rng"]
    state.rng.set_state(
        (
            rng["kind"],
            rng["keys"].numpy().astype(np.uint32),
            rng["pos"],
            rng["has_gauss"],
            rng["cached_gaussian"],
        )
    )
    for name in _POWERSGD_MEMORIES:
        setattr(state, name, {int(index): tensor.to(device) for index, tensor in state_dict[name].items()})


class _SubBucket:
    """One saved bucket layout cut out of a larger DDP bucket: the ``GradBucket`` calls the hooks make."""

    def __init__(self, index: int, gradients: list[torch.Tensor], last: bool) -> None:
        self._index, self._last = index, last
        self._buffer = torch.cat([g.reshape(-1) for g in gradients])
        self._gradients, offset = [], 0
        for g in gradients:
            self._gradients.append(self._buffer[offset : offset + g.numel()].view_as(g))
            offset += g.numel()

    def index(self) -> int:
        return self._index

    def buffer(self) -> torch.Tensor:
        return self._buffer

    def gradients(self) -> list[torch.Tensor]:
        return self._gradients

    def is_last(self) -> bool:
        return self._last


class _CountingState:
    """The inner hook's state, this worker's byte counts, and the bucket layouts (parameter names)."""

    def __init__(self, inner: Any, stats: CommStats, hook: str, names: dict[int, str]) -> None:
        self.inner, self.stats, self.hook, self.names = inner, stats, hook, names
        self.layouts: list[tuple[str, ...]] = []  # of the last complete step, by bucket index
        self._step_layouts: dict[int, tuple[str, ...]] = {}
        self.saved = SavedLayouts()
        self._saved_index: dict[tuple[str, ...], int] = {}
        self.synchronous = False

    def expect_layouts(self, layouts: list[tuple[str, ...]]) -> None:
        """The layouts of the run that saved the state, by bucket index: the next step's buckets
        are split into them."""
        self.saved.expect(layouts)
        self._saved_index = {layout: i for i, layout in enumerate(self.saved.layouts)}

    def split(self, keys: tuple[str, ...]) -> list[tuple[str, ...]] | None:
        """The saved layouts that make up a bucket of these parameters, in bucket-index order
        (PowerSGD keys its memories and draws its random matrices by bucket index)."""
        units = self.saved.split(keys)
        return None if units is None else sorted(units, key=self._saved_index.__getitem__)

    def end_step(self) -> None:
        self.layouts = [self._step_layouts[i] for i in sorted(self._step_layouts)]
        self._step_layouts = {}
        self.saved.clear()  # only the first step after a load
        self.stats.end_step()


def _counting_hook(inner_hook):
    def run(state, bucket):
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
        state.stats.record(
            bytes_sent=sent, bytes_dense=numel * size, entries_sent=entries_sent, entries=numel
        )
        if state.synchronous:
            fut.wait()
        return fut

    # No annotations: DDP checks them, and postponed (string) annotations fail its check.
    def hook(state, bucket):
        keys = tuple(state.names[id(p)] for p in bucket.parameters())
        units = state.split(keys)
        if units is None:
            state._step_layouts[bucket.index()] = keys
            fut = run(state, bucket)
        else:
            # Each saved layout as a bucket of its own, one after the other (their collectives in the
            # same order on every worker), and the results back into DDP's bucket.
            gradients = dict(zip(keys, bucket.gradients()))
            for i, unit in enumerate(units):
                index = state._saved_index[unit]
                sub = _SubBucket(
                    index, [gradients[k] for k in unit], last=bucket.is_last() and i == len(units) - 1
                )
                state._step_layouts[index] = unit
                reduced = run(state, sub).wait()
                offset = 0
                for k in unit:
                    target = gradients[k]
                    target.copy_(reduced[offset : offset + target.numel()].view_as(target))
                    offset += target.numel()
            fut = torch.futures.Future()
            fut.set_result(bucket.buffer())
        if bucket.is_last():
            state.end_step()
        return fut

    hook.__name__ = f"counting_{inner_hook.__name__}"
    return hook
