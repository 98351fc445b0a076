"""The Mem-SGD DDP hook on real gloo processes (2 and 3 ranks)."""

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import ec_hooks
from ec_hooks import ErrorFeedbackState, error_feedback_hook, local_hook

from .distributed import run_distributed


class Net(torch.nn.Module):
    def __init__(self, unused_branch=False):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(10, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
        # a parameter that never gets a gradient (find_unused_parameters)
        self.unused = torch.nn.Linear(4, 4) if unused_branch else None

    def forward(self, x):
        return self.body(x)


def make_model(seed=0, dtype=torch.float32, unused_branch=False):
    torch.manual_seed(seed)
    return Net(unused_branch).to(dtype)


def batch(rank, step, dtype=torch.float32):
    g = torch.Generator().manual_seed(1000 * rank + step)
    return torch.randn(8, 10, generator=g).to(dtype), torch.randint(0, 3, (8,), generator=g)


def train(ddp, steps, rank, dtype=torch.float32, lr=0.1, record=None):
    opt = torch.optim.SGD(ddp.parameters(), lr=lr)
    for step in range(steps):
        x, y = batch(rank, step, dtype)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(ddp(x).float(), y).backward()
        if record is not None:
            record.append([p.grad.detach().clone() for p in ddp.parameters()])
        opt.step()
    return [p.detach().clone() for p in ddp.parameters()]


def _gather(tensors):
    flat = torch.cat([t.reshape(-1).float() for t in tensors])
    out = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(out, flat)
    return out


# ---------------------------------------------------------------- equivalence with DDP's allreduce


def _equivalence(rank, world_size, dtype):
    results = {}
    reference = DDP(make_model(dtype=dtype))
    ref_grads = []
    ref_params = train(reference, 3, rank, dtype, record=ref_grads)
    for name, compressor in [
        ("identity", ec_hooks.Identity()),
        ("topk1", ec_hooks.TopK(1.0)),
        ("randk1", ec_hooks.RandK(1.0)),
    ]:
        model = DDP(make_model(dtype=dtype))
        model.register_comm_hook(ErrorFeedbackState(compressor=compressor, module=model), error_feedback_hook)
        grads = []
        params = train(model, 3, rank, dtype, record=grads)
        results[name] = (
            max(float((a - b).abs().max()) for gs, rs in zip(grads, ref_grads) for a, b in zip(gs, rs)),
            max(float((a - b).abs().max()) for a, b in zip(params, ref_params)),
        )
    return results


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [2, 3])
def test_density_one_and_identity_equal_ddp_allreduce(world_size):
    for per_rank in run_distributed(_equivalence, world_size, torch.float32):
        for name, (grad_err, param_err) in per_rank.items():
            assert grad_err <= 1e-6, name
            assert param_err <= 1e-6, name


def test_identity_equals_ddp_allreduce_in_bf16():
    for per_rank in run_distributed(_equivalence, 2, torch.bfloat16):
        assert per_rank["identity"] == (0.0, 0.0)


# ---------------------------------------------------------------- every compressor: ranks agree, mass conserved

COMPRESSORS = {
    "topk": lambda: ec_hooks.TopK(0.1),
    "randk": lambda: ec_hooks.RandK(0.1, seed=1),
    "sign": lambda: ec_hooks.ScaledSign(),
    "qsgd": lambda: ec_hooks.QSGD.from_bits(4),
    "fp16": lambda: ec_hooks.FP16(),
}


class Recorder:
    """Wraps the hook to see each bucket's local gradient and aggregated result."""

    def __init__(self, state):
        self.__name__ = self.__qualname__ = "recorder"  # DDP logs the hook's name
        self.state = state
        self.grad_sum = {}
        self.out_sum = {}

    def __call__(self, state, bucket):
        grads = bucket.buffer().detach().double().clone()
        params = bucket.parameters()

        def keep(fut):
            out = fut.value()
            for p, g_p, o_p in zip(
                params,
                grads.split([p.numel() for p in params]),
                out.double().split([p.numel() for p in params]),
            ):
                key = state._key(p)
                self.grad_sum[key] = self.grad_sum.get(key, 0) + g_p
                self.out_sum[key] = self.out_sum.get(key, 0) + o_p
            return out

        return error_feedback_hook(state, bucket).then(keep)

    def world_totals(self):
        """(sum over steps and workers of the gradients, this worker's sum of the hook's outputs,
        sum over workers of the memories), in parameter-key order: the terms of the conservation
        invariant.  Collective."""
        memories = self.state.memory.state_dict()
        keys = sorted(self.grad_sum)
        grad_total = torch.cat([self.grad_sum[k] for k in keys])
        out_total = torch.cat([self.out_sum[k] for k in keys])
        memory = torch.cat([memories[k].double() for k in keys])
        dist.all_reduce(grad_total)
        dist.all_reduce(memory)
        return grad_total, out_total, memory


