"""DeepSqueeze, CHOCO-SGD and D-PSGD on real gloo processes (2, 3 and 4 ranks) and in simulation.

The multi-process checks of one world size run in one group of processes (module fixtures), so
that the suite pays for process start-up a few times only.
"""

import math
import warnings

import pytest
import torch
import torch.distributed as dist

import ec_hooks
from ec_hooks import DPSGD, ChocoSGD, DeepSqueeze, Topology
from ec_hooks.gossip import default_consensus_step, simulate_step, simulated_consensus_distance

from .distributed import run_distributed

COMPRESSORS = {
    "topk": lambda: ec_hooks.TopK(0.25),
    "randk": lambda: ec_hooks.RandK(0.25, seed=3),
    "sign": lambda: ec_hooks.ScaledSign(),
    "qsgd": lambda: ec_hooks.QSGD.from_bits(4),
    "identity": lambda: ec_hooks.Identity(),
}


def make_params(rank, scale=1.0):
    g = torch.Generator().manual_seed(100 + rank)
    return [torch.randn(3, 4, generator=g) * scale, torch.randn(5, generator=g) * scale]  # 17 entries


def flat(params):
    return torch.cat([p.detach().reshape(-1).double() for p in params])


def group_mean(params):
    x = flat(params)
    dist.all_reduce(x)
    return x / dist.get_world_size()


def configurations(topologies):
    """(label, algorithm class, compressor factory, topology name) for every pairing that exists."""
    out = []
    for topology in topologies:
        for name, build in COMPRESSORS.items():
            out.append((f"DeepSqueeze/{name}/{topology}", DeepSqueeze, build, topology))
            if topology != "one_peer_exponential":
                out.append((f"ChocoSGD/{name}/{topology}", ChocoSGD, build, topology))
        out.append((f"DPSGD/{topology}", DPSGD, lambda: None, topology))
    return out


def average_model_invariant(rank, world_size, topologies):
    """Max over steps of |mean after gossip - mean before gossip|, per configuration."""
    errors = {}
    for label, cls, build, topology in configurations(topologies):
        params = make_params(rank)
        gossip = cls(params, topology, build(), 0.5 if cls is not DPSGD else None, watch_every=0)
        noise = torch.Generator().manual_seed(rank)
        worst = 0.0
        for _ in range(4):
            with torch.no_grad():  # a local "optimizer step", different on every rank
                for p in params:
                    p.add_(torch.randn(p.shape, generator=noise), alpha=0.1)
            before = group_mean(params)
            gossip.step()
            worst = max(worst, float((group_mean(params) - before).abs().max()))
        errors[label] = (worst, gossip.stats.last_bytes_sent, gossip.iteration)
    return errors


# ---------------------------------------------------------------------------------- 4 ranks


def logistic_regression(rank, world_size, steps=300, lr=0.5):
    """Full-batch logistic regression, one shard per rank (shifted features): the final loss of
    the mean model on all data, for allreduce SGD and the gossip algorithms."""
    g = torch.Generator().manual_seed(0)
    d, m = 10, 100
    w_star = torch.randn(d, generator=g)
    shards = []
    for _ in range(world_size):
        features = torch.randn(m, d, generator=g) + torch.randn(d, generator=g)
        labels = ((features @ w_star + torch.randn(m, generator=g)) > 0).float()
        shards.append((features, labels))

    def loss(w, features, labels):
        return (
            torch.nn.functional.binary_cross_entropy_with_logits(features @ w, labels) + 5e-3 * w.pow(2).sum()
        )

    def local_step(w, opt):
        opt.zero_grad()
        loss(w, *shards[rank]).backward()

    all_features = torch.cat([s[0] for s in shards])
    all_labels = torch.cat([s[1] for s in shards])
    results = {}
    w = torch.zeros(d, requires_grad=True)
    opt = torch.optim.SGD([w], lr=lr)
    for _ in range(steps):
        local_step(w, opt)
        dist.all_reduce(w.grad)
        w.grad.div_(world_size)
        opt.step()
    results["allreduce"] = float(loss(w.detach(), all_features, all_labels))
    for label, build in [
        ("DPSGD", lambda p: DPSGD(p, "ring")),
        ("ChocoSGD/topk", lambda p: ChocoSGD(p, "ring", ec_hooks.TopK(0.3))),
        ("DeepSqueeze/topk", lambda p: DeepSqueeze(p, "ring", ec_hooks.TopK(0.3))),
        ("DeepSqueeze/sign", lambda p: DeepSqueeze(p, "exponential", ec_hooks.ScaledSign())),
    ]:
        w = torch.zeros(d, requires_grad=True)
        opt = torch.optim.SGD([w], lr=lr)
        gossip = build([w])
        for _ in range(steps):
            local_step(w, opt)
            opt.step()
            gossip.step()
        (mean,) = gossip.average_parameters()
        results[label] = (float(loss(mean, all_features, all_labels)), gossip.consensus_distance())
    return results


