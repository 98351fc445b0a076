"""Property tests (hypothesis) across random shapes, dtypes, world sizes and topologies.

Compressors: a payload is exactly ``wire_bytes`` long and decodes to a finite fp32 tensor of the
input's shape; what error feedback keeps (``acc - C(acc)``) plus what was sent is the input (no
mass lost).  Gossip, on simulated workers: the average model moves exactly as the average of the
local steps whatever the algorithm, compressor, topology and world size; each worker's update
is finite.
"""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import ec_hooks
from ec_hooks import DPSGD, QSGD, ChocoSGD, DeepSqueeze, RandK, ScaledSign, TopK
from ec_hooks.gossip import simulate_step

COMPRESSORS = {
    "topk": lambda density: TopK(density),
    "randk": lambda density: RandK(density, seed=3),
    "sign": lambda density: ScaledSign(),
    "qsgd": lambda density: QSGD(levels=max(1, round(density * 15))),
    "identity": lambda density: ec_hooks.Identity(),
    "fp16": lambda density: ec_hooks.FP16(),
    "bf16": lambda density: ec_hooks.BF16(),
}
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
shapes = st.lists(st.integers(1, 17), min_size=1, max_size=3).map(tuple)


@settings(max_examples=60, deadline=None)
@given(
    name=st.sampled_from(sorted(COMPRESSORS)),
    density=st.floats(0.01, 1.0),
    shape=shapes,
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**20),
    step=st.integers(0, 1000),
)
def test_payload_size_shape_and_error_feedback_conservation(name, density, shape, dtype, seed, step):
    compressor = COMPRESSORS[name](density)
    x = (torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 3).to(dtype)
    payload = compressor.compress(x, step=step, key=seed % 7, rank=seed % 3)
    assert payload.nbytes == compressor.wire_bytes(x.numel(), dtype)
    dense = compressor.decompress(payload)
    assert dense.shape == x.shape and dense.dtype == torch.float32 and torch.isfinite(dense).all()
    # Error feedback: the fp32 memory keeps acc - C(acc); memory + sent gives acc back.
    acc = x.float().reshape(-1).clone()
    memory = acc.clone()
    compressor.subtract_sent_(
        memory, compressor.compress(memory, step=step, key=seed % 7, rank=seed % 3, wire_dtype=dtype)
    )
    sent = compressor.decompress(
        compressor.compress(acc, step=step, key=seed % 7, rank=seed % 3, wire_dtype=dtype)
    ).reshape(-1)
    torch.testing.assert_close(memory + sent, acc, rtol=1e-6, atol=1e-5)


def _topologies(n):
    names = ["ring", "complete", "exponential", "torus"]
    if n & (n - 1) == 0:
        names.append("one_peer_exponential")
    return st.sampled_from(names)


@st.composite
def gossip_cases(draw):
    n = draw(st.integers(2, 7))
    cls = draw(st.sampled_from([DeepSqueeze, ChocoSGD, DPSGD]))
    topology = draw(_topologies(n).filter(lambda t: not (cls is ChocoSGD and t == "one_peer_exponential")))
    compressor = None if cls is DPSGD else draw(st.sampled_from(["topk", "randk", "sign", "qsgd", "fp16"]))
    density = draw(st.floats(0.05, 1.0))
    step = draw(st.floats(0.05, 1.0))
    sizes = draw(st.lists(st.integers(1, 12), min_size=1, max_size=3))
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16]))
    return n, cls, topology, compressor, density, step, sizes, dtype, draw(st.integers(0, 2**20))


@settings(max_examples=40, deadline=None)
@given(case=gossip_cases())
def test_gossip_keeps_the_average_model_of_any_world_size_topology_and_compressor(case):
    n, cls, topology, name, density, consensus_step, sizes, dtype, seed = case
    g = torch.Generator().manual_seed(seed)
    params = [[torch.randn(s, generator=g).to(dtype) for s in sizes] for _ in range(n)]
    compressor = None if name is None else COMPRESSORS[name](density)
    workers = cls.simulated(params, topology, compressor, consensus_step)
    eps = torch.finfo(dtype).eps
    for _ in range(3):
        # A local "optimizer step" of each worker, then gossip: the mean moves by the mean step only.
        for w in params:
            for p in w:
                p.add_(torch.randn(p.shape, generator=g).to(dtype), alpha=0.1)
        before = torch.stack([torch.cat([p.double().reshape(-1) for p in w]) for w in params])
        simulate_step(workers)
        after = torch.stack([torch.cat([p.double().reshape(-1) for p in w]) for w in params])
        assert torch.isfinite(after).all()
        scale = float(before.abs().max()) + float(after.abs().max())
        # fp32 mixing, and for bf16 models the rounding of the written-back parameters.
        tolerance = (8 * eps if dtype == torch.bfloat16 else 1e-5) * scale
        assert float((after.mean(0) - before.mean(0)).abs().max()) <= tolerance, (
            cls.__name__,
            topology,
            name,
        )
