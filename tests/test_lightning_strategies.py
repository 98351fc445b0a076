"""The Lightning plugin without a training run: registration, arguments, averaging, the monitor's reduction."""

from __future__ import annotations

import warnings

import pytest
import torch
from lightning.pytorch.strategies import StrategyRegistry

import lightning_plugin
from ec_hooks import QSGD, Identity, TopK
from ec_hooks.stats import CommStats
from lightning_plugin import (
    ChocoStrategy,
    CompressionMonitor,
    DeepSqueezeStrategy,
    DPSGDStrategy,
    MemSGDStrategy,
)

NAMES = {
    "memsgd": MemSGDStrategy,
    "deepsqueeze": DeepSqueezeStrategy,
    "choco": ChocoStrategy,
    "dpsgd": DPSGDStrategy,
}


@pytest.mark.parametrize("name", sorted(NAMES))
def test_import_registers_the_names(name):
    for suffix, start_method in (("", "popen"), ("_spawn", "spawn")):
        assert name + suffix in lightning_plugin.STRATEGY_NAMES
        strategy = StrategyRegistry.get(name + suffix)
        assert type(strategy) is NAMES[name]
        assert strategy._start_method == start_method


def test_registering_again_is_harmless():
    assert tuple(lightning_plugin.register_strategies()) == lightning_plugin.STRATEGY_NAMES


@pytest.mark.parametrize("name", ["memsgd", "deepsqueeze"])
def test_trainer_resolves_the_name_on_cpu(name):
    import lightning as L

    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=name, logger=False, enable_checkpointing=False)
    assert type(trainer.strategy) is NAMES[name]
    assert trainer.strategy.num_processes == 2
    assert trainer.strategy.root_device.type == "cpu"


def test_trainer_takes_a_strategy_object():
    import lightning as L

    strategy = DeepSqueezeStrategy(topology="complete", compressor="sign", consensus_step=0.2)
    trainer = L.Trainer(
        accelerator="cpu", devices=3, strategy=strategy, logger=False, enable_checkpointing=False
    )
    assert trainer.strategy is strategy
    assert strategy.consensus_step == 0.2 and strategy.topology == "complete"


def test_defaults():
    memsgd = MemSGDStrategy()
    assert (
        isinstance(memsgd.compressor, TopK) and memsgd.compressor.density == 0.01 and memsgd.start_iter == 0
    )
    assert MemSGDStrategy(compressor="randk", density=0.1).compressor.density == 0.1
    qsgd = QSGD(levels=3)
    assert MemSGDStrategy(compressor=qsgd).compressor is qsgd
    # Other keyword arguments reach DDP.
    assert MemSGDStrategy(bucket_cap_mb=1)._ddp_kwargs == {"bucket_cap_mb": 1}
    gossip = DeepSqueezeStrategy()
    assert gossip.topology == "ring" and gossip.compressor is None and gossip.consensus_step is None
    # Each worker keeps its own BatchNorm statistics unless told otherwise.
    assert False in gossip._ddp_kwargs.values()
    assert DeepSqueezeStrategy(broadcast_buffers=True)._ddp_kwargs == {"broadcast_buffers": True}
    assert isinstance(DPSGDStrategy(compressor=Identity()).compressor, Identity)