def four_rank_suite(rank, world_size):
    out = {"invariant": average_model_invariant(rank, world_size, ["ring", "one_peer_exponential"])}

    # Zero learning rate: gossip alone from different models.
    consensus = {}
    for label, cls, compressor, topology, eta, steps in [
        ("DPSGD", DPSGD, None, "ring", None, 60),
        ("ChocoSGD/topk", ChocoSGD, ec_hooks.TopK(0.25), "ring", None, 250),
        ("ChocoSGD/sign", ChocoSGD, ec_hooks.ScaledSign(), "ring", None, 250),
        ("DeepSqueeze/topk", DeepSqueeze, ec_hooks.TopK(0.25), "ring", None, 250),
        ("DeepSqueeze/sign", DeepSqueeze, ec_hooks.ScaledSign(), "ring", None, 250),
    ]:
        params = make_params(rank)
        gossip = cls(params, topology, compressor, eta, watch_every=0)
        start = gossip.consensus_distance()
        mean = group_mean(params)
        for _ in range(steps):
            gossip.step()
        consensus[label] = (
            start,
            gossip.consensus_distance(),
            float((group_mean(params) - mean).abs().max()),
        )
    out["consensus"] = consensus

    # DeepSqueeze(Identity, eta=1) is D-PSGD bit for bit, on a static and a time-varying graph.
    same = {}
    for topology in ("ring", "one_peer_exponential"):
        a, b = make_params(rank), make_params(rank)
        ds = DeepSqueeze(a, topology, ec_hooks.Identity(), 1.0, watch_every=0)
        dp = DPSGD(b, topology, watch_every=0)
        for step in range(5):
            with torch.no_grad():
                for p, q in zip(a, b):
                    bump = torch.full_like(p, 0.01 * (rank + step))
                    p.sub_(bump)
                    q.sub_(bump)
            ds.step()
            dp.step()
        same[topology] = all(torch.equal(p, q) for p, q in zip(a, b))
    out["deepsqueeze_identity_is_dpsgd"] = same

    # One-peer exponential graph over 4 ranks: exact average after log2(4) = 2 steps.
    params = make_params(rank)
    mean = group_mean(params)
    gossip = DPSGD(params, Topology.one_peer_exponential(4), watch_every=0)
    gossip.step()
    after_one = gossip.consensus_distance()
    gossip.step()
    out["one_peer"] = (after_one, gossip.consensus_distance(), float((flat(params) - mean).abs().max()))

    # Exact resume from a state dict, and bytes per step.
    resume = {}
    for label, cls, build in [
        ("DeepSqueeze", DeepSqueeze, lambda: ec_hooks.TopK(0.25)),
        ("ChocoSGD", ChocoSGD, lambda: ec_hooks.RandK(0.25)),
        ("DeepSqueeze/qsgd", DeepSqueeze, lambda: ec_hooks.QSGD.from_bits(4)),
    ]:
        params = make_params(rank)
        gossip = cls(params, "ring", build(), 0.3, watch_every=2)
        drift = torch.Generator().manual_seed(rank)

        def run(ps, g, steps, generator):
            for _ in range(steps):
                with torch.no_grad():
                    for p in ps:
                        p.add_(torch.randn(p.shape, generator=generator), alpha=0.05)
                g.step()

        run(params, gossip, 3, drift)
        saved_params = [p.clone() for p in params]
        saved_state = gossip.state_dict()
        saved_rng = drift.get_state()
        run(params, gossip, 4, drift)
        continued = flat(params)
        fresh = [p.clone() for p in saved_params]
        restored = cls(fresh, "ring", build(), 0.3, watch_every=2)
        restored.load_state_dict(saved_state)
        drift.set_state(saved_rng)
        run(fresh, restored, 4, drift)
        resume[label] = (
            float((flat(fresh) - continued).abs().max()),
            restored.iteration,
            restored.stats.steps,
            restored.last_consensus_distance == gossip.last_consensus_distance,
        )
    out["resume"] = resume

    # Statistics, mean model and consensus distance against gathered models.
    params = make_params(rank)
    gossip = DeepSqueeze(params, "ring", ec_hooks.TopK(0.25), 0.3, watch_every=0)
    gossip.step()
    gathered = [torch.empty(17, dtype=torch.float64) for _ in range(world_size)]
    dist.all_gather(gathered, flat(params))
    stacked = torch.stack(gathered)
    mean = gossip.average_parameters()
    out["collectives"] = (
        float((flat(mean) - stacked.mean(dim=0)).abs().max()),
        gossip.consensus_distance(),
        math.sqrt(float((stacked - stacked.mean(dim=0)).pow(2).sum()) / world_size),
        all(
            m.shape == p.shape and m.dtype == p.dtype and m.data_ptr() != p.data_ptr()
            for m, p in zip(mean, params)
        ),
    )
    out["stats"] = gossip.stats.as_dict()

    # Divergence watch: DeepSqueeze with top-k and eta = 1 drifts apart; D-PSGD does not.
    watch = {}
    for label, build in [
        (
            "DeepSqueeze",
            lambda p: DeepSqueeze(p, "ring", ec_hooks.TopK(0.1), 1.0, watch_every=10, watch_patience=2),
        ),
        ("DPSGD", lambda p: DPSGD(p, "ring", watch_every=10, watch_patience=2)),
    ]:
        params = [torch.randn(200, generator=torch.Generator().manual_seed(rank))]
        gossip = build(params)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(60):
                gossip.step()
        watch[label] = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    out["watch"] = watch

    # Bad arguments inside a real group.
    errors = {}
    for label, call in [
        ("size", lambda: DeepSqueeze(make_params(rank), Topology.ring(3))),
        ("time_varying_choco", lambda: ChocoSGD(make_params(rank), "one_peer_exponential")),
        ("name", lambda: DeepSqueeze(make_params(rank), "star")),
    ]:
        try:
            call()
            errors[label] = None
        except ValueError as exc:
            errors[label] = str(exc)
    out["errors"] = errors

    out["logreg"] = logistic_regression(rank, world_size)
    return out