def _all_compressors(rank, world_size):
    report = {}
    for name, build in COMPRESSORS.items():
        model = DDP(make_model(), bucket_cap_mb=0.0005)  # several buckets
        state = ErrorFeedbackState(compressor=build(), module=model)
        recorder = Recorder(state)
        model.register_comm_hook(state, recorder)
        params = train(model, 6, rank)
        gathered = _gather(params)
        same = all(torch.equal(gathered[0], g) for g in gathered)
        # conservation over all workers: sum_t sum_i g_i = n * sum_t out + sum_i m_i
        grad_total, out_total, memory = recorder.world_totals()
        residual = (grad_total - world_size * out_total - memory).abs().max()
        report[name] = (same, float(residual), float(grad_total.abs().max()), state.stats.as_dict())
    return report


@pytest.mark.parametrize("world_size", [2, pytest.param(3, marks=pytest.mark.slow)])
def test_every_compressor_keeps_ranks_identical_and_loses_no_mass(world_size):
    for per_rank in run_distributed(_all_compressors, world_size):
        for name, (same, residual, scale, stats) in per_rank.items():
            assert same, f"{name}: ranks diverged"
            # fp16 payloads are summed in fp16 by the allreduce itself: that rounding is not memory's
            tolerance = 2e-3 if name == "fp16" else 1e-5
            assert residual <= tolerance * max(scale, 1.0), f"{name}: gradient mass lost ({residual})"
            assert stats["steps"] == 6
            assert stats["compression_ratio"] > 1.0, name


def _single_worker_invariant(rank, world_size):
    """With one worker the hook's output is C(acc) itself: sum g = sum C + m exactly."""
    model = DDP(make_model())
    state = ErrorFeedbackState(compressor=ec_hooks.TopK(0.05), module=model)
    recorder = Recorder(state)
    model.register_comm_hook(state, recorder)
    train(model, 20, rank)
    memories = state.memory.state_dict()
    return max(
        float((recorder.grad_sum[k] - recorder.out_sum[k] - memories[k].double()).abs().max())
        for k in memories
    )


def test_conservation_invariant_single_worker():
    assert run_distributed(_single_worker_invariant, 1)[0] < 1e-6


# ---------------------------------------------------------------- rand-k agreement, RNG untouched


def _randk_indices(rank, world_size):
    model = DDP(make_model())
    state = ErrorFeedbackState(compressor=ec_hooks.RandK(0.2, seed=5), module=model)
    seen = []

    def spy(state, bucket):
        payload = state.compressor.compress(bucket.buffer(), step=state.iteration, key=bucket.index())
        seen.append(payload.indices.clone())
        return error_feedback_hook(state, bucket)

    model.register_comm_hook(state, spy)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    train(model, 3, rank)
    unchanged = torch.equal(before, torch.get_rng_state())
    return unchanged, torch.cat(seen)


@pytest.mark.slow
def test_randk_indices_agree_across_ranks_and_global_rng_is_untouched():
    results = run_distributed(_randk_indices, 3)
    assert all(unchanged for unchanged, _ in results)
    assert all(torch.equal(results[0][1], idx) for _, idx in results)


# ---------------------------------------------------------------- checkpoints across bucket layouts


def _resume(rank, world_size, cap_a, cap_b):
    def fresh(cap):
        model = DDP(make_model(), bucket_cap_mb=cap)
        state = ErrorFeedbackState(compressor=ec_hooks.TopK(0.1), module=model)
        model.register_comm_hook(state, error_feedback_hook)
        return model, state

    model, state = fresh(cap_a)
    train(model, 4, rank)
    saved_state = state.state_dict()
    saved_params = [p.detach().clone() for p in model.parameters()]
    # reload into another layout; a zero gradient step must send exactly the memory's top entries
    # and keep the rest, parameter by parameter
    model_b, state_b = fresh(cap_b)
    with torch.no_grad():
        for p, q in zip(model_b.parameters(), saved_params):
            p.copy_(q)
    state_b.load_state_dict(saved_state)
    before = state_b.memory.state_dict()
    x, _ = batch(rank, 0)
    (model_b(x).sum() * 0).backward()
    after = state_b.memory.state_dict()
    # the new gradient is the mean of the C_i, so sum_i m_i(before) - sum_i m_i(after) = n * grad
    sent = {k: p.grad.detach().reshape(-1) for k, p in model_b.module.named_parameters()}
    drift = {}
    for key in before:
        total_before = before[key].double().clone()
        total_after = after[key].double().clone()
        dist.all_reduce(total_before)
        dist.all_reduce(total_after)
        drift[key] = float((total_before - total_after - world_size * sent[key].double()).abs().max())
    return saved_state["iteration"], state_b.iteration, max(drift.values()), state_b.memory.norm() > 0


