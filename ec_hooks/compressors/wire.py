"""Wire codecs: how payloads are laid out in bytes.

Byte payloads are padded to :data:`ALIGN` bytes, so that every worker's slice of an allgather
output can be reinterpreted as int32/fp32 without a copy.  ``delta16`` stores top-k indices as
uint16 gaps (with filler slots for gaps above :data:`MAX_GAP`); :func:`pack_bits` packs sign and
QSGD codes.  Every function is a tensor operation without host synchronization unless it says so.
"""

from __future__ import annotations

import torch

__all__ = [
    "ALIGN",
    "HALF_DTYPES",
    "MAX_GAP",
    "as_int16_bits",
    "delta16_capacity",
    "delta16_decode",
    "delta16_encode",
    "half_dtype",
    "mask_out_of_range",
    "pack_bits",
    "pad",
    "to_bytes",
    "unpack_bits",
    "view_bytes",
    "widen",
]

#: byte payloads are padded to a multiple of this many bytes
ALIGN = 4
HALF_DTYPES = {
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}
#: largest gap between consecutive indices that one uint16 slot of the ``delta16`` format holds
MAX_GAP = 65535


def pad(nbytes: int) -> int:
    return -(-nbytes // ALIGN) * ALIGN


def to_bytes(*tensors: torch.Tensor) -> torch.Tensor:
    """Concatenate contiguous tensors into one padded uint8 buffer."""
    parts = [t.contiguous().reshape(-1).view(torch.uint8) for t in tensors]
    total = sum(p.numel() for p in parts)
    padding = pad(total) - total
    if padding:
        parts.append(torch.zeros(padding, dtype=torch.uint8, device=parts[0].device))
    return torch.cat(parts)


def view_bytes(data: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``data`` (uint8) viewed as ``dtype``; copied first when its offset is not a multiple of the
    element size (fp64 values behind an odd number of 4-byte words), as ``view`` requires."""
    if data.storage_offset() % torch.empty((), dtype=dtype).element_size():
        data = data.clone()
    return data.view(dtype)


def widen(values: torch.Tensor) -> torch.Tensor:
    """Values as the dense result's dtype: fp32, or fp64 for fp64 values (fp64 models keep
    their precision end to end)."""
    return values if values.dtype == torch.float64 else values.float()


def mask_out_of_range(
    indices: torch.Tensor, values: torch.Tensor, numel: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices outside ``[0, numel)`` become 0 and their values NaN; no host synchronization."""
    valid = (indices >= 0) & (indices < numel)
    return torch.where(valid, indices, 0), torch.where(valid, values, float("nan"))


def delta16_capacity(numel: int, k: int) -> int:
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
    return k + max(0, (numel - max(k, 2)) // MAX_GAP)


def delta16_encode(
    indices: torch.Tensor, values: torch.Tensor, capacity: int
) -> tuple[torch.Tensor, torch.Tensor]:
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
    if device.type == "cpu" and int(gaps.max()) <= MAX_GAP:
        # No filler (the usual case at densities above 1/65535): entry j in slot j.  A host
        # check is free on CPU, and skipping the slot arithmetic makes encoding 4x faster.
        values_out[:k] = values
        return as_int16_bits(torch.cat([gaps, gaps.new_zeros(capacity - k)])), values_out
    fillers = (gaps - 1).clamp_min_(0).div_(MAX_GAP, rounding_mode="floor")
    slots = torch.cumsum(fillers, 0).add_(torch.arange(k, device=device))
    # Every slot before the last entry's that holds no entry is a filler.
    gaps_out = torch.where(torch.arange(capacity, device=device) < slots[-1], MAX_GAP, 0).to(torch.int32)
    gaps_out[slots] = (gaps - fillers * MAX_GAP).to(torch.int32)
    values_out[slots] = values
    return as_int16_bits(gaps_out), values_out


def as_int16_bits(gaps: torch.Tensor) -> torch.Tensor:
    """Integers in ``[0, 65535]`` as int16 holding their uint16 bit pattern (an explicit wrap: a
    narrowing cast of values above 32767 is implementation-defined)."""
    return torch.where(gaps > 32767, gaps - 65536, gaps).to(torch.int16)


def delta16_decode(gaps: torch.Tensor) -> torch.Tensor:
    """Indices (int64, non-decreasing, with repeats at fillers and the tail) of int16-stored gaps."""
    return torch.cumsum(gaps.to(torch.int64) & 0xFFFF, 0)


def half_dtype(value_dtype) -> torch.dtype | None:
    if value_dtype is None:
        return None
    if isinstance(value_dtype, str) and value_dtype in HALF_DTYPES:
        return HALF_DTYPES[value_dtype]
    if isinstance(value_dtype, torch.dtype) and value_dtype in (torch.float16, torch.bfloat16):
        return value_dtype
    raise ValueError(
        f"value_dtype must be None (the caller's wire dtype), torch.float16, torch.bfloat16 or one of "
        f"{sorted(HALF_DTYPES)}, got {value_dtype!r}"
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
    bitmat = ((packed.unsqueeze(1) >> torch.arange(8, dtype=torch.uint8, device=packed.device)) & 1).reshape(
        -1
    )
    bitmat = bitmat[: n * bits].view(n, bits)
    weights = (1 << torch.arange(bits, device=packed.device)).to(torch.int32)
    return (bitmat.to(torch.int32) * weights).sum(dim=1).to(torch.uint8)