@pytest.fixture(scope="module")
def four_ranks():
    return run_distributed(four_rank_suite, 4, timeout=400)


@pytest.mark.slow
def test_average_model_invariant_every_algorithm_and_compressor_4_ranks(four_ranks):
    labels = {label for label, *_ in configurations(["ring", "one_peer_exponential"])}
    for per_rank in four_ranks:
        assert set(per_rank["invariant"]) == labels
        for label, (error, _, iterations) in per_rank["invariant"].items():
            assert error < 2e-6, label
            assert iterations == 4


@pytest.mark.slow
def test_bytes_on_the_wire_shrink_with_the_payload(four_ranks):
    sent = four_ranks[0]["invariant"]
    # ring of 4: two neighbours; 17 entries; top-k 25%: 5 (int32, fp32) pairs; every message ends
    # with its status word (4 bytes after a byte payload, one element after a numeric one)
    assert sent["DeepSqueeze/topk/ring"][1] == 2 * (5 * 8 + 4)
    assert sent["DeepSqueeze/randk/ring"][1] == 2 * (5 + 1) * 4  # values only: indices are shared
    assert sent["DeepSqueeze/sign/ring"][1] == 2 * (8 + 4)  # fp32 scale + 3 bytes of signs, padded
    assert sent["DeepSqueeze/qsgd/ring"][1] == 2 * (16 + 4)  # fp32 norm + 17 * 4 bits, padded
    assert sent["DPSGD/ring"][1] == sent["DeepSqueeze/identity/ring"][1] == 2 * (17 + 1) * 4
    # one peer per step
    assert sent["DeepSqueeze/topk/one_peer_exponential"][1] == 5 * 8 + 4
    stats = four_ranks[0]["stats"]
    assert stats["bytes_dense"] == 17 * 4 and stats["bytes_sent"] == 88
    assert stats["compression_ratio"] == pytest.approx(68 / 88)
    assert stats["density"] == pytest.approx(5 / 17)
    assert stats["residual_norm"] > 0


