"""Bad-input sweep: every invalid value of the reliability checklist, in one table.

Each row is one bad input and the error it must raise, with the parameter's name in the
message.  Rows that need several real processes live beside the feature they test; they are
listed in ``ELSEWHERE`` and :func:`test_rows_tested_elsewhere_still_exist` fails if one of them
disappears, so this file stays the one place that lists the whole sweep.

Constructors that need a process group run inside a one-rank gloo group (``one_rank_group``).
"""

from __future__ import annotations

import ast
import math
from pathlib import Path

import pytest
import torch

import ec_hooks
from ec_hooks import DPSGD, QSGD, ChocoSGD, DeepSqueeze, ErrorFeedbackState, RandK, TopK, Topology
from ec_hooks.gossip import simulate_step
from lightning_plugin import DeepSqueezeStrategy, MemSGDStrategy

NAN = float("nan")
NOT_DOUBLY_STOCHASTIC = [[0.5, 0.5, 0.0], [0.2, 0.6, 0.2], [0.0, 0.5, 0.5]]  # rows sum to 1, columns do not


def _params(seed=0, sizes=(5, 3)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, generator=g) for n in sizes]


def _model(width=4):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, width), torch.nn.Linear(width, 2))


# ------------------------------------------------------------------ single-process rows


def _ef_state_of_other_model():
    mine = ErrorFeedbackState(module=_model(4))
    other = ErrorFeedbackState(module=_model(5))
    other.memory.buffer_for(["0.weight"], [15], torch.device("cpu"))
    mine.load_state_dict(other.state_dict())


def _ef_state_of_other_world_size():
    state = ErrorFeedbackState(module=_model())
    saved = state.state_dict()
    saved["world_size"] = 3
    state.load_state_dict(saved)


def _gossip_state(cls, n=4, sizes=(5, 3), rank=1):
    workers = cls.simulated(
        [_params(r, sizes) for r in range(n)], "ring", None if cls is DPSGD else TopK(0.5), 0.5
    )
    simulate_step(workers)
    return workers, workers[rank].state_dict()


def _gossip_other_model(cls):
    _, saved = _gossip_state(cls, sizes=(5, 3))
    workers, _ = _gossip_state(cls, sizes=(5, 4))
    workers[1].load_state_dict(saved)


def _gossip_other_world_size(cls):
    _, saved = _gossip_state(cls, n=4)
    workers, _ = _gossip_state(cls, n=3)
    workers[1].load_state_dict(saved)


def _memsgd_strategy_loads_other_model():
    strategy = MemSGDStrategy()
    strategy.comm_state = ErrorFeedbackState(module=_model(4))
    other = ErrorFeedbackState(module=_model(5))
    other.memory.buffer_for(["0.weight", "0.bias"], [15, 5], torch.device("cpu"))
    strategy.load_worker_state({"error_feedback": other.state_dict()})


def _deepsqueeze_strategy_loads_other_model():
    strategy = DeepSqueezeStrategy()
    module = _model(4)
    strategy._lightning_module = module
    strategy.gossips = [DeepSqueeze(module.parameters(), watch_every=0)]
    other = _model(5)
    strategy.load_worker_state(
        {"model": other.state_dict(), "gossip": [DeepSqueeze(other.parameters(), watch_every=0).state_dict()]}
    )