@pytest.mark.slow
@pytest.mark.parametrize("caps", [(25.0, 0.0002), (0.0002, 25.0)])
def test_state_dict_loads_into_another_bucket_layout(caps):
    for saved_iter, loaded_iter, drift, nonzero in run_distributed(_resume, 2, *caps):
        assert saved_iter == 4 and loaded_iter == 5
        assert drift < 1e-6
        assert nonzero


def _exact_resume(rank, world_size):
    def fresh():
        model = DDP(make_model(), bucket_cap_mb=0.0005)
        state = ErrorFeedbackState(compressor=ec_hooks.TopK(0.1), module=model)
        model.register_comm_hook(state, error_feedback_hook)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        return model, state, opt

    def steps(model, opt, start, stop):
        for step in range(start, stop):
            x, y = batch(rank, step)
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()

    model, state, opt = fresh()
    steps(model, opt, 0, 8)
    straight = [p.detach().clone() for p in model.parameters()]

    model, state, opt = fresh()
    steps(model, opt, 0, 4)
    checkpoint = {"model": model.state_dict(), "opt": opt.state_dict(), "hook": state.state_dict()}
    checkpoint = torch.load(_roundtrip(checkpoint), weights_only=False)
    model, state, opt = fresh()
    model.load_state_dict(checkpoint["model"])
    opt.load_state_dict(checkpoint["opt"])
    state.load_state_dict(checkpoint["hook"])
    steps(model, opt, 4, 8)
    resumed = [p.detach().clone() for p in model.parameters()]
    return max(float((a - b).abs().max()) for a, b in zip(straight, resumed))


def _roundtrip(obj):
    import io

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return buffer


@pytest.mark.slow
def test_resume_from_state_dict_is_exact():
    assert run_distributed(_exact_resume, 2) == [0.0, 0.0]


# ---------------------------------------------------------------- non-finite gradients


def _inf_step(rank, world_size):
    model = DDP(make_model())
    state = ErrorFeedbackState(compressor=ec_hooks.TopK(0.1), module=model)
    outputs = []

    def poison(state, bucket):
        if state.iteration == 2 and rank == 0:
            bucket.buffer()[3] = float("inf")
        return error_feedback_hook(state, bucket).then(
            lambda f: outputs.append(f.value().clone()) or f.value()
        )

    model.register_comm_hook(state, poison)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    memories = []
    for step in range(4):
        x, y = batch(rank, step)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        memories.append(state.memory.state_dict())
        if all(torch.isfinite(p.grad).all() for p in model.parameters()):
            opt.step()
    finite = all(torch.isfinite(t).all() for m in memories for t in m.values())
    unchanged = max(float((memories[1][k] - memories[2][k]).abs().max()) for k in memories[1])
    return finite, unchanged, bool(torch.isnan(outputs[2]).all()), bool(torch.isfinite(outputs[3]).all())


@pytest.mark.slow
def test_inf_gradient_never_enters_memory_and_voids_the_step_everywhere():
    for finite, unchanged, step_voided, next_ok in run_distributed(_inf_step, 3):
        assert finite
        assert unchanged < 1e-6
        assert step_voided and next_ok


# ---------------------------------------------------------------- DDP options


def _ddp_options(rank, world_size):
    out = {}
    # gradient_as_bucket_view + find_unused_parameters + no_sync accumulation
    model = DDP(make_model(unused_branch=True), gradient_as_bucket_view=True, find_unused_parameters=True)
    state = ErrorFeedbackState(compressor=ec_hooks.TopK(0.2), module=model)
    model.register_comm_hook(state, error_feedback_hook)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(3):
        opt.zero_grad()
        with model.no_sync():
            x, y = batch(rank, 100 + step)
            torch.nn.functional.cross_entropy(model(x), y).backward()
        x, y = batch(rank, step)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    out["iterations"] = state.iteration
    out["params"] = _gather(list(model.parameters()))
    # warm-up: plain allreduce, no memory
    warm = DDP(make_model())
    warm_state = ErrorFeedbackState(compressor=ec_hooks.TopK(0.1), start_iter=2, module=warm)
    warm.register_comm_hook(warm_state, error_feedback_hook)
    train(warm, 2, rank)
    out["warm_memory"] = warm_state.memory.norm()
    out["warm_ratio"] = warm_state.stats.compression_ratio
    train(warm, 1, rank)
    out["after_warm_ratio"] = warm_state.stats.last_compression_ratio
    # local hook: nothing communicated, gradients differ across ranks
    local = DDP(make_model())
    local.register_comm_hook(None, local_hook)
    grads = []
    train(local, 1, rank, record=grads)
    out["local"] = _gather(grads[0])
    return out


