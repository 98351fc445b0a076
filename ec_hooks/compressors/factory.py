"""Compressors by name, for configuration files and command lines."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ec_hooks.compressors.base import Compressor
from ec_hooks.compressors.dense import BF16, FP16, Identity
from ec_hooks.compressors.qsgd import QSGD
from ec_hooks.compressors.randk import RandK
from ec_hooks.compressors.sign import ScaledSign
from ec_hooks.compressors.topk import TopK

__all__ = ["COMPRESSOR_NAMES", "compressor_arguments", "make_compressor"]


def _cyclic_topk(**kwargs: Any) -> Compressor:
    from ec_hooks.cyclic import CyclicTopK  # it builds on this package

    return CyclicTopK(**kwargs)


# name -> (constructor, the arguments it takes)
_BY_NAME: dict[str, tuple[Callable[..., Compressor], tuple[str, ...]]] = {
    "topk": (TopK, ("density", "backend", "index_encoding", "value_dtype")),
    "randk": (RandK, ("density", "seed")),
    "sign": (ScaledSign, ()),
    "qsgd": (QSGD, ("levels", "seed")),
    "identity": (Identity, ()),
    "fp16": (FP16, ()),
    "bf16": (BF16, ()),
    "cyclic_topk": (
        _cyclic_topk,
        ("density", "value_dtype", "memory_filter", "backend", "selection", "candidates"),
    ),
}
COMPRESSOR_NAMES = tuple(_BY_NAME)
_ALLOWED = (
    "density",
    "backend",
    "index_encoding",
    "value_dtype",
    "seed",
    "levels",
    "memory_filter",
    "selection",
    "candidates",
)


def compressor_arguments(name: str) -> tuple[str, ...]:
    """The arguments the compressor called ``name`` takes (none for a name it does not know)."""
    return _BY_NAME.get(name.lower(), (None, ()))[1]


def make_compressor(compressor: str | Compressor = "topk", **kwargs: Any) -> Compressor:
    """Build a compressor from a name (``COMPRESSOR_NAMES``) and its arguments, or pass one through.

    ``density`` (and top-k's ``index_encoding`` and ``value_dtype``) is ignored by compressors
    that do not take it, so one config can switch freely between ``topk`` and ``sign``.
    """
    if isinstance(compressor, Compressor):
        return compressor
    if not isinstance(compressor, str) or compressor.lower() not in COMPRESSOR_NAMES:
        raise ValueError(
            f"compressor must be a Compressor or one of {list(COMPRESSOR_NAMES)}, got {compressor!r}"
        )
    unknown = sorted(set(kwargs) - set(_ALLOWED))
    if unknown:
        raise ValueError(f"make_compressor got unknown arguments {unknown}; allowed: {', '.join(_ALLOWED)}")
    build, takes = _BY_NAME[compressor.lower()]
    return build(**{k: v for k, v in kwargs.items() if k in takes})