@pytest.mark.slow
def test_zero_learning_rate_reaches_consensus(four_ranks):
    for per_rank in four_ranks:
        c = per_rank["consensus"]
        for label, (start, _end, mean_drift) in c.items():
            assert start > 1.0, label
            assert mean_drift < 1e-5, label  # the mean never moves
        # exact up to float32 precision
        assert c["DPSGD"][1] < 1e-6
        assert c["ChocoSGD/topk"][1] < 1e-5
        assert c["ChocoSGD/sign"][1] < 1e-5
        # DeepSqueeze sends the compressed model: it stalls at a level set by the compressor
        assert c["DeepSqueeze/topk"][1] < 0.3 * c["DeepSqueeze/topk"][0]
        assert c["DeepSqueeze/sign"][1] < 0.5 * c["DeepSqueeze/sign"][0]


@pytest.mark.slow
def test_deepsqueeze_identity_step_one_equals_dpsgd_exactly(four_ranks):
    for per_rank in four_ranks:
        assert per_rank["deepsqueeze_identity_is_dpsgd"] == {"ring": True, "one_peer_exponential": True}


@pytest.mark.slow
def test_one_peer_exponential_averages_in_log2_n_steps_over_4_ranks(four_ranks):
    for after_one, after_two, off_mean in (r["one_peer"] for r in four_ranks):
        assert after_one > 0.1
        assert after_two < 1e-6
        assert off_mean < 1e-6


@pytest.mark.slow
def test_state_dict_round_trip_resumes_exactly(four_ranks):
    for per_rank in four_ranks:
        for label, (difference, iteration, steps, same_watch) in per_rank["resume"].items():
            assert difference == 0.0, label
            assert iteration == steps == 7, label
            assert same_watch, label


@pytest.mark.slow
def test_average_parameters_and_consensus_distance(four_ranks):
    for mean_error, distance, expected, new_tensors in (r["collectives"] for r in four_ranks):
        assert mean_error < 1e-6
        assert distance == pytest.approx(expected, rel=1e-9)
        assert new_tensors


@pytest.mark.slow
def test_divergence_watch_warns_with_the_fix(four_ranks):
    for per_rank in four_ranks:
        messages = per_rank["watch"]["DeepSqueeze"]
        assert len(messages) == 1  # once per episode, not at every check
        assert "consensus distance keeps growing" in messages[0]
        assert "lower consensus_step" in messages[0] and "ChocoSGD" in messages[0]
        assert per_rank["watch"]["DPSGD"] == []


@pytest.mark.slow
def test_bad_topologies_in_a_group(four_ranks):
    errors = four_ranks[1]["errors"]
    assert "3 workers but the process group has 4" in errors["size"]
    assert "must be static for ChocoSGD" in errors["time_varying_choco"]
    assert "one of ['ring'" in errors["name"]


@pytest.mark.slow
def test_logistic_regression_matches_allreduce_sgd_within_one_percent(four_ranks):
    results = dict(four_ranks[0]["logreg"])
    reference = results.pop("allreduce")
    assert 0.05 < reference < 0.6
    for label, (loss, distance) in results.items():
        assert abs(loss - reference) / reference < 0.01, (label, loss, reference)
        assert distance < 1.0, label
    assert all(r["logreg"] == four_ranks[0]["logreg"] for r in four_ranks[1:])


# ---------------------------------------------------------------------------------- 3 and 2 ranks


