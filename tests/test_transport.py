"""Transports of the Mem-SGD hook and the shared-index top-k (ScaleCom's cyclic local top-k)."""

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import ec_hooks
from ec_hooks import CyclicTopK, ErrorFeedbackState, error_feedback_hook, transport
from ec_hooks.transport import (
    AllgatherSum,
    AllreduceMean,
    CandidateAllreduce,
    DenseAllreduce,
    SharedIndexAllreduce,
)

from .distributed import run_distributed
from .test_hooks import Recorder, _gather, make_model, train

ALL = (SharedIndexAllreduce(), AllreduceMean(), AllgatherSum(), DenseAllreduce(), CandidateAllreduce())


# ---------------------------------------------------------------- the compressor alone


@pytest.mark.parametrize("numel,density", [(20_000, 0.01), (1_000_000, 1e-5), (7, 1.0)])
def test_cyclic_topk_selects_what_topk_selects(numel, density):
    # 1e-5 of a million: 10 entries with gaps above 65535, so the index message needs fillers
    x = torch.randn(numel, generator=torch.Generator().manual_seed(0))
    cyclic, topk = CyclicTopK(density), ec_hooks.TopK(density)
    payload = cyclic.compress(x)
    dense, reference = cyclic.decompress(payload), topk.decompress(topk.compress(x))
    chosen = reference != 0
    assert torch.equal(dense[chosen], reference[chosen])
    # filler slots (gaps above 65535) carry the value where they land: sent, and subtracted below
    assert int((dense[~chosen] != 0).sum()) <= cyclic.slots_for(numel) - cyclic.k_for(numel)
    assert payload.nbytes == cyclic.wire_bytes(numel)
    assert cyclic.select(x).numel() == cyclic.index_bytes(numel) == -(-2 * cyclic.slots_for(numel) // 4) * 4
    acc = x.clone()
    cyclic.subtract_sent_(acc, payload)
    assert torch.equal(acc + cyclic.decompress(payload), x)  # what was sent, exactly, left memory


def test_cyclic_topk_values_at_another_workers_indices_and_in_bf16():
    g = torch.Generator().manual_seed(1)
    leader, follower = torch.randn(5_000, generator=g), torch.randn(5_000, generator=g)
    c = CyclicTopK(0.02, value_dtype="bf16")
    message = c.select(leader)
    payload = c.compress_at(follower, message)
    chosen = ec_hooks.TopK(0.02).decompress(ec_hooks.TopK(0.02).compress(leader)) != 0
    dense = c.decompress(payload)
    assert payload.data.dtype == torch.bfloat16
    assert torch.equal(dense != 0, chosen & (follower != 0))
    assert torch.equal(dense[chosen], follower[chosen].bfloat16().float())
    acc = follower.clone()
    c.subtract_sent_(acc, payload)
    # the bf16 rounding stays in memory: nothing lost
    assert torch.allclose(acc + dense, follower, atol=0, rtol=1e-7)


def test_cyclic_topk_memory_filter_drops_what_it_says():
    g = torch.Generator().manual_seed(2)
    memory, grad = torch.randn(1_000, generator=g), torch.randn(1_000, generator=g)
    for beta in (1.0, 0.25):
        c = CyclicTopK(0.05, memory_filter=beta)
        acc = memory + grad
        payload = c.compress(acc)
        sent = c.decompress(payload)
        c.update_memory_(acc, payload, grad)
        # m_new = (1 - beta) m + beta (m + g - c)
        assert torch.allclose(acc, (1 - beta) * memory + beta * (memory + grad - sent), atol=1e-6)


def test_cyclic_topk_accumulates_finite_entries_only_and_leaves_the_payload_to_the_transport():
    memory, grad = torch.ones(6), torch.tensor([1.0, float("inf"), 2.0, float("nan"), 3.0, 4.0])
    payload, finite = CyclicTopK(0.5).compress_error_feedback_(memory, grad)
    assert payload is None and not bool(finite)
    assert memory.tolist() == [2.0, 1.0, 3.0, 1.0, 4.0, 5.0]
    payload, finite = CyclicTopK(0.5).compress_error_feedback_(memory, torch.ones(6, dtype=torch.bfloat16))
    assert payload is None and bool(finite) and memory.tolist() == [3.0, 2.0, 4.0, 2.0, 5.0, 6.0]


def test_cyclic_topk_bad_arguments_and_messages():
    for kwargs, name in (
        ({"density": 0}, "density"),
        ({"memory_filter": 0.0}, "memory_filter"),
        ({"memory_filter": 1.5}, "memory_filter"),
        ({"value_dtype": "int8"}, "value_dtype"),
        ({"backend": "gpu"}, "backend"),
    ):
        with pytest.raises(ValueError, match=name):
            CyclicTopK(**kwargs)
    c = CyclicTopK(0.01)
    with pytest.raises(ValueError, match="index message"):
        c.decode_indices(torch.zeros(3, dtype=torch.uint8), 1000)
    corrupt = torch.full((c.index_bytes(1000),), 255, dtype=torch.uint8)  # gaps of 65535: past the end
    with pytest.raises(ValueError, match="past the tensor"):
        c.decode_indices(corrupt, 1000)
    made = ec_hooks.make_compressor("cyclic_topk", density=0.05, memory_filter=0.5)
    assert isinstance(made, CyclicTopK) and (made.density, made.memory_filter) == (0.05, 0.5)
    assert [CyclicTopK.leader(t, 5, 3) for t in range(4)] == [2, 0, 1, 2]


def test_gossip_refuses_a_shared_index_compressor():
    params = [torch.zeros(10)]
    with pytest.raises(ValueError, match="compressor"):
        ec_hooks.DeepSqueeze.simulated([params, [torch.zeros(10)]], compressor=CyclicTopK(0.1))
    with pytest.raises(ValueError, match="compressor"):
        ec_hooks.ChocoSGD.simulated([params, [torch.zeros(10)]], compressor="cyclic_topk")


def test_memsgd_strategy_takes_cyclic_topk_by_name():
    from lightning_plugin import MemSGDStrategy

    strategy = MemSGDStrategy(compressor="cyclic_topk")
    assert isinstance(strategy.compressor, CyclicTopK) and strategy.compressor.density == 0.01


def test_memsgd_strategy_asks_the_compressor_about_momentum_correction():
    from lightning_plugin import MemSGDStrategy

    # Shared indices keep the optimizer's momentum unless told otherwise (docs/transports.md) ...
    assert CyclicTopK.prefers_momentum_correction is False
    assert MemSGDStrategy(compressor="cyclic_topk").momentum_correction is False
    assert MemSGDStrategy(compressor=CyclicTopK(0.02)).momentum_correction is False
    assert MemSGDStrategy(compressor="cyclic_topk", momentum_correction=True).momentum_correction is True
    # ... private top-k moves it into the hook
    assert MemSGDStrategy(compressor="topk").momentum_correction is True
    assert MemSGDStrategy(compressor="topk", momentum_correction=False).momentum_correction is False
    with pytest.raises(ValueError, match="momentum_correction"):
        MemSGDStrategy(compressor="cyclic_topk", momentum_correction=1)


# ---------------------------------------------------------------- bytes and the choice


def test_wire_bytes_follow_the_collectives_formulas():
    numel, f32 = 100_000, torch.float32
    topk, cyclic, randk = ec_hooks.TopK(0.01), CyclicTopK(0.01), ec_hooks.RandK(0.01)
    for n in (2, 4, 8):
        assert AllgatherSum().wire_bytes(topk, numel, f32, n) == (n - 1) * (1_000 * 8 + 4)
        assert DenseAllreduce().wire_bytes(topk, numel, f32, n) == pytest.approx(2 * (n - 1) / n * 400_004)
        assert AllreduceMean().wire_bytes(randk, numel, f32, n) == pytest.approx(2 * (n - 1) / n * 4_004)
        # values (1,001 slots: one filler for d = 100,000) summed, plus the broadcast index message
        assert SharedIndexAllreduce().wire_bytes(cyclic, numel, f32, n) == pytest.approx(
            2 * (n - 1) / n * (1_001 * 4 + 4) + (n - 1) / n * 2_004
        )
    # constant in n: at 8 ranks below 2x its 2-rank figure, at 4 ranks below half the allgather's
    shared = {n: SharedIndexAllreduce().wire_bytes(cyclic, numel, f32, n) for n in (2, 4, 8)}
    assert shared[8] <= 2 * shared[2]
    assert shared[4] <= 0.5 * AllgatherSum().wire_bytes(topk, numel, f32, 4)


def test_the_choice_is_the_cheapest_transport_that_accepts_the_compressor():
    f32 = torch.float32
    assert transport.choose(ALL, CyclicTopK(0.01), 10_000, f32, 8).name == "shared_index"
    assert transport.choose(ALL, ec_hooks.RandK(0.01), 10_000, f32, 8).name == "allreduce"
    assert transport.choose(ALL, ec_hooks.TopK(0.01), 10_000, f32, 4).name == "allgather"
    # 3 ranks, 10,000 entries: allgather while 3 * (8k + 4) <= 2 * 40,004
    assert transport.choose(ALL, ec_hooks.TopK(0.33), 10_000, f32, 3).name == "allgather"
    assert transport.choose(ALL, ec_hooks.TopK(0.34), 10_000, f32, 3).name == "dense"
    assert transport.choose(ALL[:3], ec_hooks.TopK(0.34), 10_000, f32, 3).name == "allgather"
    for compressor in (ec_hooks.TopK(0.2), ec_hooks.ScaledSign(), ec_hooks.QSGD(), ec_hooks.RandK(0.5)):
        for n in (2, 3, 8):
            chosen = transport.choose(ALL, compressor, 5_000, f32, n)
            costs = [t.wire_bytes(compressor, 5_000, f32, n) for t in ALL if t.accepts(compressor)]
            assert chosen.wire_bytes(compressor, 5_000, f32, n) == min(costs)
    with pytest.raises(ValueError, match="no transport"):
        transport.choose((AllreduceMean(),), ec_hooks.TopK(0.1), 100, f32, 2)


# ---------------------------------------------------------------- every transport on real ranks

TRANSPORTS = {  # name -> compressor that makes the hook choose that transport on 2 and 3 ranks
    "shared_index": lambda: CyclicTopK(0.1),
    "shared_index_bf16": lambda: CyclicTopK(0.1, value_dtype="bf16"),
    "candidates": lambda: CyclicTopK(0.1, selection="candidates"),
    "candidates_bf16": lambda: CyclicTopK(0.1, selection="candidates", value_dtype="bf16"),
    "allreduce": lambda: ec_hooks.RandK(0.1, seed=1),
    "allgather": lambda: ec_hooks.TopK(0.1),
    "dense": lambda: ec_hooks.TopK(0.6),
}


def _every_transport(rank, world_size):
    report = {}
    for name, build in TRANSPORTS.items():
        model = DDP(make_model(), bucket_cap_mb=0.0005)  # several buckets: several leaders per step
        state = ErrorFeedbackState(compressor=build(), module=model)
        recorder = Recorder(state)
        model.register_comm_hook(state, recorder)
        params = train(model, 6, rank)
        gathered = _gather(params)
        grad_total, out_total, memory = recorder.world_totals()
        residual = float((grad_total - world_size * out_total - memory).abs().max())
        sent = torch.tensor([float(state.stats.bytes_sent)])
        dist.all_reduce(sent)
        report[name] = {
            "same": all(torch.equal(gathered[0], g) for g in gathered),
            "residual": residual,
            "scale": float(grad_total.abs().max()),
            "counts": dict(state.transport_counts),
            "bytes_sent": float(state.stats.bytes_sent),
            "all_bytes_sent": float(sent),
            "numels": sorted({p.numel() for p in model.parameters()}),
        }
    return report


@pytest.mark.parametrize("world_size", [2, pytest.param(3, marks=pytest.mark.slow)])
def test_every_transport_keeps_ranks_bit_identical_and_loses_no_mass(world_size):
    results = run_distributed(_every_transport, world_size)
    for name, row in results[0].items():
        assert row["same"], f"{name}: ranks diverged"
        assert set(row["counts"]) == {name.removesuffix("_bf16")}, (name, row["counts"])
        # bf16 values are summed in bf16 by the allreduce: that rounding is not the memory's
        tolerance = 2e-2 if name.endswith("bf16") else 1e-5
        assert row["residual"] <= tolerance * max(row["scale"], 1.0), f"{name}: gradient mass lost"


def _one_bucket_bytes(rank, world_size):
    model = DDP(torch.nn.Linear(1000, 10, bias=False))  # 10,000 fp32 parameters, one bucket
    state = ErrorFeedbackState(compressor=CyclicTopK(0.01), module=model)
    model.register_comm_hook(state, error_feedback_hook)
    model(torch.randn(4, 1000)).sum().backward()
    return state.stats.last_bytes_sent, state._layout_seed(("weight",))


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [2, 3])
def test_shared_index_bytes_every_worker_its_values_the_leader_its_indices(world_size):
    results = run_distributed(_one_bucket_bytes, world_size)
    leader = CyclicTopK.leader(0, results[0][1], world_size)
    for rank, (sent, _) in enumerate(results):
        # 100 fp32 values + the status word; the leader also 100 uint16 indices
        assert sent == 100 * 4 + 4 + (200 if rank == leader else 0)


