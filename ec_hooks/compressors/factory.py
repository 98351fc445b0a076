"""Compressors by name, for configuration files and command lines."""

from __future__ import annotations

import torch

from ec_hooks.compressors.base import Compressor
from ec_hooks.compressors.dense import Cast, Identity
from ec_hooks.compressors.qsgd import QSGD
from ec_hooks.compressors.randk import RandK
from ec_hooks.compressors.sign import ScaledSign
from ec_hooks.compressors.topk import TopK

__all__ = ["COMPRESSOR_NAMES", "make_compressor"]


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
