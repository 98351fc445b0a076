"""Checkpoints record the compressor as a small versioned config, compared field by field on load;
checkpoints of earlier versions, which carry the compressor's repr, still load."""

from __future__ import annotations

import io
import logging

import pytest
import torch

from ec_hooks import BF16, QSGD, DeepSqueeze, ErrorFeedbackState, TopK
from ec_hooks.gossip import simulate_step


def _workers(compressor, n=3):
    params = [[torch.randn(7, generator=torch.Generator().manual_seed(r))] for r in range(n)]
    workers = DeepSqueeze.simulated(params, "ring", compressor, 0.5)
    simulate_step(workers)
    return workers


def _warnings(caplog, logger):
    return [r.getMessage() for r in caplog.records if r.name == logger and r.levelno == logging.WARNING]


def test_config_is_versioned_plain_data_and_survives_a_weights_only_load():
    config = TopK(0.25, index_encoding="delta16", value_dtype=torch.bfloat16).config()
    assert config == {
        "version": 1,
        "name": "topk",
        "args": {"density": 0.25, "backend": "auto", "index_encoding": "delta16", "value_dtype": "bfloat16"},
    }
    assert BF16().config() == {"version": 1, "name": "bf16", "args": {"dtype": "bfloat16"}}
    buffer = io.BytesIO()
    torch.save({"compressor": config}, buffer)
    buffer.seek(0)
    assert torch.load(buffer, weights_only=True)["compressor"] == config


def test_differences_are_reported_field_by_field():
    assert TopK(0.25).config_differences(TopK(0.25).config()) == []
    assert TopK(0.25).config_differences(None) == []
    assert TopK(0.25).config_differences(TopK(0.5).config()) == ["density 0.5 (saved), 0.25 (here)"]
    assert QSGD(levels=3).config_differences(TopK(0.5).config()) == [
        "name 'topk' (saved), 'qsgd' (here)",
        "backend 'auto' (saved), '-' (here)",
        "density 0.5 (saved), '-' (here)",
        "levels '-' (saved), 3 (here)",
        "seed '-' (saved), 0 (here)",
    ]
    newer = {**TopK(0.25).config(), "version": 2}
    assert TopK(0.25).config_differences(newer) == [
        f"compressor config of version 2 ({newer!r}), this version reads 1"
    ]
    # older checkpoints: the repr string
    assert TopK(0.25).config_differences("TopK(density=0.25, backend='auto')") == []
    assert TopK(0.25).config_differences("TopK(density=0.5, backend='auto')") == [
        "compressor TopK(density=0.5, backend='auto') (saved), TopK(density=0.25, backend='auto') (here)"
    ]


def test_gossip_state_records_the_config_and_loads_old_repr_states(caplog):
    saved = _workers(TopK(0.5))[1].state_dict()
    assert saved["compressor"] == TopK(0.5).config()
    old = {**saved, "compressor": repr(TopK(0.5))}  # as earlier versions wrote it
    with caplog.at_level(logging.WARNING, logger="ec_hooks.gossip"):
        for state in (saved, old):
            worker = _workers(TopK(0.5))[1]
            worker.load_state_dict(state)
            assert torch.equal(worker._delta, saved["buffers"]["delta"])
            assert worker.iteration == saved["iteration"]
        assert _warnings(caplog, "ec_hooks.gossip") == []
        _workers(TopK(0.25))[1].load_state_dict(saved)
        _workers(TopK(0.25))[1].load_state_dict(old)
    messages = _warnings(caplog, "ec_hooks.gossip")
    assert len(messages) == 2
    assert "density 0.5 (saved), 0.25 (here)" in messages[0]
    assert "TopK(density=0.5, backend='auto') (saved)" in messages[1]


def test_hook_state_records_the_config_and_loads_old_repr_states(one_rank_group, caplog):
    model = torch.nn.Linear(3, 2)
    state = ErrorFeedbackState(compressor=TopK(0.5), module=model)
    state.memory.buffer_for(["weight", "bias"], [6, 2], torch.device("cpu")).copy_(torch.arange(8.0))
    saved = state.state_dict()
    assert saved["compressor"] == TopK(0.5).config()
    old = {**saved, "compressor": repr(TopK(0.5))}
    with caplog.at_level(logging.WARNING, logger="ec_hooks.hooks"):
        for sd in (saved, old):
            fresh = ErrorFeedbackState(compressor=TopK(0.5), module=model)
            fresh.load_state_dict(sd)
            assert torch.equal(fresh.memory.state_dict()["weight"], torch.arange(6.0))
        assert _warnings(caplog, "ec_hooks.hooks") == []
        ErrorFeedbackState(compressor=TopK(0.25), module=model).load_state_dict(old)
    (message,) = _warnings(caplog, "ec_hooks.hooks")
    assert "TopK(density=0.5, backend='auto') (saved), TopK(density=0.25, backend='auto') (here)" in message


def test_one_checker_refuses_another_kind_world_size_or_rank():
    from ec_hooks.checkpoints import check_state_dict

    kwargs = {
        "kind": "a test state dict",
        "required": ("a", "b"),
        "owner": "Thing",
        "world_size": 4,
        "rank": 1,
        "why_world_size": "it belongs to another run",
        "why_rank": "load each worker's own state",
    }
    good = {"a": 0, "b": 0, "world_size": 4, "rank": 1}
    assert check_state_dict(good, **kwargs) is good
    with pytest.raises(ValueError, match=r"state_dict is not a test state dict \(no 'a' / 'b' entries\)"):
        check_state_dict({"a": 0}, **kwargs)
    with pytest.raises(
        ValueError, match=r"world_size=3, this Thing has world_size=4: it belongs to another run"
    ):
        check_state_dict({**good, "world_size": 3}, **kwargs)
    with pytest.raises(ValueError, match=r"rank=2, this Thing has rank=1: load each worker's own state"):
        check_state_dict({**good, "rank": 2}, **kwargs)
    with pytest.raises(ValueError, match=r"world_size=None"):
        check_state_dict({"a": 0, "b": 0}, **kwargs)
    check_state_dict({"a": 0, "b": 0}, **kwargs, missing_ok=True)  # written before they were recorded


def test_gossip_and_hook_refuse_another_rank_through_the_same_checker(one_rank_group):
    workers = _workers(TopK(0.5))
    with pytest.raises(ValueError, match=r"saved with rank=1, this DeepSqueeze has rank=2"):
        workers[2].load_state_dict(workers[1].state_dict())
    state = ErrorFeedbackState(compressor=TopK(0.5), module=torch.nn.Linear(3, 2))
    with pytest.raises(ValueError, match=r"saved with rank=1, this ErrorFeedbackState has rank=0: load each"):
        state.load_state_dict({**state.state_dict(), "rank": 1})
    with pytest.raises(
        ValueError, match=r"saved with world_size=2, this ErrorFeedbackState has world_size=1"
    ):
        state.load_state_dict({**state.state_dict(), "world_size": 2})