# (checklist item, callable, exception type, regex the message must match)
ROWS = [
    # density 0, negative, above 1, NaN
    *[
        (f"density={d} {cls.__name__}", (lambda cls=cls, d=d: cls(density=d)), ValueError, r"density must be")
        for cls in (TopK, RandK)
        for d in (0, 0.0, -0.5, 1.0001, 2, NAN, math.inf)
    ],
    *[
        (
            f"density={d} {cls.__name__}Strategy",
            (lambda cls=cls, d=d: cls(compressor="topk", density=d)),
            ValueError,
            r"density must be",
        )
        for cls in (MemSGDStrategy, DeepSqueezeStrategy)
        for d in (0, -0.5, 1.5, NAN)
    ],
    # QSGD levels below 1
    *[
        (f"QSGD levels={v}", (lambda v=v: QSGD(levels=v)), ValueError, r"levels must be an integer")
        for v in (0, -3)
    ],
    ("QSGD by name, levels=0", lambda: ec_hooks.make_compressor("qsgd", levels=0), ValueError, r"levels"),
    ("QSGD.from_bits(1)", lambda: QSGD.from_bits(1), ValueError, r"bits must be"),
    # unknown compressor names
    (
        "compressor 'zip'",
        lambda: ec_hooks.make_compressor("zip"),
        ValueError,
        r"compressor must be .* one of",
    ),
    (
        "DeepSqueeze compressor 'zip'",
        lambda: DeepSqueeze(_params(), compressor="zip"),
        ValueError,
        r"compressor must be",
    ),
    (
        "MemSGDStrategy compressor 'zip'",
        lambda: MemSGDStrategy(compressor="zip"),
        ValueError,
        r"compressor must be",
    ),
    # unknown topology names
    ("Topology.make('star')", lambda: Topology.make("star", 4), ValueError, r"topology must be .* one of"),
    (
        "DeepSqueeze topology 'star'",
        lambda: DeepSqueeze(_params(), topology="star"),
        ValueError,
        r"topology must be",
    ),
    (
        "DeepSqueezeStrategy topology 'star'",
        lambda: DeepSqueezeStrategy(topology="star"),
        ValueError,
        r"topology",
    ),
    # a topology whose size is not the world size
    (
        "Topology.make(ring(4), 3)",
        lambda: Topology.make(Topology.ring(4), 3),
        ValueError,
        r"4 workers but the process group has 3",
    ),
    (
        "DeepSqueeze ring(4) in a group of 1",
        lambda: DeepSqueeze(_params(), topology=Topology.ring(4)),
        ValueError,
        r"4 workers but the process group has 1",
    ),
    (
        "simulated ring(4) with 3 workers",
        lambda: DeepSqueeze.simulated([_params(r) for r in range(3)], Topology.ring(4)),
        ValueError,
        r"4 workers but the process group has 3",
    ),
    # a mixing matrix that is not doubly stochastic
    (
        "Topology.from_matrix(not doubly stochastic)",
        lambda: Topology.from_matrix(NOT_DOUBLY_STOCHASTIC),
        ValueError,
        r"matrix is not a valid mixing matrix",
    ),
    (
        "ChocoSGD with that matrix",
        lambda: ChocoSGD.simulated([_params(r) for r in range(3)], NOT_DOUBLY_STOCHASTIC),
        ValueError,
        r"matrix",
    ),
    (
        "DeepSqueezeStrategy with that matrix",
        lambda: DeepSqueezeStrategy(topology=NOT_DOUBLY_STOCHASTIC),
        ValueError,
        r"topology",
    ),
    # consensus_step outside (0, 1]
    *[
        (
            f"{cls.__name__} consensus_step={v}",
            (lambda cls=cls, v=v: cls(_params(), consensus_step=v)),
            ValueError,
            r"consensus_step must be a float in \(0, 1\]",
        )
        for cls in (DeepSqueeze, ChocoSGD, DPSGD)
        for v in (0, -0.1, 1.01, NAN, True)
    ],
    *[
        (
            f"DeepSqueezeStrategy consensus_step={v}",
            (lambda v=v: DeepSqueezeStrategy(consensus_step=v)),
            ValueError,
            r"consensus_step must be",
        )
        for v in (0, -1, 1.5, NAN)
    ],
    # negative start_iter
    (
        "MemSGDStrategy start_iter=-1",
        lambda: MemSGDStrategy(start_iter=-1),
        ValueError,
        r"start_iter must be",
    ),
    # a hook (its state) without an initialized process group
    (
        "ErrorFeedbackState without a process group",
        lambda: ErrorFeedbackState(),
        RuntimeError,
        r"init_process_group",
    ),
    # a gossip state_dict from another model or another world size, for every algorithm
    *[
        (
            f"{cls.__name__} state_dict of another model",
            (lambda cls=cls: _gossip_other_model(cls)),
            ValueError,
            r"numel=8",
        )
        for cls in (DeepSqueeze, ChocoSGD, DPSGD)
    ],
    *[
        (
            f"{cls.__name__} state_dict of another world size",
            (lambda cls=cls: _gossip_other_world_size(cls)),
            ValueError,
            r"world_size=4",
        )
        for cls in (DeepSqueeze, ChocoSGD, DPSGD)
    ],
    (
        "DeepSqueeze state_dict of ChocoSGD",
        lambda: _gossip_state(DeepSqueeze)[0][1].load_state_dict(_gossip_state(ChocoSGD)[1]),
        ValueError,
        r"saved by ChocoSGD",
    ),
]

