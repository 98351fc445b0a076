"""Selection backends for the top-k of |x| (placeholder; the fast paths land with the selection work)."""

from ec_hooks.kernels.reference import topk_magnitude_reference

__all__ = ["topk_magnitude", "topk_magnitude_reference"]


def topk_magnitude(x, k, backend="auto"):
    return topk_magnitude_reference(x, k)
