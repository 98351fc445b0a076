"""Selection backends on CPU: the threshold path and the fused step equal the torch reference exactly."""

import logging
import sys

import pytest
import torch

import ec_hooks
from ec_hooks import kernels
from ec_hooks.kernels import cuda as cuda_kernels
from ec_hooks.kernels import (
    dispatch,
    error_feedback_topk_,
    resolve_backend,
    threshold,
    topk_magnitude,
    topk_magnitude_reference,
    topk_magnitude_threshold,
    undo_accumulate_,
)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def make_input(kind: str, n: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Inputs that stress the selection: ties, zeros, NaN/inf, sorted runs, tiny and huge values."""
    g = torch.Generator().manual_seed(seed)
    if kind == "randn":
        x = torch.randn(n, generator=g)
    elif kind == "ties":  # few distinct magnitudes: the k-th is tied many times
        x = torch.randint(-4, 5, (n,), generator=g).float()
    elif kind == "zeros":  # mostly exact zeros (-0.0 too): the k-th largest is often 0
        x = torch.randn(n, generator=g) * (torch.rand(n, generator=g) < 0.003)
        x[::5] = -0.0
    elif kind == "nan_inf":
        x = torch.randn(n, generator=g)
        x[torch.rand(n, generator=g) < 0.2] = float("nan")
        x[torch.randint(n, (7,), generator=g)] = float("inf")
        x[torch.randint(n, (5,), generator=g)] = float("-inf")
    elif kind == "equal":
        x = torch.full((n,), -0.5)
    elif kind == "ascending":  # sorted data: a strided sample would be badly skewed
        x = torch.linspace(-1, 1, n) ** 3
    elif kind == "outliers":  # a handful of huge values in a sea of tiny (subnormal-range) ones
        x = torch.randn(n, generator=g) * 1e-39
        x[torch.randint(n, (11,), generator=g)] = 1e30
    else:
        raise AssertionError(kind)
    return x.to(dtype)


def k_values(n: int):
    return sorted(k for k in {1, 2, n // 1000, n // 100, n // 10, n // 2, n - 1, n} if 1 <= k <= n)


# --- the reference's own rules -------------------------------------------------------------------


def test_reference_rules_on_a_hand_made_example():
    nan, inf = float("nan"), float("inf")
    x = torch.tensor([1.0, -3.0, nan, 3.0, 0.0, -inf, 2.0, -0.0, nan, 3.0])
    # |x|: inf first, then the three 3.0s by index, then 2, 1, the zeros by index, NaN last
    order = [5, 1, 3, 9, 6, 0, 4, 7, 2, 8]
    for k in range(1, len(order) + 1):
        expected = torch.tensor(sorted(order[:k]))
        for backend in ("torch", "cpu", "auto"):
            assert torch.equal(topk_magnitude(x, k, backend=backend), expected), (k, backend)


# --- the CPU threshold path -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "kind, dtype",
    [
        (kind, torch.float32)
        for kind in ("randn", "ties", "zeros", "nan_inf", "equal", "ascending", "outliers")
    ]
    + [(kind, dtype) for kind in ("randn", "ties", "nan_inf") for dtype in (torch.bfloat16, torch.float16)]
    + [("zeros", torch.bfloat16), ("randn", torch.float64)],
    ids=str,
)
def test_threshold_path_equals_reference(kind, dtype):
    n = 50_021  # above the size where the threshold path takes over, not a multiple of 8
    x = make_input(kind, n, dtype, seed=n)
    for k in k_values(n):
        assert torch.equal(topk_magnitude_threshold(x, k), topk_magnitude_reference(x, k)), k


@pytest.mark.parametrize("n", [1, 9, 32_769, 262_147])
def test_threshold_path_sizes(n):
    x = make_input("randn", n, torch.float32, seed=n)
    for k in k_values(n):
        got = topk_magnitude_threshold(x, k)
        assert got.dtype == torch.int64 and got.numel() == k
        assert torch.equal(got, topk_magnitude_reference(x, k)), k


def test_threshold_path_multichunk_and_shapes(monkeypatch):
    # Several chunks, a chunk size that is not a multiple of 8, and a non-contiguous 2-D input.
    monkeypatch.setattr(threshold, "_CHUNK", 10_003)
    x = make_input("ties", 80_000, torch.float32, seed=3).reshape(400, 200).t()
    for k in (1, 800, 8_000, 79_999):
        assert torch.equal(topk_magnitude_threshold(x, k), topk_magnitude_reference(x, k))


@pytest.mark.parametrize("sample", [8, 64])
def test_threshold_path_survives_a_bad_sample(monkeypatch, sample):
    # A tiny sample makes the threshold guess miss often: the retries and the fallback must
    # still return the exact set.
    monkeypatch.setattr(threshold, "_SMALL", 0)
    monkeypatch.setattr(threshold, "_SAMPLE", sample)
    for seed, kind in enumerate(["randn", "ties", "zeros", "nan_inf", "ascending", "outliers"]):
        for dtype in DTYPES:
            x = make_input(kind, 3_001, dtype, seed=seed)
            for k in (1, 3, 30, 300, 1_500, 3_000):
                assert torch.equal(topk_magnitude_threshold(x, k), topk_magnitude_reference(x, k)), (
                    kind,
                    dtype,
                    k,
                )


def test_threshold_path_all_nan_and_mostly_nan():
    x = torch.full((40_000,), float("nan"))
    assert torch.equal(topk_magnitude_threshold(x, 5), torch.arange(5))
    x[[7, 30_000]] = 0.0
    # two numbers (zeros) first, then the NaNs of lowest index
    assert torch.equal(topk_magnitude_threshold(x, 4), torch.tensor([0, 1, 7, 30_000]))


# --- dispatch ------------------------------------------------------------------------------------


def test_topk_magnitude_validates_arguments():
    x = torch.randn(10)
    with pytest.raises(ValueError, match="backend must be one of"):
        topk_magnitude(x, 3, backend="gpu")
    for bad in (-1, 11, 2.0, True):
        with pytest.raises(ValueError, match="k must be an integer in"):
            topk_magnitude(x, bad)
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        topk_magnitude(x, 3, backend="cuda")
    assert topk_magnitude(x, 0).numel() == 0
    with pytest.raises(ValueError, match="backend must be one of"):
        ec_hooks.TopK(0.1, backend="gpu")


@pytest.mark.parametrize("backend", ["auto", "torch", "cpu"])
def test_topk_compressor_backends_give_identical_payloads(backend):
    x = make_input("ties", 60_000, torch.float32, seed=5).reshape(300, 200)
    ref = ec_hooks.TopK(0.01, backend="torch").compress(x, wire_dtype=torch.bfloat16)
    got = ec_hooks.TopK(0.01, backend=backend).compress(x, wire_dtype=torch.bfloat16)
    assert torch.equal(got.data, ref.data)


@pytest.fixture()
def fresh_status(monkeypatch):
    monkeypatch.setattr(cuda_kernels, "_status", {})
    monkeypatch.setattr(dispatch, "_announced", set())


def test_auto_falls_back_without_cupy_and_says_so_once(fresh_status, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "cupy", None)  # import cupy -> ImportError
    ok, reason = kernels.cuda_status(0)
    assert not ok and "CuPy is not importable" in reason
    with caplog.at_level(logging.INFO, logger="ec_hooks.kernels"):
        assert resolve_backend("auto", "cuda:0") == "torch"
        assert resolve_backend("auto", "cuda:0") == "torch"
        assert resolve_backend("auto", "cpu") == "cpu"
        assert resolve_backend("auto", "cpu", numel=kernels.CPU_THRESHOLD_MIN_NUMEL) == "cpu"
        assert resolve_backend("auto", "cpu", numel=kernels.CPU_THRESHOLD_MIN_NUMEL - 1) == "torch"
    messages = [r.getMessage() for r in caplog.records if r.name == "ec_hooks.kernels"]
    assert (
        len([m for m in messages if "falls back to torch.topk" in m and "CuPy is not importable" in m]) == 1
    )
    assert len([m for m in messages if "sampled-threshold" in m]) == 1
    with pytest.raises(RuntimeError, match="backend='cuda' cannot run on cuda:0: CuPy is not importable"):
        resolve_backend("cuda", "cuda:0")


def test_auto_falls_back_when_cupy_cannot_reach_a_device(fresh_status):
    cupy = pytest.importorskip("cupy")  # on machines where CuPy is installed but no GPU
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    ok, reason = kernels.cuda_status(0)
    assert not ok and f"CuPy {cupy.__version__} cannot run the kernels" in reason
    assert resolve_backend("auto", "cuda:0") == "torch"


def test_sources_are_found():
    text = cuda_kernels.read_sources()
    assert "ec_refine" in text and "EC_DEFINE_EMIT" in text


# --- the fused error-feedback step ---------------------------------------------------------------


def _torch_step(memory, grad, k, wire_dtype, subtract_sent):
    """The error-feedback step written out in plain torch ops (the definition)."""
    finite = torch.isfinite(grad)
    memory.add_(torch.where(finite, grad, 0))
    indices = topk_magnitude_reference(memory, k)
    values = memory[indices]
    if wire_dtype != torch.float32:  # clamped to the format's range, NaN kept
        limit = torch.finfo(wire_dtype).max
        values = torch.where(values.isnan(), values, values.clamp(-limit, limit))
    values = values.to(wire_dtype)
    if subtract_sent:
        memory[indices] -= values.float()
    return indices.int(), values, finite.all()


@pytest.mark.parametrize("grad_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("wire_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_error_feedback_step_matches_plain_torch(grad_dtype, wire_dtype, backend):
    n = 40_000
    memory = make_input("randn", n, torch.float32, seed=1)
    memory[[7, 9]] = torch.tensor([1e5, -3e5])  # beyond fp16's range: clamped on the wire
    grad = make_input("ties", n, grad_dtype, seed=2) * 0.25
    for subtract_sent in (True, False):
        for k in (1, 400, n):
            m_ref, m_got = memory.clone(), memory.clone()
            ref = _torch_step(m_ref, grad, k, wire_dtype, subtract_sent)
            got = error_feedback_topk_(
                m_got, grad, k, wire_dtype=wire_dtype, subtract_sent=subtract_sent, backend=backend
            )
            assert got.indices.dtype == torch.int32 and got.values.dtype == wire_dtype
            assert torch.equal(got.indices, ref[0])
            assert torch.equal(got.values.view(torch.uint8), ref[1].view(torch.uint8))
            assert torch.equal(m_got.view(torch.int32), m_ref.view(torch.int32))  # bit-exact
            assert bool(got.grad_finite)


def test_error_feedback_step_loses_nothing_with_16_bit_values():
    torch.manual_seed(0)
    memory = torch.randn(50_000) * 1e-3
    grad = torch.randn(50_000).bfloat16()
    before = memory.double() + grad.double()
    got = error_feedback_topk_(memory, grad, 500, wire_dtype=torch.bfloat16)
    sent = torch.zeros(50_000, dtype=torch.float64)
    sent[got.indices.long()] = got.values.double()
    # acc = memory_after + sent, up to the rounding of m + g (not of the bf16 values)
    assert (before - memory.double() - sent).abs().max() < 1e-6
    assert (memory[got.indices.long()] != 0).any()  # the rounding error stayed in memory


def test_error_feedback_step_skips_nonfinite_gradient_entries_and_undo_restores():
    torch.manual_seed(1)
    memory = torch.randn(40_000)
    original = memory.clone()
    grad = torch.randn(40_000)
    grad[[3, 17, 39_999]] = torch.tensor([float("nan"), float("inf"), float("-inf")])
    got = error_feedback_topk_(memory, grad, 400, subtract_sent=False)
    assert not bool(got.grad_finite)
    assert torch.equal(memory[[3, 17, 39_999]], original[[3, 17, 39_999]])
    assert torch.isfinite(memory).all()
    undo_accumulate_(memory, grad, keep=torch.tensor(True))
    assert not torch.equal(memory, original)
    undo_accumulate_(memory, grad, keep=torch.tensor(False))
    assert torch.allclose(memory, original, atol=1e-6, rtol=0)


def test_error_feedback_step_validates_arguments():
    memory, grad = torch.zeros(100), torch.zeros(100)
    with pytest.raises(ValueError, match="memory must be a contiguous fp32"):
        error_feedback_topk_(memory.double(), grad, 3)
    with pytest.raises(ValueError, match="memory must be a contiguous fp32"):
        error_feedback_topk_(torch.zeros(10, 10).t(), torch.zeros(100), 3)
    with pytest.raises(ValueError, match="grad must have memory's 100 entries"):
        error_feedback_topk_(memory, torch.zeros(99), 3)
    with pytest.raises(ValueError, match="wire_dtype must be one of"):
        error_feedback_topk_(memory, grad, 3, wire_dtype=torch.int8)
    with pytest.raises(ValueError, match="k must be an integer in"):
        error_feedback_topk_(memory, grad, 101)


@pytest.mark.parametrize("wire_dtype", [torch.float32, torch.bfloat16])
def test_topk_fused_compression_equals_compress_then_subtract(wire_dtype):
    torch.manual_seed(2)
    compressor = ec_hooks.TopK(0.02)
    memory, grad = torch.randn(30_000), torch.randn(30_000)
    m_fused, m_plain = memory.clone(), memory.clone()
    payload, finite = compressor.compress_error_feedback_(m_fused, grad, wire_dtype=wire_dtype)
    m_plain.add_(grad)
    expected = compressor.compress(m_plain, wire_dtype=wire_dtype)
    assert bool(finite)
    assert torch.equal(payload.data, expected.data) and payload.value_dtype == expected.value_dtype
    assert torch.equal(m_fused, m_plain)
    compressor.subtract_sent_(m_fused, payload)
    compressor.subtract_sent_(m_plain, expected)
    assert torch.equal(m_fused, m_plain)
