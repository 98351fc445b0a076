"""Top-k by magnitude in torch ops: a sampled threshold refined to the exact k.

``torch.topk`` on CPU sorts its way through the whole input (about 0.2 GB/s on one core).  Here
the whole input is touched by one streaming pass that only compares, and the exact selection
runs on the few entries that pass:

1. Draw a fixed pseudo-random sample of ``|x|`` (64K entries) and take as threshold ``t`` a
   sample quantile a few standard deviations above the k-th largest, so that with high
   probability at least ``k`` entries satisfy ``|x| >= t``, and not many more (about ``1.15 k``
   at k = 1%).
2. One pass over ``x`` in cache-sized chunks: ``|x| >= t`` into a reused byte mask, whose
   non-zero 8-byte words are expanded into indices (most words are zero, so this costs about a
   tenth of ``torch.nonzero`` on the mask).  The candidates come out in ascending index order.
3. If fewer than ``k`` entries passed (an unlucky sample, or fewer than ``k`` numbers at all),
   lower the threshold and repeat; after three tries, fall back to the reference.
4. On the candidates only: the k-th largest magnitude ``T`` (``torch.kthvalue``); take every
   candidate above ``T`` and, of those equal to ``T``, the ones of lowest index.

The result is exactly :func:`~ec_hooks.kernels.reference.topk_magnitude_reference`'s: same
order (magnitude, then lower index; NaN below every number), indices ascending.  The sample only
decides how fast, never what is returned.
"""

from __future__ import annotations

import math

import torch

from ec_hooks.kernels.reference import topk_magnitude_reference

__all__ = ["topk_magnitude_threshold"]

_SAMPLE = 1 << 16
_CHUNK = 1 << 20  # entries per chunk of the streaming pass (4 MB of fp32 scratch)
_SMALL = 1 << 15  # below this the reference is as fast
_SEED = 0x5EED
# Abs-value bit masks and NaN boundaries of the 16-bit floats, compared as int16.
_BITS16 = {torch.float16: (0x7FFF, 0x7C00), torch.bfloat16: (0x7FFF, 0x7F80)}


def topk_magnitude_threshold(x: torch.Tensor, k: int) -> torch.Tensor:
    """Indices (int64, ascending) of the ``k`` entries of largest ``|x|``; ties to the lower index.

    Same contract as :func:`~ec_hooks.kernels.reference.topk_magnitude_reference`; ``k`` must be
    in ``[1, x.numel()]``.
    """
    flat = x.reshape(-1)
    n = flat.numel()
    if k >= n:
        return torch.arange(n, device=flat.device)
    if n <= _SMALL or not flat.is_floating_point():
        return topk_magnitude_reference(flat, k)
    flat = flat.contiguous()
    sample = _sample_magnitudes(flat)
    s = sample.numel()
    # Rank in the sample of the threshold: the expected rank of the k-th largest plus four
    # standard deviations of a binomial count, plus a constant for tiny k.
    expected = k * s / n
    rank = math.ceil(expected + 4.0 * math.sqrt(expected) + 8)
    for _ in range(3):
        if rank > s:
            break
        threshold = torch.topk(sample, rank, sorted=False).values.min()
        candidates = _indices_at_least(flat, threshold)
        if candidates.numel() >= k:
            return _select_exact(flat, candidates, k, float(threshold))
        rank *= 4
    return topk_magnitude_reference(flat, k)


def _sample_magnitudes(flat: torch.Tensor) -> torch.Tensor:
    """``|x|`` at a fixed pseudo-random sample of positions, NaN dropped, in the input dtype."""
    n = flat.numel()
    generator = torch.Generator(device="cpu").manual_seed(_SEED)
    positions = torch.randint(n, (min(n, _SAMPLE),), generator=generator).to(flat.device)
    sample = flat[positions].abs()
    return sample[~torch.isnan(sample)]


def _indices_at_least(flat: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """Ascending indices of the entries with ``|x| >= threshold`` (NaN never passes)."""
    n = flat.numel()
    chunk = min(n, _CHUNK)
    mask = torch.empty(chunk, dtype=torch.bool, device=flat.device)
    bits16 = _BITS16.get(flat.dtype)
    if bits16 is None:
        scratch = torch.empty(chunk, dtype=flat.dtype, device=flat.device)
        limit = threshold.item()
    else:
        # 16-bit floats compare much faster as int16 bit patterns (ordered for |x|); NaN
        # patterns lie above inf and are dropped afterwards.
        scratch = torch.empty(chunk, dtype=torch.int16, device=flat.device)
        limit = int(threshold.reshape(1).view(torch.int16))
        words = flat.view(torch.int16)
    parts = []
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        size = stop - start
        out, hit = scratch[:size], mask[:size]
        if bits16 is None:
            torch.abs(flat[start:stop], out=out)
        else:
            torch.bitwise_and(words[start:stop], bits16[0], out=out)
        torch.ge(out, limit, out=hit)
        parts.append(_nonzero_sparse(hit) + start)
    indices = torch.cat(parts)
    if bits16 is not None and indices.numel():
        nan_bits = (flat[indices].view(torch.int16) & bits16[0]) > bits16[1]
        indices = indices[~nan_bits]
    return indices


def _nonzero_sparse(mask: torch.Tensor) -> torch.Tensor:
    """``mask.nonzero()`` for a sparse 1-D bool mask: only its non-zero 8-byte words are expanded."""
    size = mask.numel()
    body = size - size % 8
    words = mask[:body].view(torch.int64)
    word_index = words.nonzero().reshape(-1)
    positions = words[word_index].view(torch.bool).nonzero().reshape(-1)
    indices = (word_index[positions >> 3] << 3) + (positions & 7)
    if body < size:
        indices = torch.cat([indices, mask[body:].nonzero().reshape(-1) + body])
    return indices


def _select_exact(flat: torch.Tensor, candidates: torch.Tensor, k: int, threshold: float) -> torch.Tensor:
    """The exact top-k among ascending candidate indices, at least ``k`` of them, all ``>= threshold``."""
    values = flat[candidates].abs().float()
    above = values > threshold
    count_above = int(above.sum())
    if count_above < k:
        # The k-th largest is the threshold itself (typical of inputs with many exact zeros).
        tied = ~above
    else:
        kth = torch.kthvalue(values, values.numel() - k + 1).values
        above = values > kth
        tied = values == kth
        count_above = int(above.sum())
    need = k - count_above
    if int(tied.sum()) > need:
        # Of the tied entries, the ones of lowest index (candidates are ascending).
        tied = tied & (tied.cumsum(0) <= need)
    return candidates[above | tied]
