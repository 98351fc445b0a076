import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ec_hooks import BF16, FP16, QSGD, Cast, Identity, RandK, ScaledSign, TopK, make_compressor
from ec_hooks.compressors import pack_bits, unpack_bits

ALL = [TopK(0.1), RandK(0.1, seed=3), ScaledSign(), QSGD(7), QSGD.from_bits(2), Identity(), FP16(), BF16()]


@pytest.mark.parametrize("compressor", ALL, ids=repr)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1,), (7,), (33, 5), (1000,)])
def test_payload_bytes_are_exact_and_roundtrip_keeps_shape(compressor, dtype, shape):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    payload = compressor.compress(x, step=1, key=2, wire_dtype=dtype)
    assert payload.nbytes == compressor.wire_bytes(x.numel(), dtype)
    out = compressor.decompress(payload)
    assert out.shape == x.shape and out.dtype == torch.float32
    # a payload rebuilt from its wire data (what a peer receives) decodes the same
    received = payload.with_data(payload.data.clone())
    torch.testing.assert_close(compressor.decompress(received), out)


def test_wire_sizes_shrink_as_advertised():
    d = 1_000_000
    dense = 4 * d
    assert TopK(0.01).wire_bytes(d) == 10_000 * 8
    assert TopK(0.01).wire_bytes(d, torch.bfloat16) == 10_000 * 6
    assert RandK(0.01).wire_bytes(d) == 10_000 * 4
    assert ScaledSign().wire_bytes(d) == 4 + d // 8  # bit-packed: 32x smaller than fp32
    assert dense / ScaledSign().wire_bytes(d) > 31.9
    assert QSGD.from_bits(4).wire_bytes(d) == 4 + d // 2
    assert QSGD.from_bits(4).levels == 7
    assert FP16().wire_bytes(d) == 2 * d
    assert Identity().wire_bytes(d) == dense


def test_topk_keeps_largest_magnitudes_and_prefers_lower_index_on_ties():
    x = torch.tensor([0.5, -3.0, 2.0, 0.1, -2.0, 1.0])
    out = TopK(density=3 / 6).decompress(TopK(density=3 / 6).compress(x))
    torch.testing.assert_close(out, torch.tensor([0.0, -3.0, 2.0, 0.0, -2.0, 0.0]))
    ties = torch.ones(10)
    sent = TopK(density=0.3).decompress(TopK(density=0.3).compress(ties))
    assert sent.nonzero().flatten().tolist() == [0, 1, 2]


def test_topk_density_gives_exact_k():
    for d, k in [(2000, 1), (2000, 3), (47236, 30), (10, 10)]:
        assert TopK(density=k / d).k_for(d) == k


def test_randk_indices_depend_only_on_seed_step_key_and_leave_global_rng_alone():
    x = torch.randn(1000)
    rng_before = torch.get_rng_state()
    a = RandK(0.05, seed=7).compress(x, step=3, key=1, rank=0).indices
    b = RandK(0.05, seed=7).compress(x * 2, step=3, key=1, rank=5).indices
    c = RandK(0.05, seed=7).compress(x, step=4, key=1).indices
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert a.numel() == 50 and a.unique().numel() == 50


def test_scaled_sign_and_qsgd_values():
    x = torch.tensor([1.0, -2.0, 3.0, 0.0])
    out = ScaledSign().decompress(ScaledSign().compress(x))
    torch.testing.assert_close(out, torch.tensor([1.5, -1.5, 1.5, 1.5]))
    # QSGD is unbiased: the mean of many independent draws approaches x
    q = QSGD(levels=3, seed=1)
    y = torch.randn(50, generator=torch.Generator().manual_seed(1))
    mean = torch.stack([q.decompress(q.compress(y, step=s)) for s in range(4000)]).mean(0)
    assert torch.allclose(mean, y, atol=0.12)
    # each decoded entry is on the grid norm * l / s
    one = q.decompress(q.compress(y))
    grid = one.abs() / y.norm() * 3
    assert torch.allclose(grid, grid.round(), atol=1e-5)