def three_rank_suite(rank, world_size):
    out = {"invariant": average_model_invariant(rank, world_size, ["ring", "one_peer_exponential", "torus"])}
    params = make_params(rank)
    gossip = DPSGD(params, "one_peer_exponential", watch_every=0)
    for _ in range(40):
        gossip.step()
    out["one_peer_consensus"] = gossip.consensus_distance()
    return out


@pytest.mark.slow
def test_average_model_invariant_odd_world_size_and_asymmetric_peers():
    labels = {label for label, *_ in configurations(["ring", "one_peer_exponential", "torus"])}
    for per_rank in run_distributed(three_rank_suite, 3):
        assert set(per_rank["invariant"]) == labels
        for label, (error, _, _) in per_rank["invariant"].items():
            assert error < 2e-6, label
        # one peer per step over 3 workers (not a power of two): converges, just not in log2 n steps
        assert per_rank["one_peer_consensus"] < 1e-5


def pair_suite(rank, world_size):
    out = {}
    for label, build in [
        ("DPSGD", lambda p: DPSGD(p, "ring")),
        ("DeepSqueeze", lambda p: DeepSqueeze(p, "ring", ec_hooks.TopK(0.5), 0.5)),
        ("ChocoSGD", lambda p: ChocoSGD(p, "ring", ec_hooks.ScaledSign())),
    ]:
        params = make_params(rank)
        mean = group_mean(params)
        gossip = build(params)
        gossip.step()
        out[label] = (
            float((group_mean(params) - mean).abs().max()),
            float((flat(params) - mean).abs().max()),
            gossip.topology.weights(rank),
            gossip.stats.last_bytes_sent,
        )
    return out


def test_ring_of_two_is_a_pair():
    for per_rank in run_distributed(pair_suite, 2):
        drift, off_mean, weights, _ = per_rank["DPSGD"]
        assert weights == {0: 0.5, 1: 0.5}
        assert drift < 1e-6 and off_mean < 1e-6  # one D-PSGD step on a pair is the exact average
        for label in ("DeepSqueeze", "ChocoSGD"):
            assert per_rank[label][0] < 1e-6, label
            assert per_rank[label][1] > 1e-3, label  # compressed: not averaged in one step
        assert per_rank["DeepSqueeze"][3] == 9 * 8 + 4  # one neighbour, top-9 of 17, the status word


# ---------------------------------------------------------------------------------- one process


def test_single_worker_step_is_a_no_op():
    params = make_params(0)
    before = [p.clone() for p in params]
    for cls in (DeepSqueeze, ChocoSGD, DPSGD):
        gossip = cls(params)  # torch.distributed not initialized: a world of one
        assert gossip.world_size == 1 and gossip.topology.size == 1
        gossip.step()
        gossip.step()
        assert gossip.iteration == 2 and gossip.stats.bytes_sent == 0
        assert all(torch.equal(p, q) for p, q in zip(params, before))
        assert gossip.consensus_distance() == 0.0
        mean = gossip.average_parameters()
        assert all(torch.equal(m, p) and m is not p for m, p in zip(mean, params))
        state = gossip.state_dict()
        cls(params).load_state_dict(state)
    with pytest.raises(ValueError, match="4 workers but the process group has 1"):
        DeepSqueeze(params, Topology.ring(4))


def simulate(cls, n, topology, compressor, eta, steps, scale=1.0):
    params = [make_params(r, scale) for r in range(n)]
    workers = cls.simulated(params, topology, compressor, eta)
    mean = torch.stack([flat(p) for p in params]).mean(dim=0)
    start = simulated_consensus_distance(workers)
    for _ in range(steps):
        simulate_step(workers)
    drift = float((torch.stack([flat(p) for p in params]).mean(dim=0) - mean).abs().max())
    return start, simulated_consensus_distance(workers), drift, workers


def test_one_peer_exponential_over_8_simulated_workers_averages_in_3_steps():
    for cls, compressor in ((DPSGD, None), (DeepSqueeze, ec_hooks.Identity())):
        start, end, drift, _ = simulate(cls, 8, "one_peer_exponential", compressor, 1.0, 3)
        assert start > 1 and end < 1e-6 and drift < 1e-6
        assert simulate(cls, 8, "one_peer_exponential", compressor, 1.0, 2)[1] > 0.1


