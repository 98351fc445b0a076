"""TopK's compact wire format (``index_encoding="delta16"``, 16-bit ``value_dtype``) against the
int32 format: round trips, exact sizes, the error-feedback invariant, and real gloo runs of the
Mem-SGD hook and DeepSqueeze (2 and 3 ranks)."""

import math

import pytest
import torch
import torch.distributed as dist
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.nn.parallel import DistributedDataParallel as DDP

import ec_hooks
from ec_hooks import TopK, make_compressor
from ec_hooks.gossip import DeepSqueeze, simulate_step

from .distributed import run_distributed

M = 65535  # largest gap one uint16 slot holds


def pad4(n):
    return -(-n // 4) * 4


def capacity(numel, k):
    """Slots of a delta16 payload, derived independently: k plus the worst-case filler count."""
    if k == 0:
        return 0
    return k + max(0, (numel - max(k, 2)) // M)


def fillers_needed(indices):
    """Fillers an ascending index list needs (first gap from 0)."""
    previous, total = 0, 0
    for i in indices:
        gap = i - previous
        total += max(0, (gap - 1) // M)
        previous = i
    return total


def raw_slots(compressor, payload):
    """(gaps as Python ints, values) of a delta16 payload, read straight from the bytes."""
    slots = compressor.slots_for(payload.numel)
    size = torch.empty((), dtype=payload.value_dtype).element_size()
    values = payload.data[: size * slots].view(payload.value_dtype)
    gaps = payload.data[size * slots : (size + 2) * slots].view(torch.int16).to(torch.int64) & 0xFFFF
    return gaps.tolist(), values


def sparse_tensor(numel, positions, dtype=torch.float32, seed=0):
    x = torch.zeros(numel, dtype=dtype)
    g = torch.Generator().manual_seed(seed)
    values = torch.rand(len(positions), generator=g) + 1.0  # magnitudes in [1, 2): never tied with 0
    signs = torch.where(torch.rand(len(positions), generator=g) < 0.5, -1.0, 1.0)
    x[torch.tensor(positions, dtype=torch.long)] = (values * signs).to(dtype)
    return x


def assert_same_as_int32(x, density, value_dtype=None, wire_dtype=None):
    """The delta16 payload decodes to exactly what the int32 payload does; sizes are exact."""
    reference = TopK(density, backend="torch", value_dtype=value_dtype)
    compact = TopK(density, backend="torch", index_encoding="delta16", value_dtype=value_dtype)
    expected = reference.compress(x, wire_dtype=wire_dtype)
    payload = compact.compress(x, wire_dtype=wire_dtype)
    numel, k = x.numel(), compact.k_for(x.numel())
    assert payload.value_dtype == expected.value_dtype
    size = torch.empty((), dtype=payload.value_dtype).element_size()
    assert (
        payload.nbytes
        == compact.wire_bytes(numel, wire_dtype or x.dtype)
        == pad4(capacity(numel, k) * (2 + size))
    )
    assert expected.nbytes == reference.wire_bytes(numel, wire_dtype or x.dtype) == pad4(k * (4 + size))
    dense = compact.decompress(payload)
    # fp32, or fp64 for fp64 values (fp64 models keep their precision)
    assert dense.shape == x.shape and dense.dtype == (
        torch.float64 if payload.value_dtype == torch.float64 else torch.float32
    )
    assert torch.equal(dense, reference.decompress(expected))
    assert torch.equal(compact.sum_payloads([payload, payload]), reference.sum_payloads([expected, expected]))
    indices, _ = compact.decode(payload)
    assert bool((indices[1:] >= indices[:-1]).all()) and int(indices[-1]) < numel
    return compact, payload


# ------------------------------------------------------------------------------ round trips


@pytest.mark.parametrize("numel", [1, 2, 7, 1000, M, M + 1, M + 2, 2 * M + 3, 200_003])
@pytest.mark.parametrize("density", [0.01, 0.3, 1.0])
def test_random_tensors_round_trip_like_int32(numel, density):
    x = torch.randn(numel, generator=torch.Generator().manual_seed(numel))
    assert_same_as_int32(x, density)
    assert_same_as_int32(x, density, value_dtype=torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("value_dtype", [None, torch.float16, torch.bfloat16])
def test_every_dtype_round_trips(dtype, value_dtype):
    x = torch.randn(3, 70_001, generator=torch.Generator().manual_seed(1)).to(dtype)
    x[0, 5] = x[2, 70_000] = 40.0  # far apart, and certainly selected
    compact, payload = assert_same_as_int32(x, 0.002, value_dtype)
    assert payload.value_dtype == (value_dtype or dtype)
    # wire_dtype from the caller applies unless the compressor fixes the value dtype
    compact, payload = assert_same_as_int32(x, 0.002, value_dtype, wire_dtype=torch.float32)
    assert payload.value_dtype == (value_dtype or torch.float32)


def test_huge_gaps_are_bridged_by_fillers():
    numel = 1_000_000
    positions = [70_000, 70_001, 300_000, numel - 1]
    x = sparse_tensor(numel, positions)
    compact, payload = assert_same_as_int32(x, len(positions) / numel)
    gaps, values = raw_slots(compact, payload)
    assert len(gaps) == capacity(numel, 4) == 4 + 15
    # 70000 = 65535 + 4465; 229999 = 3 * 65535 + 33394; 699999 = 10 * 65535 + 44649
    assert gaps == [M, 4465, 1, M, M, M, 33394] + [M] * 10 + [44649] + [0]
    entry_slots = [1, 2, 6, 17]
    assert torch.equal(values[entry_slots], x[positions])
    assert values[[s for s in range(19) if s not in entry_slots]].eq(0).all()
    assert fillers_needed(positions) == 14


@pytest.mark.parametrize("first", [M, M + 1, 3 * M + 7, 199_999])
def test_first_index_beyond_one_gap(first):
    x = sparse_tensor(200_000, [first, 199_999] if first != 199_999 else [first])
    compact, payload = assert_same_as_int32(x, (2 if first != 199_999 else 1) / 200_000)
    gaps, _ = raw_slots(compact, payload)
    assert sum(gaps) == 199_999 and gaps[: (first - 1) // M] == [M] * ((first - 1) // M)


@pytest.mark.parametrize(
    "numel, k",
    [
        (2, 1),
        (M + 1, 1),
        (M + 2, 1),
        (5 * M + 2, 1),
        (5 * M + 2, 2),
        (5 * M + 2, 7),
        (300_000, 3000),
        (M + 100, 100),
        (M + 101, 100),
    ],
)
def test_the_capacity_is_exact_for_the_worst_index_set(numel, k):
    # k = 1: the last index alone; k >= 2: index 0, its next k - 2 neighbours, and the last index
    worst = [numel - 1] if k == 1 else [*range(k - 1), numel - 1]
    compact = TopK(k / numel, backend="torch", index_encoding="delta16")
    assert compact.k_for(numel) == k
    assert compact.slots_for(numel) == capacity(numel, k) == k + fillers_needed(worst)
    x = sparse_tensor(numel, worst)
    _, payload = assert_same_as_int32(x, k / numel)
    gaps, _ = raw_slots(compact, payload)
    assert gaps[-1] != 0 or numel == 1  # every slot used: no tail left over


def test_k_equal_to_numel_and_single_entry_tensors():
    for numel in (1, 2, 10, M + 3):
        x = torch.randn(numel, generator=torch.Generator().manual_seed(numel))
        compact, payload = assert_same_as_int32(x, 1.0)
        assert compact.slots_for(numel) == numel
        assert torch.equal(compact.decompress(payload), x)
    compact, payload = assert_same_as_int32(torch.tensor([-2.5]), 0.01)
    assert raw_slots(compact, payload)[0] == [0] and payload.nbytes == 8


@settings(max_examples=60)
@given(
    numel=st.integers(1, 400_000),
    fractions=st.lists(st.floats(0, 1, exclude_max=True), min_size=1, max_size=12),
    value_dtype=st.sampled_from([None, torch.float16, torch.bfloat16]),
)
def test_property_every_sparse_vector_round_trips(numel, fractions, value_dtype):
    positions = sorted({int(f * numel) for f in fractions})
    x = sparse_tensor(numel, positions)
    compact, payload = assert_same_as_int32(x, len(positions) / numel, value_dtype)
    # all nonzeros are selected: the round trip is exact up to the value rounding
    assert torch.equal(compact.decompress(payload), x.to(value_dtype or torch.float32).float())
    gaps, _ = raw_slots(compact, payload)
    assert len(gaps) - gaps.count(0) + (positions[0] == 0) == len(positions) + fillers_needed(positions)


# ------------------------------------------------------------------------ sizes and arguments


def test_exact_byte_sizes():
    d = 1_000_000
    k, fill = 10_000, (d - 10_000) // M
    assert (TopK(0.01).wire_bytes(d), TopK(0.01).wire_bytes(d, torch.bfloat16)) == (8 * k, 6 * k)
    compact = TopK(0.01, index_encoding="delta16")
    assert compact.wire_bytes(d) == pad4((k + fill) * 6) == 60_092  # 10015 slots, 2 bytes of padding
    assert compact.wire_bytes(d, torch.bfloat16) == (k + fill) * 4 == 40_060
    bf16 = TopK(0.01, index_encoding="delta16", value_dtype="bf16")
    assert bf16.wire_bytes(d) == bf16.wire_bytes(d, torch.float64) == 40_060  # value_dtype wins
    assert TopK(0.01, value_dtype=torch.float16).wire_bytes(d) == 6 * k
    for c in (compact, bf16, TopK(0.01, value_dtype="fp16")):
        assert c.entries_sent(d) == k
        for numel in (1, 3, 999, 70_001):
            x = torch.randn(numel)
            assert c.compress(x).nbytes == c.wire_bytes(numel) and c.compress(x).nbytes % 4 == 0
            memory = torch.zeros(numel)
            payload, _ = c.compress_error_feedback_(memory, x)
            assert payload.nbytes == c.wire_bytes(numel)
    # about half of today's int32 + fp32 at 1% of a large bucket
    assert bf16.wire_bytes(d) / TopK(0.01).wire_bytes(d) == pytest.approx(0.5, abs=0.001)


def test_reprs_keep_the_defaults_out():
    assert repr(TopK(0.01)) == "TopK(density=0.01, backend='auto')"
    assert repr(TopK(0.01, index_encoding="int32", value_dtype=None)) == "TopK(density=0.01, backend='auto')"
    assert repr(TopK(0.5, "torch", "delta16", "bf16")) == (
        "TopK(density=0.5, backend='torch', index_encoding='delta16', value_dtype=torch.bfloat16)"
    )
    assert (
        repr(TopK(0.5, value_dtype="fp16")) == "TopK(density=0.5, backend='auto', value_dtype=torch.float16)"
    )


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"index_encoding": "delta8"}, r"index_encoding must be one of \['int32', 'delta16'\]"),
        ({"index_encoding": None}, "index_encoding must be one of"),
        ({"index_encoding": "DELTA16"}, "index_encoding must be one of"),
        ({"value_dtype": torch.float32}, "value_dtype must be None .*torch.float16, torch.bfloat16"),
        ({"value_dtype": "int8"}, "value_dtype must be .*'bf16'"),
        ({"value_dtype": torch.int16}, "value_dtype"),
        ({"value_dtype": 16}, "value_dtype"),
    ],
)
def test_bad_arguments_raise_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TopK(0.01, **kwargs)
    with pytest.raises(ValueError, match=message):
        make_compressor("topk", density=0.01, **kwargs)


def test_make_compressor_builds_the_compact_format():
    c = make_compressor("topk", index_encoding="delta16", value_dtype="bf16")
    assert isinstance(c, TopK) and c.index_encoding == "delta16" and c.value_dtype == torch.bfloat16
    assert c.density == 0.01 and make_compressor("topk", value_dtype="float16").value_dtype == torch.float16
    # like density, the top-k arguments are ignored by other compressors
    assert isinstance(
        make_compressor("sign", index_encoding="delta16", value_dtype="bf16"), ec_hooks.ScaledSign
    )


def test_corrupt_or_mismatched_payloads_are_rejected_on_cpu():
    compact = TopK(0.01, index_encoding="delta16")
    x = sparse_tensor(200_000, [5, 150_000])
    payload = compact.compress(x)
    corrupted = payload.data.clone()
    slots = compact.slots_for(200_000)
    assert payload.nbytes == 6 * slots + 2  # 2 bytes of padding after the gaps
    gaps = corrupted[4 * slots : 6 * slots].view(torch.int16)
    assert gaps[-1] == 0
    gaps[-1] = -1  # the unused tail slot now jumps 65535 past the last index
    with pytest.raises(ValueError, match="outside"):
        compact.decompress(payload.with_data(corrupted))
    with pytest.raises(ValueError, match="expected"):  # an int32 payload read as delta16
        compact.decode(TopK(0.01).compress(x))
    with pytest.raises(ValueError, match="expected"):
        TopK(0.01).decode(payload)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_corrupt_payload_on_cuda_decodes_to_nan_without_writing_outside():
    compact = TopK(0.01, index_encoding="delta16", value_dtype="bf16")
    x = sparse_tensor(200_000, [5, 150_000]).cuda()
    payload = compact.compress(x)
    assert torch.equal(compact.decompress(payload).cpu(), x.cpu().bfloat16().float())
    corrupted = payload.data.clone()
    slots = compact.slots_for(200_000)
    corrupted[2 * slots : 4 * slots].view(torch.int16)[-1] = -1
    dense = compact.decompress(payload.with_data(corrupted))
    assert dense.shape == x.shape and torch.isnan(dense[0]) and torch.isfinite(dense[1:]).all()


# ------------------------------------------------------------------------ error feedback


@pytest.mark.parametrize("value_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fused", [True, False])
def test_error_feedback_invariant_with_16_bit_values(value_dtype, fused):
    numel, steps = 150_000, 6
    compact = TopK(0.01, backend="torch", index_encoding="delta16", value_dtype=value_dtype)
    memory = torch.zeros(numel)
    sum_g = torch.zeros(numel, dtype=torch.float64)
    sum_c = torch.zeros(numel, dtype=torch.float64)
    generator = torch.Generator().manual_seed(3)
    rounding_kept = 0.0
    for step in range(steps):
        g = torch.randn(numel, generator=generator) * torch.rand(numel, generator=generator).pow(8)
        g[[7, 100_000 + step, numel - 1]] = 50.0  # far apart: fillers on the wire
        sum_g += g.double()
        if fused:
            before = memory.clone()
            payload, finite = compact.compress_error_feedback_(memory, g, step=step)
            assert bool(finite)
            assert payload.data.equal(compact.compress(before + g).data)  # same bytes as compress()
        else:
            memory.add_(g)
            payload = compact.compress(memory, step=step)
        _, values = compact.decode(payload)
        assert torch.equal(values.to(value_dtype).float(), values)  # values are 16-bit numbers
        sent = compact.decompress(payload)
        accumulated = memory.clone()
        compact.subtract_sent_(memory, payload)
        sum_c += sent.double()
        assert torch.equal(memory, accumulated - sent)
        # where an entry went out, what stays is its rounding error: nonzero, below half an ulp
        went = sent != 0
        residual = memory[went].abs()
        rounding_kept = max(rounding_kept, float(residual.max()))
        assert bool((residual <= accumulated[went].abs() * torch.finfo(value_dtype).eps / 2).all())
    assert rounding_kept > 1e-4  # 16-bit rounding really happened ...
    torch.testing.assert_close(sum_g, sum_c + memory.double(), rtol=0, atol=1e-4)  # ... and nothing is lost


def test_subtract_sent_accumulates_over_repeated_indices():
    numel = 3 * M
    compact = TopK(3 / numel, backend="torch", index_encoding="delta16")
    reference = TopK(3 / numel, backend="torch")
    acc = sparse_tensor(numel, [M + 10, M + 20, M + 30])  # one filler, one tail slot
    acc[1000] = 0.5
    payload = compact.compress(acc)
    indices, _ = compact.decode(payload)
    assert indices.numel() > indices.unique().numel()  # fillers and tail repeat indices
    expected = acc.clone()
    reference.subtract_sent_(expected, reference.compress(acc))
    wire = payload.data.clone()
    for scale in (None, torch.tensor(1.0), None):
        out = acc.clone()
        compact.subtract_sent_(out, payload, scale=scale)
        assert torch.equal(out, expected) and out[M + 30] == 0 and out[1000] == 0.5
        assert torch.equal(payload.data, wire)  # the payload is read, never modified
    voided = acc.clone()
    compact.subtract_sent_(voided, payload, scale=torch.tensor(0.0))
    assert torch.equal(voided, acc)


def test_fp16_values_are_clamped_and_the_excess_stays_in_memory():
    compact = TopK(0.5, index_encoding="delta16", value_dtype="fp16")
    memory = torch.tensor([7e4, -2e5, 1.0, 3.0])
    total, sent = memory.clone(), torch.zeros(4)
    for step in range(6):
        payload = compact.compress(memory, step=step)
        assert torch.isfinite(compact.decompress(payload)).all()
        sent += compact.decompress(payload)
        compact.subtract_sent_(memory, payload)
    torch.testing.assert_close(sent + memory, total)


# ------------------------------------------------------------------------ DeepSqueeze


def _gossip_params(rank, numel=140_000):
    x = torch.randn(numel, generator=torch.Generator().manual_seed(rank)) * 0.01
    x[[3, 70_000 + rank, numel - 1 - rank]] = 5.0 + rank  # selected first, far apart
    return [x[:40_000].clone().view(200, 200), x[40_000:].clone()]


def test_deepsqueeze_simulation_is_the_same_with_the_compact_format():
    results = {}
    for name, compressor in [("int32", TopK(0.01)), ("delta16", TopK(0.01, index_encoding="delta16"))]:
        params = [_gossip_params(r) for r in range(3)]
        workers = DeepSqueeze.simulated(params, "ring", compressor, 0.5)
        for _ in range(3):
            simulate_step(workers)
        deltas = [w.state_dict()["buffers"]["delta"] for w in workers]
        results[name] = (params, deltas, workers[0].stats.last_bytes_sent)
    (p32, d32, b32), (p16, d16, b16) = results["int32"], results["delta16"]
    assert all(torch.equal(a, b) for pa, pb in zip(p32, p16) for a, b in zip(pa, pb))
    assert all(torch.equal(a, b) for a, b in zip(d32, d16))
    k = TopK(0.01).k_for(140_000)
    # two ring neighbours; +4: the status word per message
    assert b32 == 2 * (8 * k + 4) and b16 == 2 * (pad4(capacity(140_000, k) * 6) + 4)


# ------------------------------------------------------------------------ real gloo runs


class SparseNet(torch.nn.Module):
    """A dense MLP and an embedding whose few used rows lie more than 65535 entries apart."""

    ROWS = (0, 30_000, 69_999)

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(70_000, 3)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(10, 256), torch.nn.Tanh(), torch.nn.Linear(256, 3))

    def forward(self, x, rows):
        return self.mlp(x) + 10 * self.emb(rows)


