"""Momentum correction (DGC) in the Mem-SGD hook, on real gloo processes (1, 2 and 3 ranks)."""

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import ec_hooks
from ec_hooks import ErrorFeedbackState, error_feedback_hook
from ec_hooks.kernels import topk_magnitude_reference
from ec_hooks.momentum import MomentumCorrection
from ec_hooks.warmup import DensityWarmup, warmup_density

from .distributed import run_distributed
from .test_hooks import batch, make_model


def _train(model, state, rank, steps, opt, record=None, poison_at=None):
    def hook(state, bucket):
        if record is not None:
            record["grads"].append(bucket.buffer().detach().clone())
            record["u_before"].append(_flat(state.momentum_correction.velocity.state_dict()))
        if poison_at is not None and state.iteration == poison_at and rank == 0:
            bucket.buffer()[3] = float("inf")

        def keep(fut):
            if record is not None:
                record["out"].append(fut.value().detach().clone())
            return fut.value()

        return error_feedback_hook(state, bucket).then(keep)

    model.register_comm_hook(state, hook)
    for step in range(steps):
        x, y = batch(rank, step)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        if all(torch.isfinite(p.grad).all() for p in model.parameters()):
            opt.step()
    return [p.detach().clone() for p in model.parameters()]


def _flat(tensors: dict) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors.values()]) if tensors else torch.zeros(0)


# ---------------------------------------------------------------- dense: exactly momentum SGD


def _dense_equals_sgd(rank, world_size):
    return [
        _dense_case(rank, nesterov, weight_decay) for nesterov, weight_decay in ((False, 0.0), (True, 0.01))
    ]


def _dense_case(rank, nesterov, weight_decay):
    out = {}
    reference = DDP(make_model())
    opt = torch.optim.SGD(
        reference.parameters(), lr=0.1, momentum=0.9, nesterov=nesterov, weight_decay=weight_decay
    )
    out["sgd"] = _train_plain(reference, rank, opt)
    model = DDP(make_model())
    state = ErrorFeedbackState(
        compressor=ec_hooks.Identity(),
        module=model,
        momentum=0.9,
        nesterov=nesterov,
        weight_decay=weight_decay,
    )
    out["hook"] = _train(model, state, rank, 6, torch.optim.SGD(model.parameters(), lr=0.1))
    return out


def _train_plain(model, rank, opt, steps=6):
    for step in range(steps):
        x, y = batch(rank, step)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [2, 3])
def test_dense_momentum_correction_is_momentum_sgd(world_size):
    # Identity sends every entry approximately-free and masks nothing: the mean of the
    # velocities is the velocity of the mean, so this is torch's SGD with momentum.
    for per_rank in run_distributed(_dense_equals_sgd, world_size):
        for case in per_rank:  # plain, and Nesterov with weight decay
            for a, b in zip(case["sgd"], case["hook"]):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- top-k: DGC transcribed


def _dgc_reference(grads_per_rank, k, momentum, nesterov, masking):
    """DGC's memory (Lin et al. 2018, as in the authors' DGCSGDMemory) on every rank: the mean
    of the sent tensors per step."""
    n, steps = len(grads_per_rank), len(grads_per_rank[0])
    u = [torch.zeros_like(grads_per_rank[0][0]) for _ in range(n)]
    v = [torch.zeros_like(grads_per_rank[0][0]) for _ in range(n)]
    means = []
    for t in range(steps):
        total = torch.zeros_like(u[0])
        for i in range(n):
            g = grads_per_rank[i][t]
            if nesterov:
                u[i] = momentum * (u[i] + g)
                v[i] = v[i] + u[i] + g
            else:
                u[i] = momentum * u[i] + g
                v[i] = v[i] + u[i]
            idx = topk_magnitude_reference(v[i], k)
            total[idx] += v[i][idx]
            v[i][idx] = 0
            if masking:
                u[i][idx] = 0
        means.append(total / n)
    return means


def _one_parameter_model():
    # one parameter: the bucket keeps its layout through DDP's rebuild, so flat indices of
    # buckets and of the state's (per-parameter) tensors compare across steps
    torch.manual_seed(0)
    return torch.nn.Linear(10, 3, bias=False)


def _topk_records(rank, world_size):
    return [_topk_record(rank, nesterov, masking) for nesterov, masking in ((False, True), (True, False))]


