"""The compressor interface and its payload."""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch

__all__ = ["Compressor", "Payload", "seed_from"]


@dataclass
class Payload:
    """What a compressor puts on the wire for one tensor.

    Attributes:
        data: the tensor that travels.  For summable compressors a numeric tensor that the
            transport may sum across workers; otherwise a flat ``uint8`` buffer.
        shape: shape of the compressed tensor.
        indices: for ``RandK`` the indices every worker derives from the shared seed; they are
            not sent.
        value_dtype: for byte payloads that carry float values (``TopK``), their dtype.
    """

    data: torch.Tensor
    shape: torch.Size
    indices: torch.Tensor | None = None
    value_dtype: torch.dtype | None = None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()

    def with_data(self, data: torch.Tensor) -> Payload:
        """The same payload with other wire data (a peer's, or the sum over workers)."""
        return Payload(data=data, shape=self.shape, indices=self.indices, value_dtype=self.value_dtype)


def seed_from(*values: int) -> int:
    """A 63-bit seed that mixes its inputs well (adjacent steps give unrelated streams)."""
    digest = hashlib.blake2b(repr(values).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


class Compressor:
    """Base class.  Subclasses implement :meth:`compress`, :meth:`decompress`, :meth:`wire_bytes`."""

    #: payloads of different workers may be summed element-wise (then: one allreduce)
    summable: bool = False
    name: str = "compressor"
    #: constructor arguments that may differ across workers: they change how, not what, is computed
    local_args: tuple[str, ...] = ()

    def compress(
        self, x: torch.Tensor, *, step: int = 0, key: int = 0, rank: int = 0, wire_dtype: torch.dtype | None = None
    ) -> Payload:
        """Compress ``x``.

        Args:
            step, key: identify the call (training step, bucket or tensor id); randomised
                compressors derive their random stream from them, never from the global RNG.
            rank: the caller's rank, for compressors whose randomness must differ across workers.
            wire_dtype: dtype of the values on the wire (default ``x.dtype``); the hook passes the
                gradient's dtype so that an fp32 memory does not double the bytes of bf16 gradients.
        """
        raise NotImplementedError

    def decompress(self, payload: Payload) -> torch.Tensor:
        """Dense fp32 tensor shaped like the compressed one (fp64 when the payload carries fp64 values)."""
        raise NotImplementedError

    def wire_bytes(self, numel: int, dtype: torch.dtype = torch.float32) -> int:
        """Exact bytes one payload for a tensor of ``numel`` entries of ``dtype`` puts on the wire."""
        raise NotImplementedError

    def entries_sent(self, numel: int) -> int:
        """How many of ``numel`` entries a payload carries a value for (all, unless sparse)."""
        return numel

    def sent_indices(self, payload: Payload) -> torch.Tensor | None:
        """Flat indices of the entries this payload sends whole (the memory keeps nothing of them
        but rounding), or ``None`` for a compressor that sends an approximation of every entry.

        Momentum factor masking clears the velocity at these indices: for a sparsifier, the
        entries it emptied; a dense compressor (sign, QSGD, 16-bit casts) would clear every
        entry at every step, which is no momentum at all, so it masks nothing.
        """
        return None

    def sum_payloads(self, payloads: list[Payload]) -> torch.Tensor:
        """Dense fp32 sum of several workers' payloads (the allgather path)."""
        out = self.decompress(payloads[0]).clone()
        for p in payloads[1:]:
            out += self.decompress(p)
        return out

    def subtract_sent_(self, acc: torch.Tensor, payload: Payload, scale: torch.Tensor | None = None) -> None:
        """``acc -= C(acc)`` in place: what stays in the error-feedback memory.

        ``scale`` (a 0-dim tensor, 0 or 1) lets the caller void the update without a host sync.
        """
        sent = self.decompress(payload).view_as(acc)
        acc.sub_(sent if scale is None else sent * scale)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self._repr_args().items())
        return f"{type(self).__name__}({args})"

    def _repr_args(self) -> dict:
        return {}
