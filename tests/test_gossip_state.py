"""Gossip state dicts are checked parameter by parameter; CHOCO-SGD's in-place step is bit-identical."""

from __future__ import annotations

import pytest
import torch

import ec_hooks
from ec_hooks.gossip import ChocoSGD, DeepSqueeze, contraction_scale, simulate_step
from ec_hooks.topology import Topology
from lightning_plugin import DeepSqueezeStrategy


def params_of(shapes, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g).to(dtype) for shape in shapes]


def stepped_state(shapes, cls=DeepSqueeze, dtype=torch.float32):
    workers = cls.simulated([params_of(shapes, r, dtype) for r in range(3)], "ring", ec_hooks.TopK(0.5), 0.3)
    simulate_step(workers)
    return workers[1].state_dict()


def fresh_worker(shapes, cls=DeepSqueeze, dtype=torch.float32):
    return cls.simulated(
        [params_of(shapes, 10 + r, dtype) for r in range(3)], "ring", ec_hooks.TopK(0.5), 0.3
    )[1]


# ------------------------------------------------------------------ per-parameter checks


@pytest.mark.parametrize(
    "saved, mine, match",
    [
        # same total number of entries (17), another model
        (
            [(4, 3), (5,)],
            [(3, 4), (5,)],
            r"parameter 0 was saved with shape \(4, 3\), here it has shape \(3, 4\)",
        ),
        ([(12,), (5,)], [(5,), (12,)], r"parameter 0 was saved with shape \(12,\), here it has shape \(5,\)"),
        ([(2, 2), (4, 3), (1,)], [(2, 2), (3, 4), (1,)], r"parameter 1 was saved with shape \(4, 3\)"),
        ([(12,), (5,)], [(17,)], "saved for 2 parameter tensors, this one gossips 1"),
    ],
)
def test_a_state_of_another_model_with_the_same_size_is_refused_naming_the_parameter(saved, mine, match):
    for cls in (DeepSqueeze, ChocoSGD):
        state = stepped_state(saved, cls)
        worker = fresh_worker(mine, cls)
        assert worker.numel == state["numel"]
        with pytest.raises(ValueError, match=match):
            worker.load_state_dict(state)
        assert worker.iteration == 0 and worker._buffers() == {k: None for k in worker._buffers()}


def test_a_state_of_another_dtype_is_refused_and_another_size_still_names_numel():
    state = stepped_state([(4, 3), (5,)])
    with pytest.raises(
        ValueError, match="parameter 0 was saved with dtype float32, here it has dtype bfloat16"
    ):
        fresh_worker([(4, 3), (5,)], dtype=torch.bfloat16).load_state_dict(state)
    with pytest.raises(
        ValueError, match=r"numel=17, this DeepSqueeze has 19 .*parameter 1 was saved with shape \(5,\)"
    ):
        fresh_worker([(4, 3), (7,)]).load_state_dict(state)


def test_state_dicts_without_shapes_still_load_with_the_size_check():
    saved = [(4, 3), (5,)]
    workers = DeepSqueeze.simulated([params_of(saved, r) for r in range(3)], "ring", ec_hooks.TopK(0.5), 0.3)
    simulate_step(workers)
    state = workers[1].state_dict()
    assert state["shapes"] == [[4, 3], [5]] and state["dtypes"] == ["float32", "float32"]
    old = {k: v for k, v in state.items() if k not in ("shapes", "dtypes")}  # an earlier version's layout
    worker = fresh_worker(saved)
    worker.load_state_dict(old)
    assert worker.iteration == 1 and torch.equal(worker._delta, workers[1]._delta)
    fresh_worker([(3, 4), (5,)]).load_state_dict(old)  # as before: only the total is known
    with pytest.raises(ValueError, match="numel=17"):
        fresh_worker([(4, 3), (6,)]).load_state_dict(old)


def test_lightning_strategy_refuses_the_state_before_loading_anything():
    class Module(torch.nn.Module):
        loaded = False

        def load_state_dict(self, *args, **kwargs):
            Module.loaded = True

    strategy = DeepSqueezeStrategy()
    strategy._lightning_module = Module()
    strategy.gossips = [fresh_worker([(3, 4), (5,)])]
    state = {"model": {}, "gossip": [stepped_state([(4, 3), (5,)])]}
    with pytest.raises(
        ValueError,
        match=r"gossip group 0 .*parameter 0 was saved with shape \(4, 3\), here it has "
        r"shape \(3, 4\)",
    ):
        strategy.load_worker_state(state)
    assert not Module.loaded
    strategy.gossips = [fresh_worker([(4, 3), (5,)])]
    strategy.load_worker_state(state)
    assert Module.loaded and strategy.gossips[0].iteration == 1