def _topk_record(rank, nesterov, masking):
    model = DDP(_one_parameter_model())
    state = ErrorFeedbackState(
        compressor=ec_hooks.TopK(0.1), module=model, momentum=0.9, nesterov=nesterov, momentum_masking=masking
    )
    record = {"grads": [], "u_before": [], "out": []}
    _train(model, state, rank, 6, torch.optim.SGD(model.parameters(), lr=0.1), record)
    grads = [torch.stack(g) for g in zip(*[_all(t) for t in record["grads"]])]
    return grads, record["out"], state.memory.state_dict(), state.momentum_correction.velocity.state_dict()


def _all(t):
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t.contiguous())
    return out


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [2, 3])
def test_topk_matches_a_transcription_of_dgc(world_size):
    for case, (nesterov, masking) in enumerate(((False, True), (True, False))):
        results = [per_rank[case] for per_rank in run_distributed(_topk_records, world_size)]
        grads, outputs, _, _ = results[0]
        k = ec_hooks.TopK(0.1).k_for(grads[0][0].numel())
        expected = _dgc_reference([list(g) for g in grads], k, 0.9, nesterov, masking)
        for rank_result in results:
            for step, (want, got) in enumerate(zip(expected, rank_result[1])):
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7, msg=f"step {step}")
        # masked velocities are exactly 0 where sent, and most are not
        zeros = int((_flat(results[0][3]) == 0).sum())
        assert (0 < zeros < k * 6) if masking else zeros == 0


# ---------------------------------------------------------------- conservation with the velocity


def _invariants(rank, world_size):
    compressors = {
        "topk": ec_hooks.TopK(0.1),
        "randk": ec_hooks.RandK(0.1),
        "sign": ec_hooks.ScaledSign(),
        "topk_delta16": ec_hooks.TopK(0.1, index_encoding="delta16", value_dtype="bf16"),
    }
    return {
        (name, nesterov): _invariant(compressor, nesterov)
        for name, compressor in compressors.items()
        for nesterov in (False, True)
    }


def _invariant(compressor, nesterov):
    model = DDP(_one_parameter_model())
    # with masking: the velocity is changed between steps, and the invariant still holds
    state = ErrorFeedbackState(
        compressor=compressor, module=model, momentum=0.9, nesterov=nesterov, momentum_masking=True
    )
    record = {"grads": [], "u_before": [], "out": []}
    _train(model, state, 0, 8, torch.optim.SGD(model.parameters(), lr=0.05), record)
    mu = 0.9
    fed = torch.zeros_like(record["grads"][0])
    for g, u_prev in zip(record["grads"], record["u_before"]):
        u_new = mu * (u_prev if u_prev.numel() else torch.zeros_like(g)) + g
        fed += g + mu * u_new if nesterov else u_new
    sent = torch.stack(record["out"]).sum(0)  # one worker: the mean is what it sent
    return float((fed - sent - _flat(state.memory.state_dict())).abs().max()), float(fed.abs().max())


def test_conservation_invariant_with_the_velocity():
    results = run_distributed(_invariants, 1)[0]
    assert len(results) == 8
    for (name, nesterov), (error, scale) in results.items():
        # sum_t s_t = sum_t C(acc_t) + m_T, with s_t the velocity fed at step t
        assert error < 1e-5 * scale, (name, nesterov, error, scale)


# ---------------------------------------------------------------- overflow voids the velocity too


def _four_steps_skipping_overflows(model, state, opt, rank, velocities, memories):
    """Four steps; after each, the velocity and memory; the optimizer skips a non-finite step."""
    for step in range(4):
        x, y = batch(rank, step)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        velocities.append(_flat(state.momentum_correction.velocity.state_dict()))
        memories.append(_flat(state.memory.state_dict()))
        if all(torch.isfinite(p.grad).all() for p in model.parameters()):
            opt.step()


def _overflow(rank, world_size):
    model = DDP(make_model())
    state = ErrorFeedbackState(compressor=ec_hooks.TopK(0.1), module=model, momentum=0.9, clip_norm=0.5)
    velocities, memories, outputs = [], [], []

    def hook(state, bucket):
        if state.iteration == 2 and rank == 0:
            bucket.buffer()[3] = float("inf")
        return error_feedback_hook(state, bucket).then(
            lambda f: outputs.append(f.value().clone()) or f.value()
        )

    model.register_comm_hook(state, hook)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    _four_steps_skipping_overflows(model, state, opt, rank, velocities, memories)
    return velocities, memories, outputs


