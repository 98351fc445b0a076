"""ec-hooks: error-compensated communication for PyTorch distributed training.

* Mem-SGD as a DDP communication hook::

      state = ec_hooks.ErrorFeedbackState(compressor=ec_hooks.TopK(density=0.01))
      ddp_model.register_comm_hook(state, ec_hooks.error_feedback_hook)

* DeepSqueeze / CHOCO-SGD / D-PSGD gossip that replaces the allreduce::

      gossip = ec_hooks.DeepSqueeze(model.parameters(), topology="ring", compressor=ec_hooks.TopK(0.01))
      loss.backward(); optimizer.step(); gossip.step()

This package imports torch only (CuPy lazily, for the CUDA selection kernels).
"""

from ec_hooks.compressors import (
    BF16,
    COMPRESSOR_NAMES,
    FP16,
    QSGD,
    Cast,
    Compressor,
    Identity,
    Payload,
    RandK,
    ScaledSign,
    TopK,
    make_compressor,
)
from ec_hooks.hooks import ErrorFeedbackState, error_feedback_hook, local_hook
from ec_hooks.memory import ErrorFeedbackMemory
from ec_hooks.stats import CommStats

__version__ = "0.1.0"

__all__ = [
    "BF16",
    "COMPRESSOR_NAMES",
    "FP16",
    "QSGD",
    "Cast",
    "CommStats",
    "Compressor",
    "ErrorFeedbackMemory",
    "ErrorFeedbackState",
    "Identity",
    "Payload",
    "RandK",
    "ScaledSign",
    "TopK",
    "error_feedback_hook",
    "local_hook",
    "make_compressor",
]

try:  # the decentralized algorithms live in their own modules
    from ec_hooks.gossip import DPSGD, ChocoSGD, DeepSqueeze  # noqa: F401
    from ec_hooks.topology import Topology  # noqa: F401

    __all__ += ["ChocoSGD", "DPSGD", "DeepSqueeze", "Topology"]
except ImportError as _exc:  # pragma: no cover - removed once gossip lands
    if "ec_hooks.gossip" not in str(_exc) and "ec_hooks.topology" not in str(_exc):
        raise