@pytest.mark.parametrize(
    "cls, kwargs, name",
    [
        (MemSGDStrategy, {"compressor": "top-k"}, "compressor"),
        (MemSGDStrategy, {"compressor": None}, "compressor"),
        (MemSGDStrategy, {"density": 0.0}, "density"),
        (MemSGDStrategy, {"density": 1.5}, "density"),
        (MemSGDStrategy, {"compressor": TopK(0.1), "density": 0.1}, "density"),
        (MemSGDStrategy, {"start_iter": -1}, "start_iter"),
        (MemSGDStrategy, {"start_iter": 1.5}, "start_iter"),
        (MemSGDStrategy, {"dense_fallback": "yes"}, "dense_fallback"),
        (MemSGDStrategy, {"momentum_correction": "yes"}, "momentum_correction"),
        (MemSGDStrategy, {"density_warmup_steps": -1}, "density_warmup_steps"),
        (MemSGDStrategy, {"density_warmup_start": 0.0}, "density_warmup_start"),
        (MemSGDStrategy, {"momentum_masking": 1}, "momentum_masking"),
        (MemSGDStrategy, {"send_momentum_tail": 1}, "send_momentum_tail"),
        (MemSGDStrategy, {"send_momentum_tail": True, "momentum_masking": True}, "send_momentum_tail"),
        (MemSGDStrategy, {"send_momentum_tail": True, "momentum_correction": False}, "send_momentum_tail"),
        (MemSGDStrategy, {"send_momentum_tail": True, "hierarchical": True}, "send_momentum_tail"),
        (MemSGDStrategy, {"send_momentum_tail": True, "compressor": "cyclic_topk"}, "send_momentum_tail"),
        (MemSGDStrategy, {"ddp_comm_hook": print}, "ddp_comm_hook"),
        (MemSGDStrategy, {"model_averaging_period": 4}, "model_averaging_period"),
        (DeepSqueezeStrategy, {"topology": "star"}, "topology"),
        (DeepSqueezeStrategy, {"topology": [[0.5, 0.5], [0.2, 0.8]]}, "topology"),
        (DeepSqueezeStrategy, {"consensus_step": 0}, "consensus_step"),
        (DeepSqueezeStrategy, {"consensus_step": 1.01}, "consensus_step"),
        (DeepSqueezeStrategy, {"consensus_step": True}, "consensus_step"),
        (DeepSqueezeStrategy, {"compressor": "zip"}, "compressor"),
        (DeepSqueezeStrategy, {"density": 0.1}, "density"),
        (DeepSqueezeStrategy, {"compressor": "topk", "density": -0.1}, "density"),
        (DeepSqueezeStrategy, {"watch_every": -1}, "watch_every"),
        (DeepSqueezeStrategy, {"ddp_comm_state": object()}, "ddp_comm_state"),
        (ChocoStrategy, {"topology": "one_peer_exponential"}, "topology"),
        (DPSGDStrategy, {"compressor": "topk"}, "compressor"),
    ],
)
def test_bad_arguments_raise_at_construction_naming_the_parameter(cls, kwargs, name):
    with pytest.raises(ValueError, match=name):
        cls(**kwargs)


# ------------------------------------------------------------------ the monitor


class _FakeStrategy:
    def __init__(self, stats, distance=None):
        self.comm_stats = stats
        if distance is not None:
            self.consensus_distance = lambda: distance


def _stats(sent, dense, residual=None):
    stats = CommStats()
    stats.record(bytes_sent=sent, bytes_dense=dense, entries_sent=1, entries=10)
    if residual is not None:
        stats.set_residual("bucket", torch.tensor([residual]))
    stats.end_step()
    return stats


def test_monitor_figures_on_one_process():
    monitor = CompressionMonitor()
    metrics = monitor.collect(
        _FakeStrategy([_stats(100, 4000, 3.0), _stats(60, 1000, 4.0)], 0.25), torch.device("cpu")
    )
    assert metrics == {
        "comm/bytes_sent": 160,
        "comm/bytes_dense": 5000,
        "comm/compression_ratio": 5000 / 160,
        "comm/residual_norm": 5.0,
        "gossip/consensus_distance": 0.25,
    }
    assert "gossip/consensus_distance" not in CompressionMonitor(consensus_distance=False).collect(
        _FakeStrategy([_stats(1, 2)], 0.5), torch.device("cpu")
    )


def test_monitor_bad_arguments():
    with pytest.raises(ValueError, match="consensus_distance"):
        CompressionMonitor(consensus_distance="yes")
    with pytest.raises(ValueError, match="prog_bar"):
        CompressionMonitor(prog_bar=1)


def test_monitor_warns_once_for_a_strategy_without_statistics():
    class Trainer:
        strategy = object()
        global_step = 0

    monitor = CompressionMonitor()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        monitor.on_train_start(Trainer(), None)
    assert len([w for w in caught if "keeps no communication statistics" in str(w.message)]) == 1
    # Inactive: later batches log nothing (and touch neither trainer nor module).
    Trainer.global_step = 50
    monitor.on_train_batch_end(Trainer(), None, None, None, 0)


# ------------------------------------------------------------------ averaging on one process


def test_average_of_one_worker_is_a_copy_and_the_swap_restores_exactly():
    from lightning_plugin.averaging import ModelSwap, average_state_dict

    module = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    local = {k: v.clone() for k, v in module.state_dict().items()}
    average = average_state_dict(module)
    assert all(torch.equal(average[k], local[k]) for k in local)
    assert all(average[k].data_ptr() != v.data_ptr() for k, v in module.state_dict().items())
    swap = ModelSwap()
    swap.swap_in_average(module)
    assert swap.holding_average
    with torch.no_grad():
        module[0].weight.add_(1.0)  # evaluation does not leak into the local model
    swap.swap_back(module)
    assert not swap.holding_average
    assert all(torch.equal(module.state_dict()[k], local[k]) for k in local)


def test_gossip_strategy_refuses_worker_state_saved_by_memsgd():
    strategy = DeepSqueezeStrategy()
    with pytest.raises(ValueError, match="saved by another strategy"):
        strategy.load_worker_state({"error_feedback": {"memories": {}}})
