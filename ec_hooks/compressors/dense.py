"""Dense compressors summed by allreduce: the identity and 16-bit casts."""

from __future__ import annotations

import torch

from ec_hooks.compressors.base import Compressor, Payload
from ec_hooks.compressors.wire import HALF_DTYPES, widen
from ec_hooks.kernels import to_wire

__all__ = ["BF16", "FP16", "Cast", "Identity"]


class Identity(Compressor):
    """No compression: the payload is the tensor itself, summed by allreduce.

    With it (or ``TopK(density=1)``) the error-feedback hook reproduces DDP's default allreduce.
    """

    summable = True
    name = "identity"
    consensus_steps = {**Compressor.consensus_steps, "deepsqueeze": 1.0, "choco": 1.0}

    def compress(self, x, *, step=0, key=0, rank=0, wire_dtype=None):
        return Payload(data=to_wire(x.reshape(-1), wire_dtype or x.dtype), shape=x.shape)

    def decompress(self, payload):
        return widen(payload.data).view(payload.shape)

    def wire_bytes(self, numel, dtype=torch.float32):
        return numel * torch.empty((), dtype=dtype).element_size()


class Cast(Compressor):
    """Cast to a 16-bit float dtype (``torch.float16`` or ``torch.bfloat16``); summed by allreduce.

    With error feedback the rounding error is kept in memory instead of being lost.
    """

    summable = True
    _DTYPES = HALF_DTYPES
    consensus_steps = {**Compressor.consensus_steps, "deepsqueeze": 1.0, "choco": 1.0}

    def __init__(self, dtype: torch.dtype | str = torch.float16):
        if isinstance(dtype, str):
            if dtype not in self._DTYPES:
                raise ValueError(f"dtype must be one of {sorted(self._DTYPES)}, got {dtype!r}")
            dtype = self._DTYPES[dtype]
        if dtype not in (torch.float16, torch.bfloat16):
            raise ValueError(f"dtype must be torch.float16 or torch.bfloat16, got {dtype!r}")
        self.dtype = dtype
        self.name = "fp16" if dtype == torch.float16 else "bf16"

    def _repr_args(self):
        return {"dtype": self.dtype}

    def compress(self, x, *, step=0, key=0, rank=0, wire_dtype=None):
        return Payload(data=to_wire(x.reshape(-1), self.dtype), shape=x.shape)

    def decompress(self, payload):
        return payload.data.float().view(payload.shape)

    def wire_bytes(self, numel, dtype=torch.float32):
        return 2 * numel


def FP16() -> Cast:  # noqa: N802 - reads as a compressor class at call sites
    """Half precision on the wire."""
    return Cast(torch.float16)


def BF16() -> Cast:  # noqa: N802
    """bfloat16 on the wire."""
    return Cast(torch.bfloat16)