@pytest.mark.slow
def test_overflow_step_leaves_velocity_and_memory_untouched_on_every_rank():
    for velocities, memories, outputs in run_distributed(_overflow, 3):
        assert torch.isnan(outputs[2]).all() and torch.isfinite(outputs[3]).all()
        assert torch.equal(velocities[1], velocities[2])
        torch.testing.assert_close(memories[1], memories[2], rtol=0, atol=1e-6)
        assert not torch.equal(velocities[2], velocities[3])
        assert all(torch.isfinite(v).all() for v in velocities + memories)


# ---------------------------------------------------------------- AMP: loss scale and its changes


def _loss_scaled(rank, world_size, scales):
    """Train with the loss multiplied by scales[t] (powers of 2: exact), gradients unscaled before the
    step and the state rescaled whenever the scale changes; return the parameters."""
    model = DDP(make_model())
    state = ErrorFeedbackState(
        compressor=ec_hooks.TopK(0.1), module=model, momentum=0.9, nesterov=True, clip_norm=0.3 * scales[0]
    )
    model.register_comm_hook(state, error_feedback_hook)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step, scale in enumerate(scales):
        if step and scale != scales[step - 1]:
            state.rescale_memories(scale / scales[step - 1])
        x, y = batch(rank, step)
        opt.zero_grad()
        (scale * torch.nn.functional.cross_entropy(model(x), y)).backward()
        for p in model.parameters():
            p.grad /= scale
        opt.step()
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


@pytest.mark.slow
def test_loss_scale_changes_are_exact_with_rescaled_velocities_and_clip():
    plain = run_distributed(_loss_scaled, 2, [1.0] * 6)
    scaled = run_distributed(_loss_scaled, 2, [1024.0, 1024.0, 512.0, 512.0, 2048.0, 2048.0])
    for a, b in zip(plain, scaled):
        assert torch.equal(a, b)


# ---------------------------------------------------------------- state dict, checks, warm-up


def _state_roundtrip(rank, world_size):
    model = DDP(make_model())
    state = ErrorFeedbackState(compressor=ec_hooks.TopK(0.1), module=model, momentum=0.9)
    _train(model, state, rank, 3, torch.optim.SGD(model.parameters(), lr=0.1))
    sd = state.state_dict()
    errors = {}
    for name, kwargs in (
        ("none", {}),
        ("other", {"momentum": 0.8}),
        ("masking", {"momentum": 0.9, "momentum_masking": True}),
    ):
        try:
            ErrorFeedbackState(compressor=ec_hooks.TopK(0.1), module=model, **kwargs).load_state_dict(sd)
        except ValueError as exc:
            errors[name] = str(exc)
    bad = dict(sd, velocities={"body.0.weight": torch.zeros(3)})
    try:
        ErrorFeedbackState(compressor=ec_hooks.TopK(0.1), module=model, momentum=0.9).load_state_dict(bad)
    except ValueError as exc:
        errors["shape"] = str(exc)
    fresh = ErrorFeedbackState(compressor=ec_hooks.TopK(0.1), module=model, momentum=0.9)
    fresh.load_state_dict(sd)
    return sd, errors, fresh.state_dict()


def test_velocities_are_in_the_state_dict_by_name_and_checked_on_load():
    sd, errors, reloaded = run_distributed(_state_roundtrip, 2)[0]
    assert (
        set(sd["velocities"])
        == set(sd["memories"])
        == {"body.0.weight", "body.0.bias", "body.2.weight", "body.2.bias"}
    )
    assert all(v.abs().sum() > 0 for v in sd["velocities"].values())
    assert all(torch.equal(sd["velocities"][k], reloaded["velocities"][k]) for k in sd["velocities"])
    assert set(errors) == {"none", "other", "masking", "shape"}
    assert "momentum_correction" in errors["none"] and "momentum" in errors["other"]
    assert "has 3 entries" in errors["shape"]


