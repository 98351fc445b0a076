"""The CUDA selection kernels equal the torch reference exactly (GPU only; skipped elsewhere)."""

import pytest
import torch

import ec_hooks
from ec_hooks.kernels import cuda as cuda_kernels
from ec_hooks.kernels import (
    cuda_status,
    error_feedback_topk_,
    topk_magnitude,
    topk_magnitude_reference,
    undo_accumulate_,
)

from .test_kernels import DTYPES, _torch_step, k_values, make_input

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.fixture(scope="module", autouse=True)
def kernels_ready():
    ok, reason = cuda_status(torch.cuda.current_device())
    if not ok:
        pytest.skip(reason)


def assert_same(got: torch.Tensor, expected: torch.Tensor) -> None:
    """Bit-for-bit equal, except that any NaN equals any NaN (CUDA arithmetic makes the canonical
    NaN, x86 keeps the operand's payload)."""
    got = got.cpu()
    assert got.dtype == expected.dtype and got.shape == expected.shape
    bits = {2: torch.int16, 4: torch.int32}[got.element_size()]
    same = (got.view(bits) == expected.view(bits)) | (torch.isnan(got) & torch.isnan(expected))
    assert bool(same.all()), f"{int((~same).sum())} entries differ"


def adversarial(kind: str, n: int, seed: int = 0) -> torch.Tensor:
    """fp32 inputs whose keys share their high digits, so every radix pass has work to do."""
    g = torch.Generator().manual_seed(seed)
    if kind == "one_low_digit":  # one D1 and D2 bucket: only the last 9 bits differ
        bits = 0x3F800000 + torch.randint(0, 512, (n,), generator=g, dtype=torch.int32)
    elif kind == "two_low_digits":  # one D1 bucket
        bits = 0x3F800000 + torch.randint(0, 1 << 20, (n,), generator=g, dtype=torch.int32)
    elif kind == "subnormal":  # keys in the lowest buckets, next to zero and NaN
        bits = torch.randint(0, 1 << 12, (n,), generator=g, dtype=torch.int32)
        bits[torch.rand(n, generator=g) < 0.3] = 0x7FC00000  # NaN
    else:
        raise AssertionError(kind)
    x = bits.view(torch.float32).clone()
    x[torch.rand(n, generator=g) < 0.5] *= -1
    return x


def check_topk(x_cpu: torch.Tensor, ks) -> None:
    x = x_cpu.cuda()
    for k in ks:
        got = topk_magnitude(x, k, backend="cuda")
        assert got.dtype == torch.int64 and got.is_cuda
        assert torch.equal(got.cpu(), topk_magnitude_reference(x_cpu, k)), k


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["randn", "ties", "zeros", "nan_inf", "equal", "ascending", "outliers"])
@pytest.mark.parametrize("n", [1, 5, 4095, 4097, 100_003])
def test_topk_equals_reference(n, kind, dtype):
    check_topk(make_input(kind, n, dtype, seed=n), k_values(n))


@pytest.mark.parametrize("kind", ["one_low_digit", "two_low_digits", "subnormal"])
def test_topk_equals_reference_when_high_digits_collide(kind):
    n = 300_007
    check_topk(adversarial(kind, n, seed=1), k_values(n))


@pytest.mark.parametrize("rank", [1, 64, 8192, 0], ids=lambda r: f"sample_rank={r}")
def test_every_stage_two_path_gives_the_same_set(monkeypatch, rank):
    # rank 1 puts the sample's bucket at its maximum: stage 2 nearly always falls back to a full
    # pass; 8192 makes half the input candidates; 0 skips the sample.
    monkeypatch.setattr(cuda_kernels, "_sample_rank", lambda n, k: rank)
    for kind in ("randn", "ties", "nan_inf", "outliers"):
        check_topk(make_input(kind, 300_007, torch.float32, seed=rank), (1, 300, 3_000, 30_000, 150_000))
    check_topk(adversarial("two_low_digits", 300_007, seed=rank), (1, 3_000, 150_000))
    memory, grad = (
        make_input("randn", 300_007, torch.float32, seed=1),
        make_input("ties", 300_007, torch.bfloat16),
    )
    m_ref, m_gpu = memory.clone(), memory.cuda()
    ref = _torch_step(m_ref, grad, 3_000, torch.bfloat16, True)
    got = error_feedback_topk_(m_gpu, grad.cuda(), 3_000, backend="cuda")
    assert torch.equal(got.indices.cpu(), ref[0])
    assert_same(got.values, ref[1])
    assert_same(m_gpu, m_ref)


