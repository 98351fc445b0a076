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

One module per compressor (:mod:`~ec_hooks.compressors.topk`, ``randk``, ``sign``, ``qsgd``,
``dense``), the interface in :mod:`~ec_hooks.compressors.base`, the byte layouts in
:mod:`~ec_hooks.compressors.wire`, and :func:`make_compressor` in
:mod:`~ec_hooks.compressors.factory`.
"""

from ec_hooks.compressors.base import Compressor, Payload, seed_from
from ec_hooks.compressors.dense import BF16, FP16, Cast, Identity
from ec_hooks.compressors.factory import COMPRESSOR_NAMES, compressor_arguments, make_compressor
from ec_hooks.compressors.qsgd import QSGD
from ec_hooks.compressors.randk import RandK
from ec_hooks.compressors.sign import ScaledSign
from ec_hooks.compressors.sparse import Sparsifier
from ec_hooks.compressors.topk import TopK
from ec_hooks.compressors.wire import mask_out_of_range, pack_bits, to_bytes, unpack_bits

__all__ = [
    "Payload",
    "Compressor",
    "TopK",
    "RandK",
    "Sparsifier",
    "ScaledSign",
    "QSGD",
    "Identity",
    "Cast",
    "FP16",
    "BF16",
    "make_compressor",
    "compressor_arguments",
    "COMPRESSOR_NAMES",
    "pack_bits",
    "unpack_bits",
]

# Names this module had before it became a package, for code that imported them from here.
_seed_from, _mask_out_of_range, _to_bytes = seed_from, mask_out_of_range, to_bytes