def _bad_arguments(rank, world_size):
    errors = {}
    cases = {
        "momentum_one": {"momentum": 1.0},
        "momentum_negative": {"momentum": -0.1},
        "momentum_str": {"momentum": "0.9"},
        "nesterov_no_momentum": {"nesterov": True},
        "nesterov_int": {"momentum": 0.9, "nesterov": 1},
        "weight_decay": {"weight_decay": -1e-4},
        "clip_zero": {"clip_norm": 0.0},
        "clip_nan": {"clip_norm": float("nan")},
        "warmup_sign": {"compressor": ec_hooks.ScaledSign(), "density_warmup_steps": 10},
        "warmup_negative": {"density_warmup_steps": -1},
        "masking": {"momentum": 0.9, "momentum_masking": "yes"},
        "warmup_start_zero": {"density_warmup_steps": 10, "density_warmup_start": 0},
        "warmup_start_above_one": {"density_warmup_start": 1.5},
        "tail_str": {"momentum": 0.9, "send_momentum_tail": "yes"},
        "tail_and_masking": {"momentum": 0.9, "send_momentum_tail": True, "momentum_masking": True},
        "tail_no_momentum": {"weight_decay": 1e-4, "send_momentum_tail": True},
    }
    for name, kwargs in cases.items():
        try:
            ErrorFeedbackState(**kwargs)
        except ValueError as exc:
            errors[name] = str(exc)
    return errors


def test_bad_momentum_arguments_raise_at_construction():
    errors = run_distributed(_bad_arguments, 1)[0]
    assert set(errors) == {
        "momentum_one",
        "momentum_negative",
        "momentum_str",
        "nesterov_no_momentum",
        "nesterov_int",
        "weight_decay",
        "clip_zero",
        "clip_nan",
        "warmup_sign",
        "warmup_negative",
        "masking",
        "warmup_start_zero",
        "warmup_start_above_one",
        "tail_str",
        "tail_and_masking",
        "tail_no_momentum",
    }
    assert all(
        "send_momentum_tail" in errors[name] for name in ("tail_str", "tail_and_masking", "tail_no_momentum")
    )
    assert "density_warmup_start must be a float in (0, 1]" in errors["warmup_start_zero"]
    assert "1.5" in errors["warmup_start_above_one"]
    assert "momentum must be a float in [0, 1)" in errors["momentum_one"]
    assert "density_warmup_steps" in errors["warmup_sign"] and "ScaledSign" in errors["warmup_sign"]
    assert "clip_norm" in errors["clip_zero"] and "weight_decay" in errors["weight_decay"]


def test_warmup_density_ramp():
    # 25% -> 6.25% -> 1.5625% -> 0.390625% over 40 steps for a 0.1% target, then the target
    assert [warmup_density(t, 0.001, 40) for t in (0, 9, 10, 19, 20, 29, 30, 39, 40, 1000)] == [
        0.25,
        0.25,
        0.0625,
        0.0625,
        0.015625,
        0.015625,
        0.00390625,
        0.00390625,
        0.001,
        0.001,
    ]
    assert [warmup_density(t, 0.01, 30) for t in (0, 9, 10, 19, 20, 29, 30)] == [
        0.25,
        0.25,
        0.0625,
        0.0625,
        0.015625,
        0.015625,
        0.01,
    ]
    assert warmup_density(0, 0.5, 30) == 0.5
    ramp = DensityWarmup(ec_hooks.TopK(0.01, index_encoding="delta16"), 30)
    assert ramp.at(0).density == 0.25 and ramp.at(0).index_encoding == "delta16"
    assert ramp.at(0) is ramp.at(1) and ramp.at(30) is ramp.compressor and ramp.compressor.density == 0.01
    # a ramp that starts at 6.25%: 6.25% -> 1.5625% -> 0.390625% over 66 steps for a 0.1% target
    assert [warmup_density(t, 0.001, 66, start=0.0625) for t in (0, 21, 22, 43, 44, 65, 66)] == [
        0.0625,
        0.0625,
        0.015625,
        0.015625,
        0.00390625,
        0.00390625,
        0.001,
    ]
    assert warmup_density(0, 0.1, 66, start=0.0625) == 0.1  # the target is above the start: no ramp
    assert DensityWarmup(ec_hooks.TopK(0.01), 30, start=0.0625).at(14).density == 0.0625
    assert DensityWarmup(ec_hooks.TopK(0.01), 30, start=0.0625).at(15).density == 0.015625


