"""Compressors: the ``C`` in error-compensated SGD.

Every compressor maps a tensor ``x`` to a :class:`Payload` (what goes on the wire) and back to a
dense fp32 tensor shaped like ``x``.  The same objects serve the DDP hook (Mem-SGD) and the
gossip algorithms (DeepSqueeze, CHOCO-SGD), so a compressor knows nothing about communication;
it only says

* how many bytes its payload puts on the wire (:meth:`Compressor.wire_bytes`, exact, padding
  included), and
* whether payloads of different workers can be summed element-wise (:attr:`Compressor.summable`).
  Summable payloads are averaged with one allreduce; the others are packed into one ``uint8``
  buffer per worker and allgathered (or exchanged with neighbours).

Contract (Definition 2.1 of Stich et al., 2018) for the sparsifiers:
``E||x - C(x)||^2 <= (1 - k/d) ||x||^2``.  ``TopK`` and ``RandK`` satisfy it, ``ScaledSign``
satisfies it with ``delta = ||x||_1^2 / (d ||x||^2)``; ``QSGD`` is unbiased instead.
"""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass

import torch

from ec_hooks.kernels import error_feedback_topk_, to_wire, topk_magnitude
from ec_hooks.validation import check_choice, check_density, check_int

__all__ = [
    "Payload",
    "Compressor",
    "TopK",
    "RandK",
    "ScaledSign",
    "QSGD",
    "Identity",
    "Cast",
    "FP16",
    "BF16",
    "make_compressor",
    "COMPRESSOR_NAMES",
]

logger = logging.getLogger(__name__)

