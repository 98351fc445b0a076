"""Gossip's view of the model: one flat fp32 buffer (fp64 for the consensus distance), with an fp32
master copy for 16-bit parameters, and working buffers reused from step to step."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from ec_hooks import flat

__all__ = ["FlatModel", "collect_params"]

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def collect_params(params: Iterable[torch.Tensor] | Iterable[dict] | torch.Tensor) -> list[torch.Tensor]:
    if isinstance(params, torch.Tensor):
        params = [params]
    out: list[torch.Tensor] = []
    for item in params:
        if isinstance(item, dict):  # optimizer param groups
            out.extend(item["params"])
        else:
            out.append(item)
    if not out:
        raise ValueError("params is empty: pass model.parameters() (or a list of tensors) to gossip")
    seen = set()
    for i, p in enumerate(out):
        if not isinstance(p, torch.Tensor):
            raise ValueError(f"params must be tensors, item {i} is a {type(p).__name__}")
        if not p.is_floating_point():
            raise ValueError(f"params must be floating-point tensors, item {i} has dtype {p.dtype}")
        if id(p) in seen:
            raise ValueError(f"params lists the same tensor twice (item {i})")
        seen.add(id(p))
        if p.device != out[0].device:
            raise ValueError(
                f"params must all be on one device: item 0 is on {out[0].device}, item {i} on {p.device}"
            )
    return out


def _low_precision_slices(params: Sequence[torch.Tensor]) -> list[tuple[int, int, torch.dtype]]:
    """``(start, stop, dtype)`` of the 16-bit parameters in the flattened model."""
    return [
        (start, stop, p.dtype)
        for p, (start, stop) in zip(params, flat.spans(p.numel() for p in params))
        if p.dtype in _LOW_PRECISION
    ]


class FlatModel:
    """The parameters as one flat model: read (:meth:`_flatten`), written back (:meth:`_write_back`),
    and the working buffers of the step (:meth:`_scratch`).

    16-bit models (fp16, bf16) are mixed in fp32 and keep an fp32 master copy of the model (see
    :mod:`ec_hooks.gossip`): the optimizer's change to the 16-bit parameters since the last
    write-back is added to the master copy, the master copy is mixed, and the parameters receive
    it rounded.
    """

    def _setup_flat(self, params: Iterable[torch.Tensor]) -> None:
        self.params = collect_params(params)
        self.numel = sum(p.numel() for p in self.params)
        self.device = self.params[0].device
        dtypes = {p.dtype for p in self.params}
        # Values travel in the model's dtype (a bf16 model sends bf16 values); mixed models in fp32.
        self.wire_dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
        self.bytes_dense = sum(p.numel() * p.element_size() for p in self.params)
        self._scratch_buffers: dict[str, torch.Tensor] = {}
        self._low_precision_slices = _low_precision_slices(self.params)
        self._master: torch.Tensor | None = None

    def _flatten(self, out: torch.Tensor | None = None) -> torch.Tensor:
        """This worker's model, flat, in fp32: the parameters, except that 16-bit ones are read
        from the master copy plus what the optimizer changed since the last write-back."""
        x = flat.flatten(self.params, torch.float32, out=out)
        if self._master is not None:
            for start, stop, dtype in self._low_precision_slices:
                master = self._master[start:stop]
                # both terms of the difference are 16-bit values: it is exact in fp32
                x[start:stop].sub_(master.to(dtype)).add_(master)
        return x

    def _scratch(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        """A flat buffer of the model's size, allocated once and reused by every step (a
        working buffer, not state: nothing in it outlives the step that fills it, except the
        residual that :attr:`stats` points at)."""
        buffer = self._scratch_buffers.get(name)
        if buffer is None or buffer.dtype != dtype:
            buffer = self._scratch_buffers[name] = torch.empty(self.numel, dtype=dtype, device=self.device)
        return buffer

    def _write_back(self, x: torch.Tensor) -> None:
        if self._low_precision_slices:
            if self._master is None:
                self._master = x.clone()
            else:
                self._master.copy_(x)
        for p, part in zip(self.params, flat.split(x, self.params)):
            p.copy_(part)

    def _model_fp64(self) -> torch.Tensor:
        """This worker's model, flat, in fp64 (16-bit parameters through the master copy)."""
        if self._master is None:
            return flat.flatten(self.params, torch.float64)
        return self._flatten().to(torch.float64)