# ------------------------------------------------------------------ CHOCO-SGD in place, bit for bit


class ReferenceChoco:
    """CHOCO-SGD as it was computed with a fresh tensor for every intermediate (steps 1-4 of
    :class:`ChocoSGD`), for ``n`` workers on a static topology, all in this process."""

    def __init__(self, params_per_worker, topology, compressor, gamma):
        self.params, self.compressor, self.gamma = params_per_worker, compressor, gamma
        self.n = len(params_per_worker)
        self.topology = Topology.make(topology, self.n)
        self.numel = sum(p.numel() for p in params_per_worker[0])
        self.scale = contraction_scale(compressor, self.numel)
        self.x_hat = [None] * self.n
        self.d = [None] * self.n
        self.step_count = 0

    def decode(self, payload):
        dense = self.compressor.decompress(payload).reshape(-1)
        return dense if self.scale == 1.0 else dense.mul_(self.scale)

    def step(self):
        t = self.step_count
        xs = [torch.cat([p.detach().reshape(-1).float() for p in ps]) for ps in self.params]
        payloads, sent = [], []
        for r, x in enumerate(xs):
            if self.x_hat[r] is None:
                self.x_hat[r] = torch.zeros_like(x)
                self.d[r] = torch.zeros_like(x, dtype=torch.float64)
            payload = self.compressor.compress(
                x - self.x_hat[r], step=t, key=0, rank=r, wire_dtype=torch.float32
            )
            q = self.decode(payload)
            self.x_hat[r].add_(q)
            payloads.append(payload)
            sent.append(q)
        inbox = [p.data.clone() for p in payloads]
        for r, x in enumerate(xs):
            weights = self.topology.weights(r, t)
            own = sent[r].reshape(-1).to(torch.float64)
            mixed = own * weights.get(r, 0.0)
            for peer in sorted(self.topology.in_peers(r, t)):
                mixed.add_(
                    self.decode(payloads[r].with_data(inbox[peer])).to(torch.float64), alpha=weights[peer]
                )
            self.d[r].add_(mixed.sub_(own))
            x.add_(self.d[r].to(x.dtype), alpha=self.gamma)
            offset = 0
            for p in self.params[r]:
                p.copy_(x[offset : offset + p.numel()].view_as(p))
                offset += p.numel()
        self.step_count += 1


SHAPES = [(9, 7), (7,), (4, 4, 3)]


@pytest.mark.parametrize(
    "compressor",
    [
        lambda: ec_hooks.TopK(0.2),
        lambda: ec_hooks.RandK(0.3, seed=2),
        lambda: ec_hooks.QSGD(levels=5, seed=1),
        lambda: ec_hooks.ScaledSign(),
        lambda: ec_hooks.Identity(),
    ],
    ids=["topk", "randk", "qsgd", "sign", "identity"],
)
def test_choco_step_in_place_is_bit_identical_to_the_reference_on_a_3_ring(compressor):
    gamma = 0.4
    mine = [params_of(SHAPES, r) for r in range(3)]
    theirs = [[p.clone() for p in ps] for ps in mine]
    workers = ChocoSGD.simulated(mine, "ring", compressor(), gamma)
    reference = ReferenceChoco(theirs, "ring", compressor(), gamma)
    noise = torch.Generator().manual_seed(7)
    buffers = None
    for step in range(6):
        simulate_step(workers)
        reference.step()
        for r in range(3):
            assert all(torch.equal(a, b) for a, b in zip(mine[r], theirs[r])), (
                f"worker {r} differs at step {step}"
            )
            assert torch.equal(workers[r]._x_hat, reference.x_hat[r])
            assert torch.equal(workers[r]._disagreement, reference.d[r])
            error = torch.cat([p.reshape(-1) for p in mine[r]]) - reference.x_hat[r]
            assert torch.equal(workers[r]._error, error)
        # the optimizer's local step, the same on both sides
        with torch.no_grad():
            for ps, qs in zip(mine, theirs):
                for p, q in zip(ps, qs):
                    delta = 0.05 * torch.randn(p.shape, generator=noise)
                    p.add_(delta)
                    q.add_(delta)
        # after the first step, every working buffer is reused, none reallocated
        current = {name: t.data_ptr() for name, t in workers[0]._scratch_buffers.items()}
        assert buffers is None or current == buffers
        buffers = current
    assert workers[0]._error.data_ptr() == buffers["error"]
    assert set(buffers) == {"flat", "difference", "error", "mixed", "received"}
    # the workers really moved towards each other
    assert reference.step_count == 6 and not torch.equal(
        workers[0]._disagreement, torch.zeros_like(reference.d[0])
    )
