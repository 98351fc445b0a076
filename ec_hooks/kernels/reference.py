"""The torch reference selection: the exact set every backend must return."""

import torch

__all__ = ["topk_magnitude_reference"]


def topk_magnitude_reference(x: torch.Tensor, k: int) -> torch.Tensor:
    """Indices (int64, ascending) of the ``k`` entries of largest ``|x|``; ties go to the lower index.

    NaN ranks below every number (zero included): it is selected only when ``k`` exceeds the
    number of non-NaN entries, so a corrupted entry stays in memory.  ``inf`` ranks above every
    finite value.  ``k`` must be in ``[1, x.numel()]``.
    """
    flat = x.reshape(-1)
    magnitude = flat.abs().float()
    magnitude = torch.where(torch.isnan(magnitude), -1.0, magnitude)
    threshold = torch.topk(magnitude, k, sorted=False).values.min()
    above = torch.nonzero(magnitude > threshold).reshape(-1)
    tied = torch.nonzero(magnitude == threshold).reshape(-1)[: k - above.numel()]
    return torch.cat([above, tied]).sort().values