def _filtered(rank, world_size, beta):
    model = DDP(make_model())
    state = ErrorFeedbackState(compressor=CyclicTopK(0.1, memory_filter=beta), module=model)
    recorder = Recorder(state)
    model.register_comm_hook(state, recorder)
    params = train(model, 5, rank)
    grad_total, out_total, memory = recorder.world_totals()
    # per worker m_T = beta * sum_t (g_t - c_t); summed over the workers, sum_i c_i = n * out
    residual = float((beta * (grad_total - world_size * out_total) - memory).abs().max())
    return _gather(params), residual, float(grad_total.abs().max()), float(memory.abs().sum())


def test_memory_filter_keeps_ranks_identical_and_drops_what_it_says():
    for gathered, residual, scale, memory in run_distributed(_filtered, 2, 0.5):
        assert torch.equal(gathered[0], gathered[1])
        assert memory > 0 and residual <= 1e-5 * max(scale, 1.0), residual


# ---------------------------------------------------------------- the sparse allreduce (opt-in)


def _sparse(rank, world_size):
    torch.manual_seed(0)
    model = DDP(torch.nn.Linear(200, 10, bias=False))  # 2,000 entries, one bucket
    encoding = "delta16" if world_size == 3 else "int32"
    state = ErrorFeedbackState(compressor=ec_hooks.TopK(0.2, index_encoding=encoding), module=model)
    state.transports = (transport.SparseAllreduce(),)
    outputs = []

    def hook(state, bucket):
        grad = bucket.buffer().detach().double().clone()
        return error_feedback_hook(state, bucket).then(
            lambda f: outputs.append((grad, f.value().double())) or f.value()
        )

    model.register_comm_hook(state, hook)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(4):
        g = torch.Generator().manual_seed(100 * rank + step)
        opt.zero_grad()
        model(torch.randn(8, 200, generator=g)).pow(2).sum().backward()
        opt.step()
    grad_total = sum(g for g, _ in outputs)
    out_total = sum(o for _, o in outputs)
    memory = state.memory.state_dict()["weight"].double()
    dist.all_reduce(grad_total)
    dist.all_reduce(memory)
    residual = float((grad_total - world_size * out_total - memory).abs().max())
    return {
        "params": _gather(model.parameters()),
        "residual": residual,
        "scale": float(grad_total.abs().max()),
        "nonzero": [int((o != 0).sum()) for _, o in outputs],
        "own_sent": state.stats.bytes_sent,
    }


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [2, 3, pytest.param(4, marks=pytest.mark.slow)])
def test_sparse_allreduce_keeps_ranks_identical_and_returns_drops_to_the_senders(world_size):
    result = run_distributed(_sparse, world_size)[0]
    assert all(torch.equal(result["params"][0], p) for p in result["params"])
    k = 400
    m = transport.SparseAllreduce.kept_per_worker(k, world_size)
    # re-selection: at most m entries per region, so about k in all, where the workers' own top-k
    # (different data) cover more than k positions: the drops went back to the senders' memories
    assert all(0 < nz <= world_size * m for nz in result["nonzero"]), result["nonzero"]
    assert result["residual"] <= 1e-5 * max(result["scale"], 1.0), result["residual"]