def _warmup_bytes(rank, world_size):
    out = []
    for steps, start in ((6, 0.25), (4, 0.0625)):
        torch.manual_seed(0)
        model = DDP(torch.nn.Linear(100, 100))  # one bucket of 10,100 entries
        state = ErrorFeedbackState(
            compressor=ec_hooks.TopK(0.01),
            module=model,
            momentum=0.9,
            density_warmup_steps=steps,
            density_warmup_start=start,
        )
        model.register_comm_hook(state, error_feedback_hook)
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        sent = []
        for step in range(8):
            opt.zero_grad()
            x = torch.randn(4, 100, generator=torch.Generator().manual_seed(step * 10 + rank))
            model(x).pow(2).mean().backward()
            opt.step()
            sent.append(state.stats.last_bytes_sent)
        out.append(sent)
    return out


def test_density_warmup_counts_its_bytes():
    d = 10_100
    dgc, from_6 = run_distributed(_warmup_bytes, 2)[0]
    # 3 stages (25%, 6.25%, 1.5625%) of 2 steps, then 1%; 8 bytes per entry plus the status word
    k = ec_hooks.TopK(0.01).k_for(d)
    assert dgc == [8 * k + 4 for k in (2525, 632, 158, k) for _ in range(2)]
    # from 6.25%: 2 stages (6.25%, 1.5625%) of 2 steps, then 1%
    assert from_6 == [8 * k + 4 for k in (632, 632, 158, 158, k, k, k, k)]


def test_sent_indices_capability():
    x = torch.zeros(200_000)
    x[[5, 150_000]] = torch.tensor([3.0, -2.0])
    compact = ec_hooks.TopK(2 / 200_000, index_encoding="delta16")
    payload = compact.compress(x)
    assert compact.slots_for(x.numel()) > 2  # fillers bridge the gap ...
    assert compact.sent_indices(payload).tolist() == [5, 150_000]  # ... but are not sent entries
    topk = ec_hooks.TopK(2 / 200_000)
    assert topk.sent_indices(topk.compress(x)).tolist() == [5, 150_000]
    randk = ec_hooks.RandK(0.001)
    p = randk.compress(x, step=1, key=2)
    assert torch.equal(randk.sent_indices(p), p.indices)
    for dense in (ec_hooks.ScaledSign(), ec_hooks.QSGD(), ec_hooks.FP16(), ec_hooks.Identity()):
        assert dense.sent_indices(dense.compress(x)) is None


def test_momentum_correction_masks_only_when_asked():
    for masking, zeros in ((True, 2), (False, 0)):
        mc = MomentumCorrection(0.5, masking=masking)
        update = mc.step(["w"], [4], torch.tensor([1.0, 2.0, 3.0, 4.0]))
        mc.commit(update, torch.tensor(True), torch.tensor([1, 3]))
        assert int((mc.velocity.state_dict()["w"] == 0).sum()) == zeros


def _optimizer_checks(rank, world_size):
    model = DDP(make_model())

    def check(optimizer, **hook):
        state = ErrorFeedbackState(module=model, **hook)
        return state.check_optimizer(optimizer(model.parameters()))

    return {
        "right": check(lambda p: torch.optim.SGD(p, lr=0.1), momentum=0.9, weight_decay=1e-4),
        "plain_ef": check(lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-4)),
        "momentum_twice": check(lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), momentum=0.9),
        "decay_after": check(lambda p: torch.optim.SGD(p, lr=0.1, weight_decay=1e-4), momentum=0.9),
        "decay_twice": check(
            lambda p: torch.optim.SGD(p, lr=0.1, weight_decay=1e-4), momentum=0.9, weight_decay=1e-4
        ),
        # no momentum in the hook, the L2 term in both: still twice
        "decay_twice_no_momentum": check(
            lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-4), weight_decay=1e-4
        ),
    }


def test_check_optimizer_names_what_undoes_momentum_correction():
    found = run_distributed(_optimizer_checks, 1)[0]
    assert found["right"] == [] and found["plain_ef"] == []
    assert len(found["momentum_twice"]) == 1 and "momentum applies twice" in found["momentum_twice"][0]
    # the logistic regression's failure: the L2 term after the velocity is 1 / (1 - 0.9) = 10 times weaker
    assert len(found["decay_after"]) == 1 and "10 times weaker" in found["decay_after"][0]
    assert len(found["decay_twice"]) == 1 and "weight decay applies twice" in found["decay_twice"][0]
    assert len(found["decay_twice_no_momentum"]) == 1
    assert "weight decay applies twice" in found["decay_twice_no_momentum"][0]


# ---------------------------------------------------------------- send_momentum_tail


