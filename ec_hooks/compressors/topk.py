"""Top-k: the entries of largest magnitude, sent as index/value pairs."""

from __future__ import annotations

import torch

from ec_hooks.compressors.base import Payload
from ec_hooks.compressors.sparse import Sparsifier
from ec_hooks.compressors.wire import (
    delta16_capacity,
    delta16_decode,
    delta16_encode,
    half_dtype,
    mask_out_of_range,
    pad,
    to_bytes,
    view_bytes,
    widen,
)
from ec_hooks.kernels import error_feedback_topk_, to_wire, topk_magnitude
from ec_hooks.validation import check_choice

__all__ = ["BACKENDS", "INDEX_ENCODINGS", "TopK"]

#: selection backends (see :func:`ec_hooks.kernels.topk_magnitude`)
BACKENDS = ("auto", "torch", "cpu", "cuda")
INDEX_ENCODINGS = ("int32", "delta16")


class TopK(Sparsifier):
    """Keep the ``k = ceil(density * d)`` entries of largest magnitude.

    Ties in magnitude go to the lower index, so every backend selects the same set.  Wire
    formats (``index_encoding``), padded to 4 bytes, values in ``value_dtype`` (default: the
    caller's wire dtype):

    * ``"int32"``: ``k`` int32 indices, then ``k`` values.  8 bytes per entry with fp32 values.
    * ``"delta16"``: ``S`` values, then ``S`` uint16 gaps between consecutive indices (the
      first from 0); decoding is a cumulative sum.  A gap above 65535 is bridged by filler
      slots (gap 65535, value 0) and unused tail slots are gap 0, value 0, so that the size
      depends on ``d`` only, as an allgather needs: ``S = k + floor((d - max(k, 2)) / 65535)``,
      the most fillers any ``k`` indices can need.  6 bytes per slot with fp32 values, 4 with
      ``value_dtype=torch.bfloat16`` (or ``float16``); the ``d / 65535`` filler slots add
      ``1 / (65535 * density)`` to that (0.15% at density 0.01).

    Fillers and tail slots repeat an index with the value 0, so every consumer accumulates
    (scatter-add) instead of assigning.  16-bit values are rounded (fp16 clamped to its finite
    range); :meth:`subtract_sent_` subtracts the rounded values, so the rounding error stays in
    the error-feedback memory.

    Args:
        density: fraction of entries kept, in (0, 1].
        backend: selection backend, ``"auto" | "torch" | "cpu" | "cuda"`` (see
            :func:`ec_hooks.kernels.topk_magnitude`).
        index_encoding: ``"int32"`` (default) or ``"delta16"``.
        value_dtype: ``None`` (default: the dtype the caller asks for, the gradient's in the
            hook), ``torch.float16`` or ``torch.bfloat16`` (also ``"float16"``, ``"fp16"``,
            ``"bfloat16"``, ``"bf16"``).
    """

    summable = False
    name = "topk"
    local_args = ("backend",)
    index_value_pairs = True
    consensus_steps = {
        **Sparsifier.consensus_steps,
        "deepsqueeze": (1.0, 0.005, 0.5),
        "choco": (2.0, 0.01, 1.0),
    }

    def __init__(
        self,
        density: float = 0.01,
        backend: str = "auto",
        index_encoding: str = "int32",
        value_dtype: torch.dtype | str | None = None,
    ):
        super().__init__(density)
        self.backend = check_choice("backend", backend, BACKENDS)
        self.index_encoding = check_choice("index_encoding", index_encoding, INDEX_ENCODINGS)
        self.value_dtype = half_dtype(value_dtype)

    def _repr_args(self):
        args = {"density": self.density, "backend": self.backend}
        # Defaults stay out, so that the reprs stored in existing checkpoints still match.
        if self.index_encoding != "int32":
            args["index_encoding"] = self.index_encoding
        if self.value_dtype is not None:
            args["value_dtype"] = self.value_dtype
        return args

    def slots_for(self, numel: int) -> int:
        """Index/value pairs a payload holds: ``k``, or the fixed ``delta16`` capacity."""
        k = self.k_for(numel)
        return k if self.index_encoding == "int32" else delta16_capacity(numel, k)

    def _pack(self, indices: torch.Tensor, values: torch.Tensor, numel: int) -> torch.Tensor:
        if self.index_encoding == "int32":
            return to_bytes(indices.to(torch.int32), values)
        gaps, slot_values = delta16_encode(indices, values, delta16_capacity(numel, indices.numel()))
        # Values first: at offset 0 of a 4-byte aligned row they view as fp32 without a copy.
        return to_bytes(slot_values, gaps)

    def compress(self, x, *, step=0, key=0, rank=0, wire_dtype=None):
        flat = x.reshape(-1)
        k = self.k_for(flat.numel())
        indices = topk_magnitude(flat, k, backend=self.backend)
        values = to_wire(flat[indices], self.value_dtype or wire_dtype or x.dtype)
        return Payload(
            data=self._pack(indices, values, flat.numel()), shape=x.shape, value_dtype=values.dtype
        )

    def compress_error_feedback_(
        self, memory: torch.Tensor, grad: torch.Tensor, *, step=0, key=0, rank=0, wire_dtype=None
    ) -> tuple[Payload, torch.Tensor]:
        """``memory += grad`` (finite entries only), then ``compress(memory)``, in one fused step.

        Returns the payload (the same bytes as :meth:`compress` of the accumulated memory) and a
        0-dim bool, "every gradient entry was finite".  ``memory`` (contiguous fp32) keeps the
        sent values: subtract them with :meth:`subtract_sent_` once the step stands, or undo the
        accumulation with :func:`ec_hooks.kernels.undo_accumulate_` when it is voided.  On CUDA
        tensors with the CUDA backend this is one kernel pipeline without host synchronization.
        """
        k = self.k_for(memory.numel())
        selected = error_feedback_topk_(
            memory,
            grad,
            k,
            wire_dtype=self.value_dtype or wire_dtype or memory.dtype,
            subtract_sent=False,
            backend=self.backend,
        )
        payload = Payload(
            data=self._pack(selected.indices, selected.values, memory.numel()),
            shape=memory.shape,
            value_dtype=selected.values.dtype,
        )
        return payload, selected.grad_finite

    def decode(self, payload: Payload) -> tuple[torch.Tensor, torch.Tensor]:
        """Indices (int64) and fp32 values of a payload; rejects indices outside the tensor.

        With ``delta16`` the indices repeat (fillers, tail) where the values are 0: sum, never
        assign, the values into a tensor.
        """
        slots = self.slots_for(payload.numel)
        dtype = payload.value_dtype or torch.float32
        size = torch.empty((), dtype=dtype).element_size()
        index_size = 4 if self.index_encoding == "int32" else 2
        expected = pad(slots * (index_size + size))
        if payload.nbytes != expected:
            raise ValueError(
                f"TopK payload has {payload.nbytes} bytes, expected {expected} "
                f"(index_encoding={self.index_encoding!r}, {slots} slots of {dtype} values)"
            )
        if self.index_encoding == "int32":
            indices = payload.data[: 4 * slots].view(torch.int32).long()
            values = view_bytes(payload.data[4 * slots : 4 * slots + size * slots], dtype)
        else:
            values = view_bytes(payload.data[: size * slots], dtype)
            indices = delta16_decode(payload.data[size * slots : (size + 2) * slots].view(torch.int16))
        values = widen(values)
        if not indices.numel():
            return indices, values
        if indices.device.type == "cpu":
            lo, hi = int(indices.min()), int(indices.max())
            if lo < 0 or hi >= payload.numel:
                raise ValueError(
                    f"TopK payload carries index {hi if hi >= payload.numel else lo} outside [0, {payload.numel}): "
                    "corrupted or mismatched payload (do all workers use the same model and compressor?)"
                )
            return indices, values
        # On a GPU a check would cost a host sync per bucket, and an out-of-range index in
        # index_put_ is a device-side assert that kills the context: such entries are redirected
        # to index 0 with the value NaN instead, so the decoded tensor is visibly non-finite (a
        # GradScaler skips the step) and nothing is written outside it.
        return mask_out_of_range(indices, values, payload.numel)

    def decompress(self, payload):
        indices, values = self.decode(payload)
        out = torch.zeros(payload.numel, dtype=values.dtype, device=payload.data.device)
        out.index_put_((indices,), values, accumulate=True)
        return out.view(payload.shape)

    def sum_payloads(self, payloads):
        decoded = [self.decode(p) for p in payloads]
        out = torch.zeros(payloads[0].numel, dtype=decoded[0][1].dtype, device=payloads[0].data.device)
        out.index_add_(0, torch.cat([i for i, _ in decoded]), torch.cat([v for _, v in decoded]))
        return out.view(payloads[0].shape)

    def sent_indices(self, payload):
        indices, values = self.decode(payload)
        # delta16 fillers and tail slots carry the value 0 at indices that were not selected
        return indices[values != 0] if self.index_encoding == "delta16" else indices

    def subtract_sent_(self, acc, payload, scale=None):
        indices, values = self.decode(payload)
        # Subtracting the rounded value (not zeroing) keeps the rounding error of bf16/fp16
        # values in memory, so nothing is lost.  A scatter-add, because delta16 repeats indices
        # (with value 0); ``a + (-1) v`` is ``a - v`` bit for bit, and adding -0 changes nothing.
        # (``values`` may alias the payload's bytes: never modify it in place.)
        acc.view(-1).index_add_(0, indices, values if scale is None else values * scale, alpha=-1)

    def wire_bytes(self, numel, dtype=torch.float32):
        size = torch.empty((), dtype=self.value_dtype or dtype).element_size()
        return pad(self.slots_for(numel) * ((4 if self.index_encoding == "int32" else 2) + size))
