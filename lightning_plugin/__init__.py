"""Lightning strategies and callbacks for error-compensated communication.

Importing this package registers the strategy names in Lightning's ``StrategyRegistry``
(Lightning has no entry point through which an outside package could add them)::

    import lightning_plugin
    trainer = L.Trainer(strategy="deepsqueeze", devices=8, callbacks=[lightning_plugin.CompressionMonitor()])

Names: ``"memsgd"``, ``"deepsqueeze"``, ``"choco"``, ``"dpsgd"``, each also with ``"_spawn"``
(``start_method="spawn"``, for launching from a notebook or a script without re-execution).
The classes take the algorithms' parameters: ``Trainer(strategy=MemSGDStrategy(density=0.001))``.
"""

from lightning.pytorch.strategies import StrategyRegistry

from lightning_plugin.gossip import ChocoStrategy, DeepSqueezeStrategy, DPSGDStrategy, GossipStrategy
from lightning_plugin.memsgd import MemSGDStrategy
from lightning_plugin.monitor import CompressionMonitor

__all__ = [
    "ChocoStrategy",
    "CompressionMonitor",
    "DPSGDStrategy",
    "DeepSqueezeStrategy",
    "GossipStrategy",
    "MemSGDStrategy",
    "STRATEGY_NAMES",
    "register_strategies",
]

_STRATEGIES = (MemSGDStrategy, DeepSqueezeStrategy, ChocoStrategy, DPSGDStrategy)


def register_strategies(registry=StrategyRegistry) -> list[str]:
    """Register the strategy names in ``registry``; return them.  Done once on import."""
    for cls in _STRATEGIES:
        cls.register_strategies(registry)
    return sorted(name for name, entry in registry.items() if entry["strategy"] in _STRATEGIES)


STRATEGY_NAMES = tuple(register_strategies())