def test_simulation_uses_the_same_update_as_a_real_group():
    # 5 simulated workers on a torus / exponential graph: invariant and CHOCO's exact consensus
    for topology in ("exponential", "torus", "ring"):
        _, end, drift, workers = simulate(ChocoSGD, 5, topology, ec_hooks.TopK(0.25), None, 300)
        assert drift < 1e-5 and end < 1e-5, topology
        assert workers[0].stats.last_bytes_sent == len(workers[0].topology.out_peers(0)) * (40 + 4)
    with pytest.raises(RuntimeError, match="simulate_step"):
        workers[0].step()


def test_qsgd_gossip_is_rescaled_into_a_contraction():
    # Unscaled QSGD's variance exceeds the signal and CHOCO would diverge; rescaled it converges.
    _, end, drift, workers = simulate(ChocoSGD, 4, "ring", ec_hooks.QSGD.from_bits(4), None, 400)
    assert end < 1e-3 and drift < 1e-4
    assert 0 < workers[0]._decode_scale < 1


def test_defaults_per_compressor():
    assert default_consensus_step("dpsgd", ec_hooks.Identity()) == 1.0
    assert default_consensus_step("deepsqueeze", ec_hooks.Identity()) == 1.0
    top1 = default_consensus_step("deepsqueeze", ec_hooks.TopK(0.01))
    top10 = default_consensus_step("deepsqueeze", ec_hooks.TopK(0.1))
    assert 0 < top1 < top10 < 1  # cruder compressor, smaller step
    for algorithm in ("deepsqueeze", "choco"):
        for compressor in COMPRESSORS.values():
            assert 0 < default_consensus_step(algorithm, compressor()) <= 1
    assert DeepSqueeze(make_params(0), compressor=ec_hooks.TopK(0.1)).consensus_step == top10
    assert DeepSqueeze(make_params(0)).compressor.density == 0.01  # TopK(0.01) by default
    with pytest.raises(ValueError, match="algorithm must be one of"):
        default_consensus_step("sgd", ec_hooks.TopK())


def test_state_dict_validation():
    workers = DeepSqueeze.simulated([make_params(r) for r in range(4)], "ring", ec_hooks.TopK(0.25), 0.3)
    simulate_step(workers)
    state = workers[1].state_dict()
    assert set(state["buffers"]) == {"delta"} and state["buffers"]["delta"].dtype == torch.float32
    assert "params" not in state
    other_size = DeepSqueeze.simulated([make_params(r) for r in range(3)], "ring", ec_hooks.TopK(0.25), 0.3)
    with pytest.raises(ValueError, match="world_size=4"):
        other_size[1].load_state_dict(state)
    same = DeepSqueeze.simulated([make_params(r) for r in range(4)], "ring", ec_hooks.TopK(0.25), 0.3)
    with pytest.raises(ValueError, match="rank=1"):
        same[2].load_state_dict(state)
    bigger = DeepSqueeze.simulated(
        [make_params(r) + [torch.zeros(2)] for r in range(4)], "ring", ec_hooks.TopK(0.25), 0.3
    )
    with pytest.raises(ValueError, match="numel=17"):
        bigger[1].load_state_dict(state)
    choco = ChocoSGD.simulated([make_params(r) for r in range(4)], "ring", ec_hooks.TopK(0.25), 0.3)
    with pytest.raises(ValueError, match="saved by DeepSqueeze"):
        choco[1].load_state_dict(state)
    with pytest.raises(ValueError, match="not a gossip state dict"):
        same[1].load_state_dict({"iteration": 3})
    simulate_step(choco)
    on_exponential = ChocoSGD.simulated(
        [make_params(r) for r in range(4)], "exponential", ec_hooks.TopK(0.25), 0.3
    )
    with pytest.raises(ValueError, match="only valid for the topology"):
        on_exponential[1].load_state_dict(choco[1].state_dict())
    same[1].load_state_dict(state)
    assert same[1].iteration == 1 and torch.equal(same[1]._delta, workers[1]._delta)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda p: DeepSqueeze(p, consensus_step=0), "consensus_step must be a float in \\(0, 1\\]"),
        (lambda p: DeepSqueeze(p, consensus_step=1.5), "consensus_step"),
        (lambda p: ChocoSGD(p, consensus_step="big"), "consensus_step"),
        (lambda p: DeepSqueeze(p, compressor="zip"), "compressor must be a Compressor or one of"),
        (lambda p: DeepSqueeze(p, compressor=ec_hooks.TopK(0.0)), "density"),
        (lambda p: DPSGD(p, compressor=ec_hooks.TopK(0.1)), "compressor must be None or Identity"),
        (lambda p: DeepSqueeze(p, topology="star"), "topology must be"),
        (lambda p: DeepSqueeze(p, watch_every=-1), "watch_every"),
        (lambda p: DeepSqueeze(p, watch_patience=0), "watch_patience"),
        (lambda p: DeepSqueeze(p, watch_growth=1.0), "watch_growth"),
        (lambda p: DeepSqueeze([]), "params is empty"),
        (lambda p: DeepSqueeze([torch.zeros(3, dtype=torch.int64)]), "floating-point"),
        (lambda p: DeepSqueeze([p[0], p[0]]), "same tensor twice"),
        (lambda p: DeepSqueeze([p[0], "w"]), "must be tensors"),
    ],
)
def test_bad_arguments_raise_at_construction(call, match):
    with pytest.raises(ValueError, match=match):
        call(make_params(0))