def _tail_reference(grads_per_rank, k, momentum):
    """The transcription of send_momentum_tail: select on the memory as DGC does, send each
    selected entry with its velocity's tail ``mu / (1 - mu) u``, clear the velocity there."""
    n, steps = len(grads_per_rank), len(grads_per_rank[0])
    u = [torch.zeros_like(grads_per_rank[0][0]) for _ in range(n)]
    v = [torch.zeros_like(grads_per_rank[0][0]) for _ in range(n)]
    means = []
    for t in range(steps):
        total = torch.zeros_like(u[0])
        for i in range(n):
            u[i] = momentum * u[i] + grads_per_rank[i][t]
            v[i] = v[i] + u[i]
            idx = topk_magnitude_reference(v[i], k)
            total[idx] += v[i][idx] + momentum / (1 - momentum) * u[i][idx]
            v[i][idx] = 0
            u[i][idx] = 0
        means.append(total / n)
    return means


def _tail_cases(rank, world_size):
    # the transcription's case
    model = DDP(_one_parameter_model())
    state = ErrorFeedbackState(
        compressor=ec_hooks.TopK(0.1), module=model, momentum=0.9, send_momentum_tail=True
    )
    record = {"grads": [], "u_before": [], "out": []}
    _train(model, state, rank, 6, torch.optim.SGD(model.parameters(), lr=0.1), record)
    grads = [torch.stack(g) for g in zip(*[_all(t) for t in record["grads"]])]
    velocity = _flat(state.momentum_correction.velocity.state_dict())
    return grads, record["out"], velocity


def test_momentum_tail_is_sent_with_its_entry():
    results = run_distributed(_tail_cases, 2)
    grads, _, _ = results[0]
    k = ec_hooks.TopK(0.1).k_for(grads[0][0].numel())
    expected = _tail_reference([list(g) for g in grads], k, 0.9)
    for _, outputs, velocity in results:
        for step, (want, got) in enumerate(zip(expected, outputs)):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7, msg=f"step {step}")
        # the velocity is cleared where the tail went out, and only there (k per step at most)
        assert 0 < int((velocity == 0).sum()) <= k * 6


def _shared_tail_cases(rank, world_size):
    out = {}
    for selection in ("leader", "candidates"):
        model = DDP(_one_parameter_model())
        state = ErrorFeedbackState(
            compressor=ec_hooks.CyclicTopK(0.1, selection=selection),
            module=model,
            momentum=0.9,
            send_momentum_tail=True,
        )
        record = {"grads": [], "u_before": [], "out": []}
        _train(model, state, rank, 6, torch.optim.SGD(model.parameters(), lr=0.1), record)
        grads = [torch.stack(g) for g in zip(*[_all(t) for t in record["grads"]])]
        out[selection] = grads, record["out"], _flat(state.momentum_correction.velocity.state_dict())
    return out


def _shared_tail_reference(grads_per_rank, outputs, compressor, momentum):
    """The transcription of send_momentum_tail with shared indices.  Leader: the entries are
    those of the output (checked to be one worker's top-k); candidates: every worker nominates
    its top ``m`` of the memory, the tails are added at the union ``U``, the ``k`` largest sums
    are kept, and the velocity is cleared at all of ``U`` (the tails not kept stay in memory)."""
    n, steps, tail = len(grads_per_rank), len(grads_per_rank[0]), momentum / (1 - momentum)
    u = [torch.zeros_like(grads_per_rank[0][0]) for _ in range(n)]
    v = [torch.zeros_like(grads_per_rank[0][0]) for _ in range(n)]
    d = u[0].numel()
    k = compressor.k_for(d)
    means = []
    for t in range(steps):
        for i in range(n):
            u[i] = momentum * u[i] + grads_per_rank[i][t]
            v[i] = v[i] + u[i]
        if compressor.selects_from_candidates:
            m = compressor.candidates_for(d, n)
            union = torch.unique(torch.cat([topk_magnitude_reference(v[i], m) for i in range(n)]))
        else:
            union = outputs[t].nonzero().reshape(-1)
            assert union.numel() == k
            leaders = [
                set(topk_magnitude_reference(v[i], k).tolist()) == set(union.tolist()) for i in range(n)
            ]
            assert any(leaders), f"step {t}: the shared entries are no worker's top-k"
        offered = [v[i][union] + tail * u[i][union] for i in range(n)]
        summed = torch.stack(offered).sum(0)
        kept = torch.topk(summed.abs(), k).indices
        total = torch.zeros_like(u[0])
        total[union[kept]] = summed[kept]
        means.append(total / n)
        for i in range(n):
            v[i][union] = offered[i]
            v[i][union[kept]] = 0
            u[i][union] = 0
    return means


