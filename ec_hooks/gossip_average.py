"""The mean model of gossip, for evaluation and saving: collectives every rank calls together."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist

from ec_hooks import flat, transport

__all__ = ["ModelAverage"]


class ModelAverage:
    """:meth:`average_parameters`, :meth:`average_into` and :meth:`consensus_distance` of a gossip
    algorithm: the guarantees are about the mean model ``x_bar``, so evaluation and the saved
    model are ``x_bar`` (one allreduce), while each worker keeps training its own ``x_i``."""

    params: list[torch.Tensor]
    world_size: int
    process_group: Any
    watch: Any

    # Provided by the other parts of the algorithm (StatusChecks, FlatModel).
    def _raise_if_replaced(self) -> None:
        raise NotImplementedError

    def _flatten(self, out: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def _model_fp64(self) -> torch.Tensor:
        raise NotImplementedError

    def average_parameters(self) -> list[torch.Tensor]:
        """The mean model ``x_bar`` (one allreduce of one flat fp32 buffer), as new tensors in
        the order and dtypes of ``params``.  Local parameters are not modified.  Collective."""
        self._raise_if_replaced()
        with torch.no_grad():
            x = self._flatten()
            if self.world_size > 1:
                transport.allreduce_mean(x, self.process_group).wait()
            return [part.to(p.dtype).clone() for p, part in zip(self.params, flat.split(x, self.params))]

    def average_into(self, module: torch.nn.Module) -> None:
        """Load the mean model ``x_bar`` into ``module``, in place.  Collective: every rank calls it.

        ``module`` is the model this gossip mixes (its parameters, in the order of
        ``module.parameters()``, are ``params``), or a copy of it (``copy.deepcopy(model)``, for
        an evaluation model that leaves the local one as it is):

        1. Parameters receive :meth:`average_parameters` (16-bit ones through the fp32 master copy),
           copied into the existing tensors, so that optimizers and DDP keep pointing at them.
        2. Floating-point buffers (BatchNorm running mean and variance) are averaged across the
           ranks in fp32 (one allreduce of one flat buffer) and written back in their dtype.
        3. Integer buffers (BatchNorm's ``num_batches_tracked``) are left as they are: every worker
           counted the same batches.

        To evaluate the mean model and go on training the local one, average into a copy.  Raises
        ValueError when ``module``'s parameters do not match ``params`` in number and shapes.
        """
        mine = list(module.parameters())
        shapes = [tuple(p.shape) for p in mine]
        if shapes != [tuple(p.shape) for p in self.params]:
            raise ValueError(
                f"module must be the model this {type(self).__name__} mixes, or a copy of it: it has "
                f"{len(shapes)} parameters, the gossip {len(self.params)}"
                + ("" if len(shapes) != len(self.params) else " of other shapes")
            )
        average = self.average_parameters()
        with torch.no_grad():
            for p, avg in zip(mine, average):
                p.copy_(avg)
            floating = [b for b in module.buffers() if b.is_floating_point()]
            if floating and self.world_size > 1:
                buffer = flat.flatten(floating, torch.float32)
                transport.allreduce_mean(buffer, self.process_group).wait()
                for b, part in zip(floating, flat.split(buffer, floating)):
                    b.copy_(part)

    def consensus_distance(self) -> float:
        """``sqrt((1/n) sum_i ||x_i - x_bar||^2)`` over all parameters, in fp64.  Collective:
        every rank must call it; every rank gets the same value (0 for one worker)."""
        self._raise_if_replaced()
        if self.world_size == 1:
            self.watch.last_distance = 0.0
            return 0.0
        with torch.no_grad():
            x = self._model_fp64()
            mean = x.clone()
            dist.all_reduce(mean, group=self.process_group)
            mean.div_(self.world_size)
            spread = (x - mean).pow(2).sum().reshape(1)
            dist.all_reduce(spread, group=self.process_group)
            self.watch.mean_norm = float(mean.norm())
        self.watch.last_distance = math.sqrt(float(spread) / self.world_size)
        return self.watch.last_distance