def test_sparse_allreduce_is_chosen_by_bytes_when_added():
    transports = (*ALL, transport.SparseAllreduce())
    f32, topk = torch.float32, ec_hooks.TopK(0.01)
    assert transport.choose(transports, topk, 100_000, f32, 2).name == "allgather"  # a tie: 8k either way
    for n in (4, 8, 64):
        assert transport.choose(transports, topk, 100_000, f32, n).name == "sparse_allreduce"
    # 6k (n - 1) / n entries at most in Ok-Topk; here about 2k (n - 1) / n pairs of 8 bytes
    assert transport.SparseAllreduce().wire_bytes(topk, 100_000, f32, 8) < 2 * 1_000 * 8 + 8 * 7 * 2
    assert not transport.SparseAllreduce().accepts(CyclicTopK(0.01))
    assert not transport.SparseAllreduce().accepts(ec_hooks.RandK(0.01))


# ---------------------------------------------------------------- shared indices chosen from candidates


def test_candidates_keep_the_largest_sums_of_every_workers_nominations():
    # 4 workers simulated with the compressor's own steps; 200,000 entries (gaps above 65535: fillers)
    n, numel = 4, 200_000
    g = torch.Generator().manual_seed(3)
    accs = [torch.randn(numel, generator=g) for _ in range(n)]
    accs[2][123_456] = 50.0  # one worker's strong entry: the leader of another step would miss it
    c = CyclicTopK(0.001, selection="candidates")
    k, m = c.k_for(numel), c.candidates_for(numel, n)
    assert (k, m) == (200, 100)
    messages = torch.stack([c.nominate(a, n) for a in accs])
    assert messages.shape == (n, c.index_bytes(numel, m))
    union = c.union_of(messages, numel, n)
    own = [set(torch.topk(a.abs(), m).indices.tolist()) for a in accs]
    assert set(union.tolist()) == set().union(*own) and torch.equal(union, union.sort().values)
    summed = sum(c.values_at(a, union).data for a in accs)
    kept = c.keep(summed, numel)
    assert kept.numel() == k and 123_456 in union[kept].tolist()
    expected = union[torch.topk(summed.abs(), k).indices].sort().values
    assert torch.equal(union[kept], expected)