def test_shared_index_transports_send_the_momentum_tails():
    results = run_distributed(_shared_tail_cases, 2)
    for selection in ("leader", "candidates"):
        compressor = ec_hooks.CyclicTopK(0.1, selection=selection)
        grads, outputs, _ = results[0][selection]
        expected = _shared_tail_reference([list(g) for g in grads], outputs, compressor, 0.9)
        for _, outputs, velocity in (r[selection] for r in results):
            for step, (want, got) in enumerate(zip(expected, outputs)):
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7, msg=f"{selection}, step {step}")
            # cleared where the tails went out (the shared entries, or the union of nominations)
            assert int((velocity == 0).sum()) > 0, selection


def _tail_overflow(rank, world_size, compressor):
    model = DDP(make_model())
    state = ErrorFeedbackState(compressor=compressor, module=model, momentum=0.9, send_momentum_tail=True)
    velocities, memories = [], []
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def hook(state, bucket):
        if state.iteration == 2 and rank == 0:
            bucket.buffer()[3] = float("inf")
        return error_feedback_hook(state, bucket)

    model.register_comm_hook(state, hook)
    _four_steps_skipping_overflows(model, state, opt, rank, velocities, memories)
    return velocities, memories


@pytest.mark.parametrize(
    "compressor",
    [ec_hooks.TopK(0.1), ec_hooks.CyclicTopK(0.1), ec_hooks.CyclicTopK(0.1, selection="candidates")],
    ids=["topk", "cyclic_leader", "cyclic_candidates"],
)
def test_overflow_step_takes_the_momentum_tails_back_out_of_the_memory(compressor):
    for velocities, memories in run_distributed(_tail_overflow, 2, compressor):
        assert torch.equal(velocities[1], velocities[2])
        torch.testing.assert_close(memories[1], memories[2], rtol=0, atol=1e-6)
        assert not torch.equal(memories[2], memories[3])


def _tail_invariants(rank, world_size):
    compressors = {
        "topk": ec_hooks.TopK(0.1),
        "randk": ec_hooks.RandK(0.1),
        "topk_delta16": ec_hooks.TopK(0.1, index_encoding="delta16", value_dtype="bf16"),
    }
    out = {}
    cases = [
        (True, False, False),
        (False, True, False),
        (False, False, False),
        (True, False, True),
        (False, False, True),
    ]
    for name, compressor in compressors.items():
        for send_tail, masking, nesterov in cases:
            model = DDP(_one_parameter_model())
            state = ErrorFeedbackState(
                compressor=compressor,
                module=model,
                momentum=0.9,
                nesterov=nesterov,
                momentum_masking=masking,
                send_momentum_tail=send_tail,
            )
            record = {"grads": [], "u_before": [], "out": []}
            _train(model, state, 0, 8, torch.optim.SGD(model.parameters(), lr=0.05), record)
            fed = torch.stack(record["grads"]).sum(0) / (1 - 0.9)
            # what the velocity still owes: mu / (1 - mu) u, with Nesterov mu^2 / (1 - mu) u
            owed = (0.81 if nesterov else 0.9) / (1 - 0.9)
            pending = _flat(state.memory.state_dict()) + owed * _flat(
                state.momentum_correction.velocity.state_dict()
            )
            sent = torch.stack(record["out"]).sum(0)  # one worker: the mean is what it sent
            error = float((fed - sent - pending).abs().max())
            out[name, send_tail, masking, nesterov] = error, float(fed.abs().max())
    return out


def test_momentum_tail_keeps_every_gradients_full_momentum():
    for (name, send_tail, masking, nesterov), (error, scale) in run_distributed(_tail_invariants, 1)[
        0
    ].items():
        # sum_t g_t / (1 - mu) = sum_t sent_t + m_T + mu / (1 - mu) u_T (Nesterov: mu^2 / (1 - mu) u_T):
        # holds with the tail sent and with the velocity kept, not with DGC's masking, which drops the tail
        case = (name, send_tail, masking, nesterov, error, scale)
        if not masking:
            assert error < 1e-5 * scale, case
        else:
            assert error > 1e-2 * scale, case