@settings(max_examples=40, deadline=None)
@given(
    d=st.integers(1, 400),
    density=st.floats(0.001, 1.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_topk_contraction_property(d, density, seed):
    x = torch.randn(d, generator=torch.Generator().manual_seed(seed))
    c = TopK(density)
    k = c.k_for(d)
    err = (x - c.decompress(c.compress(x))).pow(2).sum()
    assert err <= (1 - k / d) * x.pow(2).sum() * (1 + 1e-5) + 1e-12


@settings(max_examples=15, deadline=None)
@given(d=st.integers(2, 200), density=st.floats(0.01, 1.0), seed=st.integers(0, 2**31 - 1))
def test_randk_contraction_property_in_expectation(d, density, seed):
    x = torch.randn(d, generator=torch.Generator().manual_seed(seed))
    c = RandK(density, seed=seed)
    k = c.k_for(d)
    draws = 300
    err = sum(float((x - c.decompress(c.compress(x, step=s))).pow(2).sum()) for s in range(draws)) / draws
    bound = (1 - k / d) * float(x.pow(2).sum())
    # E[err] equals the bound for rand-k; allow the Monte-Carlo error of 300 draws
    assert err <= bound + 4 * float(x.pow(2).sum()) / math.sqrt(draws) + 1e-9


@settings(max_examples=25, deadline=None)
@given(d=st.integers(1, 300), seed=st.integers(0, 2**31 - 1))
def test_scaled_sign_contraction(d, seed):
    x = torch.randn(d, generator=torch.Generator().manual_seed(seed))
    err = (x - ScaledSign().decompress(ScaledSign().compress(x))).pow(2).sum()
    assert err <= (1 - 1 / d) * x.pow(2).sum() * (1 + 1e-5) + 1e-9


@settings(max_examples=40, deadline=None)
@given(bits=st.integers(1, 8), n=st.integers(1, 100), seed=st.integers(0, 1000))
def test_bit_packing_roundtrip(bits, n, seed):
    codes = torch.randint(0, 2**bits, (n,), generator=torch.Generator().manual_seed(seed), dtype=torch.int32)
    packed = pack_bits(codes.to(torch.uint8), bits)
    assert packed.numel() == math.ceil(n * bits / 8)
    assert torch.equal(unpack_bits(packed, bits, n).to(torch.int32), codes)


def test_topk_rejects_payload_with_out_of_range_index():
    c = TopK(0.5)
    payload = c.compress(torch.randn(8))
    corrupted = payload.data.clone()
    corrupted[:4] = torch.tensor([100], dtype=torch.int32).view(torch.uint8)
    with pytest.raises(ValueError, match="outside"):
        c.decompress(payload.with_data(corrupted))


@pytest.mark.parametrize("density", [0, -0.1, 1.5, float("nan"), "0.1", True, None])
def test_bad_density_names_the_parameter(density):
    for cls in (TopK, RandK):
        with pytest.raises(ValueError, match="density"):
            cls(density=density)


@pytest.mark.parametrize(
    "build, name",
    [
        (lambda: QSGD(levels=0), "levels"),
        (lambda: QSGD(levels=2.5), "levels"),
        (lambda: QSGD.from_bits(1), "bits"),
        (lambda: RandK(0.1, seed=-1), "seed"),
        (lambda: TopK(0.1, backend="gpu"), "backend"),
        (lambda: Cast(torch.float32), "dtype"),
        (lambda: Cast("int8"), "dtype"),
        (lambda: make_compressor("zip"), "compressor"),
    ],
)
def test_bad_arguments_name_the_parameter(build, name):
    with pytest.raises(ValueError, match=name):
        build()


def test_make_compressor_by_name():
    assert isinstance(make_compressor("topk", density=0.5), TopK)
    assert make_compressor("randk", density=0.5, seed=2).seed == 2
    assert isinstance(make_compressor("sign", density=0.5), ScaledSign)
    assert make_compressor("qsgd", levels=3).levels == 3
    assert make_compressor("bf16").dtype == torch.bfloat16
    c = TopK(0.2)
    assert make_compressor(c) is c


def test_randk_samples_every_coordinate_equally_often():
    d, c = 40, RandK(0.1, seed=2)
    counts = torch.zeros(d)
    draws = 8000
    for step in range(draws):
        counts[c.indices(d, step=step, key=0, device="cpu")] += 1
    expected = draws * c.k_for(d) / d
    # binomial standard deviation is about 19 here: 6 sigma
    assert (counts - expected).abs().max() < 6 * math.sqrt(expected)


@pytest.mark.parametrize("compressor", [FP16(), TopK(0.5), RandK(1.0), Identity()], ids=repr)
def test_memory_beyond_the_fp16_range_travels_clamped_and_stays_finite(compressor):
    memory = torch.tensor([7e4, -2e5, 1.0, 3.0])
    total = memory.clone()
    sent = torch.zeros(4)
    for step in range(6):  # the excess goes out over the next steps, 65504 at a time
        payload = compressor.compress(memory, step=step, wire_dtype=torch.float16)
        assert torch.isfinite(compressor.decompress(payload)).all()
        sent += compressor.decompress(payload).reshape(-1)
        compressor.subtract_sent_(memory, payload)
        assert torch.isfinite(memory).all()
    torch.testing.assert_close(sent + memory, total)


def test_make_compressor_refuses_misspelled_arguments():
    with pytest.raises(ValueError, match="dnesity"):
        make_compressor("topk", dnesity=0.5)