# Byte payloads are padded to this many bytes so that every worker's slice of an allgather
# output can be reinterpreted as int32/fp32 without a copy.
_ALIGN = 4
_BACKENDS = ("auto", "torch", "cpu", "cuda")
_HALF_DTYPES = {"float16": torch.float16, "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
_INDEX_ENCODINGS = ("int32", "delta16")
#: largest gap between consecutive indices that one uint16 slot of the ``delta16`` format holds
_MAX_GAP = 65535


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


def _pad(nbytes: int) -> int:
    return -(-nbytes // _ALIGN) * _ALIGN


def _to_bytes(*tensors: torch.Tensor) -> torch.Tensor:
    """Concatenate contiguous tensors into one padded uint8 buffer."""
    parts = [t.contiguous().reshape(-1).view(torch.uint8) for t in tensors]
    total = sum(p.numel() for p in parts)
    pad = _pad(total) - total
    if pad:
        parts.append(torch.zeros(pad, dtype=torch.uint8, device=parts[0].device))
    return torch.cat(parts)


def _view_bytes(data: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``data`` (uint8) viewed as ``dtype``; copied first when its offset is not a multiple of the
    element size (fp64 values behind an odd number of 4-byte words), as ``view`` requires."""
    if data.storage_offset() % torch.empty((), dtype=dtype).element_size():
        data = data.clone()
    return data.view(dtype)


def _widen(values: torch.Tensor) -> torch.Tensor:
    """Values as the dense result's dtype: fp32, or fp64 for fp64 values (fp64 models keep
    their precision end to end)."""
    return values if values.dtype == torch.float64 else values.float()


def _seed_from(*values: int) -> int:
    """A 63-bit seed that mixes its inputs well (adjacent steps give unrelated streams)."""
    digest = hashlib.blake2b(repr(values).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def _mask_out_of_range(indices: torch.Tensor, values: torch.Tensor, numel: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices outside ``[0, numel)`` become 0 and their values NaN; no host synchronization."""
    valid = (indices >= 0) & (indices < numel)
    return torch.where(valid, indices, 0), torch.where(valid, values, float("nan"))


def _delta16_capacity(numel: int, k: int) -> int:
    """Slots of a ``delta16`` payload: ``k`` entries plus the most fillers any ``k`` indices need.

    An index set needs ``sum_j floor((g_j - 1) / 65535)`` fillers over its nonzero gaps ``g_j``
    (the first gap is counted from 0), and ``sum_j floor(a_j) <= floor(sum_j a_j)``.  With
    ``k >= 2`` the maximum puts index 0 first (its gap 0 costs nothing) and the other gaps, at
    least 1 each, sum to at most ``numel - 1``: ``floor((numel - k) / 65535)``, reached by
    ``{0, 1, ..., k - 2, numel - 1}``.  With ``k = 1`` the single gap is at most ``numel - 1``:
    ``floor((numel - 2) / 65535)``.
    """
    if k == 0:
        return 0
    return k + max(0, (numel - max(k, 2)) // _MAX_GAP)


def _delta16_encode(indices: torch.Tensor, values: torch.Tensor, capacity: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``capacity`` uint16 gaps (stored as int16 bit patterns) and values for ascending ``indices``.

    1. ``g_j = i_j - i_{j-1}`` with ``i_{-1} = 0``.
    2. A gap above 65535 is preceded by ``f_j = floor((g_j - 1) / 65535)`` filler slots of gap
       65535 and value 0; the entry keeps the remainder ``g_j - 65535 f_j`` (in ``[1, 65535]``).
    3. Entry ``j`` lands in slot ``j + sum_{l <= j} f_l``; slots past the last entry are gap 0,
       value 0.  Every step is a tensor op: no host synchronization.
    """
    device = indices.device
    idx = indices.long()
    k = idx.numel()
    values_out = torch.zeros(capacity, dtype=values.dtype, device=device)
    if k == 0:
        return torch.zeros(capacity, dtype=torch.int16, device=device), values_out
    gaps = torch.diff(idx, prepend=idx.new_zeros(1))
    if device.type == "cpu" and int(gaps.max()) <= _MAX_GAP:
        # No filler (the usual case at densities above 1/65535): entry j in slot j.  A host
        # check is free on CPU, and skipping the slot arithmetic makes encoding 4x faster.
        values_out[:k] = values
        return _as_int16_bits(torch.cat([gaps, gaps.new_zeros(capacity - k)])), values_out
    fillers = (gaps - 1).clamp_min_(0).div_(_MAX_GAP, rounding_mode="floor")
    slots = torch.cumsum(fillers, 0).add_(torch.arange(k, device=device))
    # Every slot before the last entry's that holds no entry is a filler.
    gaps_out = torch.where(torch.arange(capacity, device=device) < slots[-1], _MAX_GAP, 0).to(torch.int32)
    gaps_out[slots] = (gaps - fillers * _MAX_GAP).to(torch.int32)
    values_out[slots] = values
    return _as_int16_bits(gaps_out), values_out


def _as_int16_bits(gaps: torch.Tensor) -> torch.Tensor:
    """Integers in ``[0, 65535]`` as int16 holding their uint16 bit pattern (an explicit wrap: a
    narrowing cast of values above 32767 is implementation-defined)."""
    return torch.where(gaps > 32767, gaps - 65536, gaps).to(torch.int16)


def _delta16_decode(gaps: torch.Tensor) -> torch.Tensor:
    """Indices (int64, non-decreasing, with repeats at fillers and the tail) of int16-stored gaps."""
    return torch.cumsum(gaps.to(torch.int64) & 0xFFFF, 0)


def _value_dtype(value_dtype) -> torch.dtype | None:
    if value_dtype is None:
        return None
    if isinstance(value_dtype, str) and value_dtype in _HALF_DTYPES:
        return _HALF_DTYPES[value_dtype]
    if isinstance(value_dtype, torch.dtype) and value_dtype in (torch.float16, torch.bfloat16):
        return value_dtype
    raise ValueError(
        f"value_dtype must be None (the caller's wire dtype), torch.float16, torch.bfloat16 or one of "
        f"{sorted(_HALF_DTYPES)}, got {value_dtype!r}"
    )


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes in ``[0, 2**bits)`` into ``ceil(n * bits / 8)`` bytes, little-endian."""
    codes = codes.reshape(-1).to(torch.uint8)
    n = codes.numel()
    if 8 % bits == 0:
        per_byte = 8 // bits
        padded = torch.zeros(-(-n // per_byte) * per_byte, dtype=torch.uint8, device=codes.device)
        padded[:n] = codes
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=codes.device)
        return (padded.view(-1, per_byte) << shifts).sum(dim=1, dtype=torch.uint8)
    # Widths that do not divide a byte go through an explicit bit matrix.
    shifts = torch.arange(bits, dtype=torch.uint8, device=codes.device)
    bitmat = ((codes.unsqueeze(1) >> shifts) & 1).reshape(-1)
    padded = torch.zeros(-(-bitmat.numel() // 8) * 8, dtype=torch.uint8, device=codes.device)
    padded[: bitmat.numel()] = bitmat
    return (padded.view(-1, 8) << torch.arange(8, dtype=torch.uint8, device=codes.device)).sum(
        dim=1, dtype=torch.uint8
    )


def unpack_bits(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: the first ``n`` codes as uint8."""
    packed = packed.reshape(-1)
    mask = (1 << bits) - 1
    if 8 % bits == 0:
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
        return ((packed.unsqueeze(1) >> shifts) & mask).reshape(-1)[:n]
    bitmat = ((packed.unsqueeze(1) >> torch.arange(8, dtype=torch.uint8, device=packed.device)) & 1).reshape(-1)
    bitmat = bitmat[: n * bits].view(n, bits)
    weights = (1 << torch.arange(bits, device=packed.device)).to(torch.int32)
    return (bitmat.to(torch.int32) * weights).sum(dim=1).to(torch.uint8)


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


class TopK(Compressor):
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

    def __init__(
        self,
        density: float = 0.01,
        backend: str = "auto",
        index_encoding: str = "int32",
        value_dtype: torch.dtype | str | None = None,
    ):
        self.density = check_density(density)
        self.backend = check_choice("backend", backend, _BACKENDS)
        self.index_encoding = check_choice("index_encoding", index_encoding, _INDEX_ENCODINGS)
        self.value_dtype = _value_dtype(value_dtype)

    def _repr_args(self):
        args = {"density": self.density, "backend": self.backend}
        # Defaults stay out, so that the reprs stored in existing checkpoints still match.
        if self.index_encoding != "int32":
            args["index_encoding"] = self.index_encoding
        if self.value_dtype is not None:
            args["value_dtype"] = self.value_dtype
        return args

    def k_for(self, numel: int) -> int:
        # The small epsilon keeps density=k/d from rounding up to k+1.
        return min(numel, max(1, math.ceil(self.density * numel - 1e-9)))

    def entries_sent(self, numel: int) -> int:
        """``k``: fillers and tail slots of ``delta16`` carry no entry of the tensor."""
        return self.k_for(numel)

    def slots_for(self, numel: int) -> int:
        """Index/value pairs a payload holds: ``k``, or the fixed ``delta16`` capacity."""
        k = self.k_for(numel)
        return k if self.index_encoding == "int32" else _delta16_capacity(numel, k)

    def _pack(self, indices: torch.Tensor, values: torch.Tensor, numel: int) -> torch.Tensor:
        if self.index_encoding == "int32":
            return _to_bytes(indices.to(torch.int32), values)
        gaps, slot_values = _delta16_encode(indices, values, _delta16_capacity(numel, indices.numel()))
        # Values first: at offset 0 of a 4-byte aligned row they view as fp32 without a copy.
        return _to_bytes(slot_values, gaps)

    def compress(self, x, *, step=0, key=0, rank=0, wire_dtype=None):
        flat = x.reshape(-1)
        k = self.k_for(flat.numel())
        indices = topk_magnitude(flat, k, backend=self.backend)
        values = to_wire(flat[indices], self.value_dtype or wire_dtype or x.dtype)
        return Payload(data=self._pack(indices, values, flat.numel()), shape=x.shape, value_dtype=values.dtype)

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
        selected = error_feedback_topk_(memory, grad, k, wire_dtype=self.value_dtype or wire_dtype or memory.dtype,
                                        subtract_sent=False, backend=self.backend)
        payload = Payload(data=self._pack(selected.indices, selected.values, memory.numel()), shape=memory.shape,
                          value_dtype=selected.values.dtype)
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
        expected = _pad(slots * (index_size + size))
        if payload.nbytes != expected:
            raise ValueError(f"TopK payload has {payload.nbytes} bytes, expected {expected} "
                             f"(index_encoding={self.index_encoding!r}, {slots} slots of {dtype} values)")
        if self.index_encoding == "int32":
            indices = payload.data[: 4 * slots].view(torch.int32).long()
            values = _view_bytes(payload.data[4 * slots : 4 * slots + size * slots], dtype)
        else:
            values = _view_bytes(payload.data[: size * slots], dtype)
            indices = _delta16_decode(payload.data[size * slots : (size + 2) * slots].view(torch.int16))
        values = _widen(values)
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
        return _mask_out_of_range(indices, values, payload.numel)

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
        return _pad(self.slots_for(numel) * ((4 if self.index_encoding == "int32" else 2) + size))


class RandK(Compressor):
    """Keep ``k = ceil(density * d)`` entries chosen uniformly at random, without replacement.

    All workers draw the same indices from a dedicated ``torch.Generator`` seeded by
    ``(seed, step, key)``, so only the ``k`` values travel and they can be summed (one allreduce
    of ``k`` values).  The global RNG is never touched.

    Args:
        density: fraction of entries kept, in (0, 1].
        seed: base seed shared by all workers.
    """

    summable = True
    name = "randk"

    def __init__(self, density: float = 0.01, seed: int = 0):
        self.density = check_density(density)
        self.seed = check_int("seed", seed, 0)

    def _repr_args(self):
        return {"density": self.density, "seed": self.seed}

    k_for = TopK.k_for
    entries_sent = TopK.entries_sent

    def indices(self, numel: int, *, step: int, key: int, device) -> torch.Tensor:
        generator = torch.Generator(device="cpu")
        generator.manual_seed(_seed_from(self.seed, step, key))
        k = self.k_for(numel)
        if k == numel:
            return torch.arange(numel, device=device)
        if 4 * k > numel:
            return torch.randperm(numel, generator=generator)[:k].sort().values.to(device)
        # randperm(d) costs O(d) per step; for small k draw with replacement and deduplicate.
        # The distinct draws form a uniformly random subset given their number, and a random
        # k-subset of it is a uniformly random k-subset of range(d).
        draws = k + k // 8 + 16
        while True:
            distinct = torch.randint(numel, (draws,), generator=generator).unique()
            if distinct.numel() >= k:
                break
            draws *= 2
        pick = torch.randperm(distinct.numel(), generator=generator)[:k]
        return distinct[pick].sort().values.to(device)

    def compress(self, x, *, step=0, key=0, rank=0, wire_dtype=None):
        flat = x.reshape(-1)
        idx = self.indices(flat.numel(), step=step, key=key, device=x.device)
        return Payload(data=to_wire(flat[idx], wire_dtype or x.dtype), shape=x.shape, indices=idx)

    def decompress(self, payload):
        values = _widen(payload.data)
        out = torch.zeros(payload.numel, dtype=values.dtype, device=payload.data.device)
        out[payload.indices] = values
        return out.view(payload.shape)

    def sent_indices(self, payload):
        return payload.indices

    def subtract_sent_(self, acc, payload, scale=None):
        values = _widen(payload.data)
        flat = acc.view(-1)
        flat[payload.indices] -= values if scale is None else values * scale

    def wire_bytes(self, numel, dtype=torch.float32):
        return self.k_for(numel) * torch.empty((), dtype=dtype).element_size()


class ScaledSign(Compressor):
    """``C(x) = (||x||_1 / d) * sign(x)``: one bit per entry plus one fp32 scale.

    The signs are bit-packed (32x smaller than fp32).  Zero maps to ``+``.  Payloads of different
    workers carry different scales, so they are allgathered, not summed.
    """

    summable = False
    name = "sign"

    def compress(self, x, *, step=0, key=0, rank=0, wire_dtype=None):
        flat = x.reshape(-1).float()
        scale = flat.abs().mean().reshape(1)
        bits = pack_bits((flat < 0).to(torch.uint8), 1)
        return Payload(data=_to_bytes(scale, bits), shape=x.shape)

    def decompress(self, payload):
        n = payload.numel
        scale = payload.data[:4].view(torch.float32)
        # One gather of 8 scaled signs per byte, from a 256-row table scaled once.
        table = _sign_table(payload.data.device) * scale
        return table[payload.data[4 : 4 + -(-n // 8)].long()].reshape(-1)[:n].view(payload.shape)

    def wire_bytes(self, numel, dtype=torch.float32):
        return _pad(4 + -(-numel // 8))


_SIGN_TABLES: dict[torch.device, torch.Tensor] = {}


def _sign_table(device: torch.device) -> torch.Tensor:
    """``(256, 8)`` fp32: row ``b`` holds the signs (+1 for a 0 bit, -1 for a 1 bit) of byte ``b``,
    least significant bit first, as :func:`pack_bits` packs them."""
    table = _SIGN_TABLES.get(device)
    if table is None:
        bits = (torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1
        table = _SIGN_TABLES[device] = (1.0 - 2.0 * bits.float()).to(device)
    return table


class QSGD(Compressor):
    """Stochastic quantisation to ``levels`` levels per sign (Alistarh et al., 2017).

    1. ``norm = ||x||_2``;  ``r = levels * |x| / norm``.
    2. ``l = floor(r) + Bernoulli(r - floor(r))`` (unbiased), from a generator seeded by
       ``(seed, rank, step, key)``: independent across workers, reproducible, global RNG untouched.
    3. Wire: the fp32 norm, then ``1 + ceil(log2(levels + 1))`` bits per entry (sign and level).

    ``QSGD.from_bits(b)`` gives the ``b``-bit variant (``levels = 2**(b-1) - 1``).
    """

    summable = False
    name = "qsgd"

    def __init__(self, levels: int = 7, seed: int = 0):
        self.levels = check_int("levels", levels, 1, 2**15 - 1)
        self.seed = check_int("seed", seed, 0)
        self.level_bits = max(1, math.ceil(math.log2(self.levels + 1)))
        self.bits = 1 + self.level_bits

    @classmethod
    def from_bits(cls, bits: int, seed: int = 0) -> QSGD:
        bits = check_int("bits", bits, 2, 16)
        return cls(levels=2 ** (bits - 1) - 1, seed=seed)

    def _repr_args(self):
        return {"levels": self.levels, "seed": self.seed}

    def compress(self, x, *, step=0, key=0, rank=0, wire_dtype=None):
        flat = x.reshape(-1).float()
        norm = flat.norm().reshape(1)
        generator = torch.Generator(device="cpu")
        generator.manual_seed(_seed_from(self.seed, rank, step, key))
        noise = torch.rand(flat.numel(), generator=generator).to(flat.device)
        scaled = flat.abs() / norm.clamp_min(torch.finfo(torch.float32).tiny) * self.levels
        level = torch.floor(scaled + noise).clamp_(0, self.levels).to(torch.int32)
        codes = level | ((flat < 0).to(torch.int32) << self.level_bits)
        if self.bits <= 8:
            packed = pack_bits(codes.to(torch.uint8), self.bits)
        else:
            packed = codes.to(torch.int16)
        return Payload(data=_to_bytes(norm, packed), shape=x.shape)

    def decompress(self, payload):
        n = payload.numel
        norm = payload.data[:4].view(torch.float32)
        if self.bits <= 8:
            codes = unpack_bits(payload.data[4:], self.bits, n).to(torch.int32)
        else:
            codes = payload.data[4 : 4 + 2 * n].view(torch.int16).to(torch.int32)
        level = (codes & ((1 << self.level_bits) - 1)).float()
        sign = 1.0 - 2.0 * ((codes >> self.level_bits) & 1).float()
        return (norm * sign * level / self.levels).view(payload.shape)

    def wire_bytes(self, numel, dtype=torch.float32):
        body = -(-numel * self.bits // 8) if self.bits <= 8 else 2 * numel
        return _pad(4 + body)


class Identity(Compressor):
    """No compression: the payload is the tensor itself, summed by allreduce.

    With it (or ``TopK(density=1)``) the error-feedback hook reproduces DDP's default allreduce.
    """

    summable = True
    name = "identity"

    def compress(self, x, *, step=0, key=0, rank=0, wire_dtype=None):
        return Payload(data=to_wire(x.reshape(-1), wire_dtype or x.dtype), shape=x.shape)

    def decompress(self, payload):
        return _widen(payload.data).view(payload.shape)

    def wire_bytes(self, numel, dtype=torch.float32):
        return numel * torch.empty((), dtype=dtype).element_size()


class Cast(Compressor):
    """Cast to a 16-bit float dtype (``torch.float16`` or ``torch.bfloat16``); summed by allreduce.

    With error feedback the rounding error is kept in memory instead of being lost.
    """

    summable = True
    _DTYPES = _HALF_DTYPES

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


COMPRESSOR_NAMES = ("topk", "randk", "sign", "qsgd", "identity", "fp16", "bf16", "cyclic_topk")


def make_compressor(compressor: str | Compressor = "topk", **kwargs) -> Compressor:
    """Build a compressor from a name (``COMPRESSOR_NAMES``) and its arguments, or pass one through.

    ``density`` (and top-k's ``index_encoding`` and ``value_dtype``) is ignored by compressors
    that do not take it, so one config can switch freely between ``topk`` and ``sign``.
    """
    if isinstance(compressor, Compressor):
        return compressor
    if not isinstance(compressor, str) or compressor.lower() not in COMPRESSOR_NAMES:
        raise ValueError(f"compressor must be a Compressor or one of {list(COMPRESSOR_NAMES)}, got {compressor!r}")
    name = compressor.lower()
    allowed = ("density", "backend", "index_encoding", "value_dtype", "seed", "levels", "memory_filter")
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise ValueError(f"make_compressor got unknown arguments {unknown}; allowed: {', '.join(allowed)}")
    if name == "topk":
        return TopK(**{k: v for k, v in kwargs.items() if k in ("density", "backend", "index_encoding", "value_dtype")})
    if name == "cyclic_topk":
        from ec_hooks.cyclic import CyclicTopK  # it builds on this module

        return CyclicTopK(**{k: v for k, v in kwargs.items() if k in ("density", "value_dtype", "memory_filter",
                                                                      "backend")})
    if name == "randk":
        return RandK(**{k: v for k, v in kwargs.items() if k in ("density", "seed")})
    if name == "sign":
        return ScaledSign()
    if name == "qsgd":
        return QSGD(**{k: v for k, v in kwargs.items() if k in ("levels", "seed")})
    if name == "identity":
        return Identity()
    return Cast(torch.float16 if name == "fp16" else torch.bfloat16)