def test_bf16_model_sends_bf16_values_and_keeps_the_error_in_fp32():
    params = [[p.to(torch.bfloat16) for p in make_params(r)] for r in range(3)]
    workers = DeepSqueeze.simulated(params, "ring", ec_hooks.TopK(0.25), 0.5)
    simulate_step(workers)
    assert workers[0].wire_dtype == torch.bfloat16
    assert workers[0].stats.last_bytes_sent == 2 * (32 + 4)  # 5 * (int32 + bf16), padded; status word
    assert workers[0]._delta.dtype == torch.float32
    assert all(p.dtype == torch.bfloat16 for p in params[0])
    optimizer_groups = [{"params": make_params(0)}]
    assert len(DPSGD(optimizer_groups).params) == 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gossip_on_cuda_tensors():
    for cls, compressor in [
        (DeepSqueeze, ec_hooks.TopK(0.25)),
        (DeepSqueeze, ec_hooks.RandK(0.25)),
        (ChocoSGD, ec_hooks.ScaledSign()),
        (ChocoSGD, ec_hooks.QSGD.from_bits(4)),
        (DPSGD, None),
    ]:
        params = [[p.cuda() for p in make_params(r)] for r in range(4)]
        workers = cls.simulated(params, "ring", compressor, None)
        mean = torch.stack([flat(p) for p in params]).mean(dim=0)
        start = simulated_consensus_distance(workers)
        for _ in range(100):
            simulate_step(workers)
        assert params[0][0].is_cuda and workers[0]._flatten().is_cuda
        assert float((torch.stack([flat(p) for p in params]).mean(dim=0) - mean).abs().max()) < 1e-5
        assert simulated_consensus_distance(workers) < start
    gossip = DeepSqueeze([p.cuda() for p in make_params(0)])  # a world of one on the GPU
    gossip.step()
    assert all(m.is_cuda for m in gossip.average_parameters())


def _gossip_cuda_over_gloo(rank, world_size):
    torch.cuda.set_device(0)  # the ranks share one GPU; gloo cannot send device tensors itself
    params = [p.cuda() for p in make_params(rank)]
    gossip = DeepSqueeze(params, compressor=ec_hooks.TopK(0.5), consensus_step=0.5, watch_every=0)
    before = [m.cpu() for m in gossip.average_parameters()]
    distance = gossip.consensus_distance()
    for _ in range(5):
        gossip.step()
    after = [m.cpu() for m in gossip.average_parameters()]
    return before, after, distance, gossip.consensus_distance(), params[0].is_cuda


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gossip_on_cuda_tensors_over_gloo_stages_through_host_memory():
    for before, after, start, end, on_gpu in run_distributed(_gossip_cuda_over_gloo, 3):
        assert on_gpu
        for a, b in zip(before, after):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5)  # the mean model does not move
        assert end < start