# Rows that need an initialized (one-rank) process group.
GROUP_ROWS = [
    (
        "ErrorFeedbackState compressor 'zip'",
        lambda: ErrorFeedbackState(compressor="zip"),
        ValueError,
        r"compressor must be",
    ),
    (
        "ErrorFeedbackState start_iter=-1",
        lambda: ErrorFeedbackState(start_iter=-1),
        ValueError,
        r"start_iter must be",
    ),
    (
        "ErrorFeedbackState start_iter=1.5",
        lambda: ErrorFeedbackState(start_iter=1.5),
        ValueError,
        r"start_iter",
    ),
    (
        "ErrorFeedbackState TopK density 0",
        lambda: ErrorFeedbackState(compressor=TopK(0)),
        ValueError,
        r"density",
    ),
    (
        "ErrorFeedbackState state_dict of another model",
        _ef_state_of_other_model,
        ValueError,
        r"parameters the model does not have|entries|shape",
    ),
    (
        "ErrorFeedbackState state_dict of another world size",
        _ef_state_of_other_world_size,
        ValueError,
        r"world_size=3",
    ),
    (
        "MemSGDStrategy checkpoint of another model",
        _memsgd_strategy_loads_other_model,
        ValueError,
        r"parameters the model does not have|entries|shape",
    ),
    (
        "DeepSqueezeStrategy checkpoint of another model",
        _deepsqueeze_strategy_loads_other_model,
        ValueError,
        r"does not fit this run: .*parameter 0 was saved with shape",
    ),
]

# Rows that need several real processes: (item, test file, test function).
ELSEWHERE = [
    (
        "ErrorFeedbackState.load_state_dict of another world size / rank / model, 2 ranks",
        "test_hooks.py",
        "test_bad_arguments_raise_at_construction_or_load",
    ),
    (
        "strategy checkpoint of 2 workers resumed on 1 (another world size)",
        "test_lightning_distributed.py",
        "test_two_worker_checkpoint_refuses_to_resume_on_one",
    ),
    ("topology size != world size inside a real group", "test_gossip.py", "test_bad_topologies_in_a_group"),
    (
        "peer payload with an out-of-range index",
        "test_compressors.py",
        "test_topk_rejects_payload_with_out_of_range_index",
    ),
]


@pytest.mark.parametrize("item, call, error, match", ROWS, ids=[r[0] for r in ROWS])
def test_bad_input_is_refused_naming_the_parameter(item, call, error, match):
    with pytest.raises(error, match=match):
        call()


@pytest.mark.parametrize("item, call, error, match", GROUP_ROWS, ids=[r[0] for r in GROUP_ROWS])
def test_bad_input_is_refused_inside_a_process_group(one_rank_group, item, call, error, match):
    with pytest.raises(error, match=match):
        call()


@pytest.mark.parametrize("item, filename, function", ELSEWHERE, ids=[r[0] for r in ELSEWHERE])
def test_rows_tested_elsewhere_still_exist(item, filename, function):
    tree = ast.parse((Path(__file__).parent / filename).read_text())
    assert function in {node.name for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)}, (
        f"{item}: {filename}::{function} is gone; move the row here or point at its new test"
    )