def test_candidates_bad_arguments_and_the_factory():
    for kwargs, match in [
        ({"selection": "vote"}, "selection"),
        ({"selection": "candidates", "candidates": 0.5}, "candidates"),
        ({"selection": "candidates", "candidates": True}, "candidates"),
        ({"candidates": 3.0}, "only used with selection='candidates'"),
    ]:
        with pytest.raises(ValueError, match=match):
            CyclicTopK(0.01, **kwargs)
    made = ec_hooks.make_compressor("cyclic_topk", density=0.02, selection="candidates", candidates=3)
    assert (made.selection, made.candidates, made.selects_from_candidates) == ("candidates", 3.0, True)
    assert "selection='candidates'" in repr(made) and not CyclicTopK(0.01).selects_from_candidates
    # ranks that disagree on the selection are told so (the agreement check compares this)
    from ec_hooks.agreement import compressor_config

    assert compressor_config(made) != compressor_config(ec_hooks.make_compressor("cyclic_topk", density=0.02))
    assert CandidateAllreduce().accepts(made) and not SharedIndexAllreduce().accepts(made)
    assert transport.choose(ALL, made, 10_000, torch.float32, 8).name == "candidates"


def test_candidate_bytes_follow_the_formula_and_stay_constant_in_n():
    numel, f32 = 100_000, torch.float32
    c, topk = CyclicTopK(0.01, selection="candidates"), ec_hooks.TopK(0.01)
    wire = {}
    for n in (2, 4, 8):
        m = -(-2 * 1_000 // n)
        index = (n - 1) * -(-2 * (m + 1) // 4) * 4  # m entries + one filler slot, 2 bytes each, padded
        wire[n] = CandidateAllreduce().wire_bytes(c, numel, f32, n)
        assert wire[n] == pytest.approx(index + 2 * (n - 1) / n * (n * m + 1) * 4)
    assert wire[8] <= 1.8 * wire[2]  # a ring allreduce's own growth from 2 to 8 is 1.75x
    assert wire[4] < 0.7 * AllgatherSum().wire_bytes(topk, numel, f32, 4)


def _candidates_one_step(rank, world_size):
    torch.manual_seed(0)
    model = DDP(torch.nn.Linear(1000, 10, bias=False))  # 10,000 fp32 parameters, one bucket
    state = ErrorFeedbackState(compressor=CyclicTopK(0.01, selection="candidates"), module=model)
    model.register_comm_hook(state, error_feedback_hook)
    x = torch.randn(4, 1000, generator=torch.Generator().manual_seed(rank))
    # this worker's own gradient, before the hook replaces it with the aggregate
    local = torch.autograd.grad(model.module(x).pow(2).sum(), model.module.weight)[0].reshape(-1)
    everyone = [torch.empty_like(local) for _ in range(world_size)]
    dist.all_gather(everyone, local.contiguous())
    model(x).pow(2).sum().backward()
    grad = model.module.weight.grad.reshape(-1).clone()
    return {
        "grad": grad,
        "everyone": everyone,
        "memory": state.memory.state_dict()["weight"].reshape(-1),
        "sent": state.stats.last_bytes_sent,
        "counts": dict(state.transport_counts),
    }


@pytest.mark.parametrize("world_size", [2, 3])
def test_candidates_apply_the_k_largest_sums_and_leave_the_rest_in_memory(world_size):
    results = run_distributed(_candidates_one_step, world_size)
    c = CyclicTopK(0.01, selection="candidates")
    k, m = 100, c.candidates_for(10_000, world_size)
    grads = results[0]["everyone"]
    union = torch.unique(torch.cat([torch.topk(gr.abs(), m).indices for gr in grads]))
    summed = sum(gr[union] for gr in grads)
    kept = union[torch.topk(summed.abs(), k).indices]
    expected = torch.zeros(10_000)
    expected[kept] = summed[torch.topk(summed.abs(), k).indices] / world_size
    for rank, r in enumerate(results):
        assert r["counts"] == {"candidates": 1}
        assert torch.allclose(r["grad"], expected, rtol=1e-5, atol=1e-6)
        # this worker's values at the kept entries left its memory; the rest of its offer stayed
        mine = grads[rank].clone()
        mine[kept] = 0
        assert torch.allclose(r["memory"], mine, rtol=0, atol=1e-6)
        # values at the union (+ status word), plus this worker's nominations
        assert r["sent"] == 4 * (union.numel() + 1) + c.index_bytes(10_000, m)