def test_workspace_is_reused_across_sizes_and_types():
    for n, dtype in (
        (2_000_003, torch.float32),
        (10, torch.bfloat16),
        (3_000_001, torch.float16),
        (1_000_000, torch.float32),
        (300_000, torch.bfloat16),
    ):
        x = make_input("ties", n, dtype, seed=n)
        check_topk(x, (1, max(1, n // 100)))


def test_topk_on_misaligned_and_strided_views():
    base = make_input("ties", 50_001, torch.float32, seed=3)
    check_topk(base[1:], (1, 500, 25_000))  # 4 bytes past a 16-byte boundary: copied first
    check_topk(base[:50_000].reshape(250, 200).t(), (1, 500, 25_000))
    check_topk(base.half()[3:], (7, 4_999))


def test_topk_large_input_with_many_tiles():
    # More than 8192 tiles of 4096 entries: the tile scan runs several rounds.
    x = torch.randn(40_000_003, device="cuda", dtype=torch.float16)
    x[::1000] = 0.5  # many exact ties at a magnitude inside the selected range
    for k in (400_000, 4_000_000):
        got = topk_magnitude(x, k, backend="cuda")
        assert torch.equal(got, topk_magnitude_reference(x, k))


@pytest.mark.parametrize("grad_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("wire_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("subtract_sent", [True, False])
def test_fused_step_matches_plain_torch_bit_for_bit(grad_dtype, wire_dtype, subtract_sent):
    n = 200_003
    memory = make_input("randn", n, torch.float32, seed=7)
    memory[::101] = float("nan")  # corrupted memory entries are never sent
    memory[5] = float("inf")
    memory[[7, 9]] = torch.tensor([1e5, -3e5])  # beyond fp16's range: clamped on the wire
    grad = make_input("ties", n, grad_dtype, seed=8) * 0.5
    grad[[11, 12]] = torch.tensor([float("nan"), float("-inf")], dtype=grad_dtype)
    for k in (1, 2_000, 20_000, n - 1):
        m_ref, m_gpu = memory.clone(), memory.cuda()
        ref = _torch_step(m_ref, grad, k, wire_dtype, subtract_sent)
        got = error_feedback_topk_(
            m_gpu, grad.cuda(), k, wire_dtype=wire_dtype, subtract_sent=subtract_sent, backend="cuda"
        )
        assert torch.equal(got.indices.cpu(), ref[0]), k
        assert_same(got.values, ref[1])
        assert_same(m_gpu, m_ref)
        assert bool(got.grad_finite) is False


def test_fused_step_without_host_sync_on_a_side_stream():
    n, k = 1_000_003, 10_000
    memory = torch.randn(n, device="cuda")
    grad = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    expected_memory = memory.clone()
    expected = _torch_step(expected_memory, grad, k, torch.bfloat16, True)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.cuda.stream(stream):
            got = error_feedback_topk_(memory, grad, k, wire_dtype=torch.bfloat16, backend="cuda")
            idx = topk_magnitude(grad, k, backend="cuda")
    finally:
        torch.cuda.set_sync_debug_mode(0)
    stream.synchronize()
    assert torch.equal(got.indices, expected[0]) and torch.equal(got.values, expected[1])
    assert torch.equal(memory, expected_memory) and bool(got.grad_finite)
    assert torch.equal(idx, topk_magnitude_reference(grad, k))


def test_repeated_steps_are_deterministic_and_conserve_mass():
    torch.manual_seed(0)
    n, k = 2_000_000, 20_000
    memories = [torch.zeros(n, device="cuda") for _ in range(2)]
    sent = torch.zeros(n, device="cuda", dtype=torch.float64)
    total = torch.zeros(n, device="cuda", dtype=torch.float64)
    for _ in range(5):
        grad = torch.randn(n, device="cuda", dtype=torch.float16)
        total += grad.double()
        a = error_feedback_topk_(memories[0], grad, k, backend="cuda")
        b = error_feedback_topk_(memories[1], grad, k, backend="cuda")
        assert torch.equal(a.indices, b.indices) and torch.equal(a.values, b.values)
        sent.index_add_(0, a.indices.long(), a.values.double())
    assert torch.equal(memories[0], memories[1])
    assert (total - sent - memories[0].double()).abs().max() < 1e-3


def test_undo_accumulate_reads_the_flag_on_the_device():
    memory = torch.randn(100_001, device="cuda")
    original = memory.clone()
    grad = torch.randn(100_001, device="cuda", dtype=torch.bfloat16)
    grad[3] = float("nan")
    got = error_feedback_topk_(memory, grad, 100, subtract_sent=False, backend="cuda")
    assert not bool(got.grad_finite)
    undo_accumulate_(memory, grad, torch.tensor(True, device="cuda"), backend="cuda")
    assert not torch.equal(memory, original)
    undo_accumulate_(memory, grad, torch.tensor(False, device="cuda"), backend="cuda")
    assert (memory - original).abs().max() < 1e-6 and memory[3] == original[3]


@pytest.mark.parametrize("wire_dtype", [torch.float32, torch.bfloat16])
def test_topk_compressor_cuda_backend_gives_the_reference_payload(wire_dtype):
    x = make_input("ties", 123_457, torch.float32, seed=9).cuda()
    ref = ec_hooks.TopK(0.01, backend="torch").compress(x, wire_dtype=wire_dtype)
    for backend in ("cuda", "auto"):
        assert torch.equal(
            ec_hooks.TopK(0.01, backend=backend).compress(x, wire_dtype=wire_dtype).data, ref.data
        )
    memory, grad = torch.randn(123_457, device="cuda"), x.to(wire_dtype)
    plain = memory + grad.float()
    payload, finite = ec_hooks.TopK(0.01, backend="cuda").compress_error_feedback_(
        memory, grad, wire_dtype=wire_dtype
    )
    assert bool(finite) and torch.equal(memory, plain)
    assert torch.equal(
        payload.data, ec_hooks.TopK(0.01, backend="torch").compress(plain, wire_dtype=wire_dtype).data
    )
