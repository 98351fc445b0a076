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
from ec_hooks.cyclic import CyclicTopK
from ec_hooks.gossip import DPSGD, ChocoSGD, DeepSqueeze, GossipAlgorithm
from ec_hooks.hooks import ErrorFeedbackState, error_feedback_hook, local_hook
from ec_hooks.memory import ErrorFeedbackMemory
from ec_hooks.stats import CommStats
from ec_hooks.topology import TOPOLOGY_NAMES, Topology

__version__ = "0.1.0"  # the one place: pyproject.toml reads it (dynamic version)

__all__ = [
    "BF16",
    "COMPRESSOR_NAMES",
    "DPSGD",
    "FP16",
    "QSGD",
    "Cast",
    "ChocoSGD",
    "CommStats",
    "Compressor",
    "CyclicTopK",
    "DeepSqueeze",
    "ErrorFeedbackMemory",
    "ErrorFeedbackState",
    "GossipAlgorithm",
    "Identity",
    "Payload",
    "RandK",
    "ScaledSign",
    "TOPOLOGY_NAMES",
    "TopK",
    "Topology",
    "error_feedback_hook",
    "local_hook",
    "make_compressor",
]
