"""What a compressor can do is declared on it (attributes and methods with defaults on the base
class), not found by name or by probing: consensus-step defaults, contraction scale, fused error
feedback, shared indices, index/value payloads."""

from __future__ import annotations

import math

import pytest
import torch

from ec_hooks import BF16, FP16, QSGD, Compressor, CyclicTopK, Identity, Payload, RandK, ScaledSign, TopK
from ec_hooks.gossip import contraction_scale, default_consensus_step
from ec_hooks.transport import AllgatherSum, AllreduceMean, SharedIndexAllreduce, SparseAllreduce


class Halve(Compressor):
    """A compressor that declares nothing: it gets the base class's defaults."""

    def compress(self, x, *, step=0, key=0, rank=0, wire_dtype=None):
        return Payload(data=(x.reshape(-1) / 2).to(torch.uint8).view(torch.uint8), shape=x.shape)

    def decompress(self, payload):
        return payload.data.float().view(payload.shape)

    def wire_bytes(self, numel, dtype=torch.float32):
        return numel


# (compressor, DeepSqueeze eta, ChocoSGD gamma): the table of default_consensus_step's docstring
STEPS = [
    (TopK(0.01), 0.01, 0.02),
    (TopK(0.001), 0.005, 0.01),
    (TopK(0.9), 0.5, 1.0),
    (RandK(0.01), 0.005, 0.005),
    (RandK(0.001), 0.002, 0.002),
    (RandK(0.9), 0.25, 0.45),
    (ScaledSign(), 0.1, 0.5),
    (QSGD(levels=7), 0.049, 0.21),
    (QSGD(levels=1), 0.007, 0.03),
    (QSGD(levels=100), 0.1, 0.5),
    (Identity(), 1.0, 1.0),
    (FP16(), 1.0, 1.0),
    (BF16(), 1.0, 1.0),
    (CyclicTopK(0.01), 0.01, 0.1),
    (Halve(), 0.01, 0.1),
]


@pytest.mark.parametrize(
    ("compressor", "eta", "gamma"), STEPS, ids=lambda v: repr(v) if isinstance(v, Compressor) else ""
)
def test_consensus_step_defaults_come_from_the_compressor(compressor, eta, gamma):
    assert default_consensus_step("deepsqueeze", compressor) == pytest.approx(eta, abs=1e-12)
    assert default_consensus_step("choco", compressor) == pytest.approx(gamma, abs=1e-12)
    assert default_consensus_step("dpsgd", compressor) == 1.0


def test_contraction_scale_is_qsgds_rescaling_and_1_elsewhere():
    assert contraction_scale(QSGD(levels=4), 100) == 1.0 / (1.0 + min(100 / 16, math.sqrt(100) / 4))
    assert QSGD(levels=4).contraction_scale(10**6) == 1.0 / (1.0 + 1000 / 4)
    for compressor in (TopK(0.1), RandK(0.1), ScaledSign(), Identity(), FP16(), Halve()):
        assert contraction_scale(compressor, 1000) == 1.0


def test_a_plain_subclass_gets_the_defaults_and_the_reference_error_feedback():
    c = Halve()
    assert (c.summable, c.shares_indices, c.index_value_pairs, c.backend, c.local_args) == (
        False,
        False,
        False,
        "auto",
        (),
    )
    memory = torch.tensor([2.0, 4.0, 6.0])
    grad = torch.tensor([2.0, float("inf"), 0.0])
    payload, finite = c.compress_error_feedback_(memory, grad)
    assert not bool(finite)
    assert memory.tolist() == [4.0, 4.0, 6.0]  # the inf entry never entered the memory
    assert c.decompress(payload).tolist() == [2.0, 2.0, 3.0]


def test_fused_and_reference_error_feedback_agree_on_topk():
    torch.manual_seed(0)
    grad, start = torch.randn(1000), torch.randn(1000)
    fused_memory, reference_memory = start.clone(), start.clone()
    fused, fused_finite = TopK(0.05).compress_error_feedback_(fused_memory, grad)
    reference, reference_finite = Compressor.compress_error_feedback_(TopK(0.05), reference_memory, grad)
    assert bool(fused_finite) and bool(reference_finite)
    assert torch.equal(fused_memory, reference_memory)
    assert torch.equal(fused.data, reference.data)


def test_transports_read_the_declared_capabilities():
    assert SparseAllreduce().accepts(TopK(0.1)) and not SparseAllreduce().accepts(ScaledSign())
    assert not SparseAllreduce().accepts(Halve())
    assert SharedIndexAllreduce().accepts(CyclicTopK(0.1)) and not AllreduceMean().accepts(CyclicTopK(0.1))
    assert AllreduceMean().accepts(RandK(0.1)) and AllgatherSum().accepts(Halve())
    # a shared-index compressor's reference path accumulates and leaves the payload to the transport
    memory = torch.zeros(4)
    payload, finite = Compressor.compress_error_feedback_(CyclicTopK(0.5), memory, torch.ones(4))
    assert payload is None and bool(finite) and memory.tolist() == [1.0] * 4


def test_the_factory_says_which_names_take_a_density():
    from ec_hooks.compressors import COMPRESSOR_NAMES, compressor_arguments, make_compressor

    takes_density = {name for name in COMPRESSOR_NAMES if "density" in compressor_arguments(name)}
    assert takes_density == {"topk", "randk", "cyclic_topk"}
    assert compressor_arguments("TopK") == compressor_arguments("topk") and compressor_arguments("zip") == ()
    for name in takes_density:
        assert make_compressor(name, density=0.25).density == 0.25