class FillerCountingTopK(TopK):
    """TopK that records, per call, how many filler slots its delta16 payload carried."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.fillers = []

    def compress_error_feedback_(self, memory, grad, **kwargs):
        payload, finite = super().compress_error_feedback_(memory, grad, **kwargs)
        indices, _ = self.decode(payload)
        self.fillers.append(indices.unique().numel() - self.k_for(memory.numel()))
        return payload, finite


def _train(rank, compressor, steps=4):
    """Train SparseNet with the hook; return parameters, memories, stats, the per-step totals of
    the gradients the hook got and of the means it returned (per parameter, fp64), and the
    bucket sizes of the last step."""
    torch.manual_seed(0)
    model = DDP(SparseNet())
    names = {id(p): n for n, p in model.module.named_parameters()}
    state = ec_hooks.ErrorFeedbackState(compressor=compressor, module=model)
    sum_g = {n: torch.zeros(p.numel(), dtype=torch.float64) for n, p in model.module.named_parameters()}
    sum_mean = {n: torch.zeros_like(t) for n, t in sum_g.items()}
    bucket_numels = {}

    def split(flat, params):
        offset = 0
        for p in params:
            yield names[id(p)], flat[offset : offset + p.numel()].double()
            offset += p.numel()

    def recording_hook(state, bucket):
        params = bucket.parameters()
        bucket_numels.setdefault(state.iteration, {})[bucket.index()] = bucket.buffer().numel()
        for name, g in split(bucket.buffer(), params):
            sum_g[name] += g

        def record(fut):
            mean = fut.value()
            for name, m in split(mean, params):
                sum_mean[name] += m
            return mean

        return ec_hooks.error_feedback_hook(state, bucket).then(record)

    model.register_comm_hook(state, recording_hook)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for step in range(steps):
        g = torch.Generator().manual_seed(100 * rank + step)
        x = torch.randn(16, 10, generator=g)
        rows = torch.tensor(SparseNet.ROWS)[torch.randint(0, 3, (16,), generator=g)]
        y = torch.randint(0, 3, (16,), generator=g)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x, rows), y).backward()
        opt.step()
    params = [p.detach().clone() for p in model.parameters()]
    return params, state.memory.state_dict(), state.stats, sum_g, sum_mean, bucket_numels[steps - 1]


def _gloo_compact_format(rank, world_size):
    out = {}
    # 1. delta16 with the gradient's fp32 values: the very same training run as int32
    p32, m32, s32, *_ = _train(rank, TopK(0.01))
    counting = FillerCountingTopK(0.01, index_encoding="delta16")
    p16, m16, s16, _, _, numels = _train(rank, counting)
    out["params_identical"] = all(torch.equal(a, b) for a, b in zip(p32, p16))
    out["memories_identical"] = m32.keys() == m16.keys() and all(torch.equal(m32[k], m16[k]) for k in m32)
    out["max_fillers"] = max(counting.fillers)
    out["bytes"] = (s32.last_bytes_sent, s16.last_bytes_sent, numels)

    # 2. delta16 with bf16 values: bytes as computed, and sum_t g = sum_t C + m_T over the workers
    _, memories, stats, sum_g, sum_mean, numels = _train(
        rank, TopK(0.01, index_encoding="delta16", value_dtype=torch.bfloat16)
    )
    out["bf16_bytes"] = (stats.last_bytes_sent, numels)
    errors, scale = [], 0.0
    for name in sorted(sum_g):
        lhs = sum_g[name] - memories[name].double()  # this worker's sum_t g - m_T
        dist.all_reduce(lhs)
        errors.append(float((lhs - world_size * sum_mean[name]).abs().max()))
        scale = max(scale, float(lhs.abs().max()))
    out["invariant"] = (max(errors), scale, max(float(m.abs().max()) for m in memories.values()))

    # 3. a real DeepSqueeze step over gloo: fixed-size payloads, the same result as int32
    results = []
    for compressor in (TopK(0.01), TopK(0.01, index_encoding="delta16")):
        params = _gossip_params(rank)
        gossip = DeepSqueeze(params, "ring", compressor, consensus_step=0.5)
        gossip.step()
        gossip.step()
        results.append((params, gossip.stats.last_bytes_sent))
    out["gossip_identical"] = all(torch.equal(a, b) for a, b in zip(results[0][0], results[1][0]))
    out["gossip_bytes"] = (results[0][1], results[1][1])
    return out


@pytest.mark.parametrize("world_size", [2, pytest.param(3, marks=pytest.mark.slow)])
def test_hook_and_gossip_on_gloo_give_the_int32_results_with_fewer_bytes(world_size):
    for out in run_distributed(_gloo_compact_format, world_size):
        assert out["params_identical"] and out["memories_identical"]
        assert out["max_fillers"] >= 1  # gaps over 65535 did travel through the hook
        sent32, sent16, numels = out["bytes"]
        ks = {i: math.ceil(0.01 * n) for i, n in numels.items()}
        assert sent32 == sum(8 * k + 4 for k in ks.values())  # +4: the status word per bucket
        assert sent16 == sum(pad4(6 * capacity(numels[i], k)) + 4 for i, k in ks.items())
        bf16_sent, bf16_numels = out["bf16_bytes"]
        assert bf16_numels == numels
        assert bf16_sent == sum(4 * capacity(numels[i], k) + 4 for i, k in ks.items())
        assert bf16_sent < 0.51 * sent32
        error, scale, memory_max = out["invariant"]
        assert memory_max > 0 and scale > 1
        assert error <= 1e-5 * scale
        assert out["gossip_identical"]
        k = TopK(0.01).k_for(140_000)
        peers = 1 if world_size == 2 else 2  # a ring of two has one distinct neighbour
        assert out["gossip_bytes"] == (peers * (8 * k + 4), peers * (pad4(6 * capacity(140_000, k)) + 4))