@pytest.mark.slow
def test_ddp_options_warmup_and_local_hook():
    results = run_distributed(_ddp_options, 2)
    for r in results:
        assert r["iterations"] == 3
        assert all(torch.equal(r["params"][0], p) for p in r["params"])
        assert r["warm_memory"] == 0.0 and r["warm_ratio"] == 1.0
        assert r["after_warm_ratio"] > 2.0
    assert not torch.equal(results[0]["local"][0], results[0]["local"][1])


# ---------------------------------------------------------------- stats, bad input


def _stats(rank, world_size):
    model = DDP(torch.nn.Linear(1000, 10, bias=False))  # 10,000 fp32 parameters, one bucket
    state = ErrorFeedbackState(compressor=ec_hooks.TopK(0.01), module=model)
    model.register_comm_hook(state, error_feedback_hook)
    model(torch.randn(4, 1000)).sum().backward()
    return state.stats.as_dict()


@pytest.mark.slow
def test_stats_report_bytes_and_ratio():
    stats = run_distributed(_stats, 2)[0]
    assert stats["last_bytes_dense"] == 40_000
    assert stats["last_bytes_sent"] == 100 * 8 + 4  # 100 (index, value) pairs + status word
    assert stats["compression_ratio"] == pytest.approx(40_000 / 804)
    assert stats["density"] == pytest.approx(0.01)
    assert stats["residual_norm"] > 0


def _bytes_for_densities(rank, world_size, densities):
    sent = []
    for density in densities:  # one model each, in one launch
        model = DDP(torch.nn.Linear(1000, 10, bias=False))  # 10,000 fp32 parameters, one bucket
        state = ErrorFeedbackState(compressor=ec_hooks.TopK(density), module=model)
        model.register_comm_hook(state, error_feedback_hook)
        model(torch.randn(4, 1000)).sum().backward()
        sent.append(state.stats.last_bytes_sent)
    return sent


@pytest.mark.slow
def test_allgather_until_it_outweighs_a_ring_allreduce_then_dense():
    # 3 ranks, 40,000 dense bytes: top-k payloads of 8 bytes per entry are allgathered while
    # 3 * payload <= 2 * 40,000, i.e. up to about 3,333 entries (density 0.33).
    allgathered, dense = run_distributed(_bytes_for_densities, 3, [0.3, 0.4])[0]
    assert allgathered == 3_000 * 8 + 4
    assert dense == 40_000 + 4


def _residual_after_rebuild(rank, world_size):
    model = DDP(make_model(), bucket_cap_mb=0.0005)  # several buckets, rebuilt after step 1
    state = ErrorFeedbackState(compressor=ec_hooks.TopK(0.1), module=model)
    model.register_comm_hook(state, error_feedback_hook)
    train(model, 4, rank)
    reported, true = state.stats.residual_norm, state.memory.norm()
    state.rescale_memories(0.25)  # a GradScaler backed off twice
    with pytest.raises(ValueError, match="factor"):
        state.rescale_memories(float("inf"))
    return reported, true, state.memory.norm()


def test_residual_norm_counts_each_memory_once_across_the_bucket_rebuild():
    for reported, true, rescaled in run_distributed(_residual_after_rebuild, 2):
        assert true > 0
        assert reported == pytest.approx(true, rel=1e-5)
        assert rescaled == pytest.approx(true / 4, rel=1e-6)


def _bad_state(rank, world_size):
    errors = {}
    for kwargs in ({"start_iter": -1}, {"compressor": "zip"}, {"dense_fallback": "yes"}):
        try:
            ErrorFeedbackState(**kwargs)
        except ValueError as exc:
            errors[next(iter(kwargs))] = str(exc)
    model = DDP(make_model())
    state = ErrorFeedbackState(module=model)
    try:
        state.load_state_dict(
            {"memories": {"weight": torch.zeros(9)}, "world_size": world_size, "rank": rank}
        )
    except ValueError as exc:
        errors["other_model"] = str(exc)
    try:
        state.load_state_dict({"memories": {}, "world_size": world_size + 1, "rank": rank})
    except ValueError as exc:
        errors["world_size"] = str(exc)
    try:
        state.load_state_dict({"memories": {}, "world_size": world_size, "rank": 1 - rank})
    except ValueError as exc:
        errors["rank"] = str(exc)
    return errors


@pytest.mark.slow
def test_bad_arguments_raise_at_construction_or_load():
    errors = run_distributed(_bad_state, 2)[0]
    assert "start_iter" in errors["start_iter"]
    assert "compressor" in errors["compressor"]
    assert "dense_fallback" in errors["dense_fallback"]
    assert "does not have" in errors["other_model"]
    assert "world_size" in errors["world_size"]
    assert "rank" in errors["rank"]


def test_state_needs_a_process_group():
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="init_process_group"):
        ErrorFeedbackState()
