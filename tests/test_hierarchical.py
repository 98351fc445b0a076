"""Hierarchical Mem-SGD (dense inside a node, compressed between nodes) on real gloo processes."""

import os

import pytest
import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel as DDP

import ec_hooks
from ec_hooks import ErrorFeedbackState, error_feedback_hook
from ec_hooks.hierarchical import node_layout
from ec_hooks.shared_memory import DISABLE_VARIABLE

from .distributed import run_distributed
from .test_hooks import Recorder, _gather, _roundtrip, batch, make_model, train

TWO_BY_TWO = [[0, 1], [2, 3]]

COMPRESSORS = {
    "topk": lambda: ec_hooks.TopK(0.1),
    "randk": lambda: ec_hooks.RandK(0.1, seed=1),
    "sign": lambda: ec_hooks.ScaledSign(),
    "identity": lambda: ec_hooks.Identity(),
}


def _two_by_two(rank, world_size):
    reference = train(DDP(make_model()), 6, rank)
    report = {}
    for name, build in COMPRESSORS.items():
        model = DDP(make_model(), bucket_cap_mb=0.0005)  # several buckets, rebuilt after step 1
        state = ErrorFeedbackState(compressor=build(), module=model, hierarchical=True, nodes=TWO_BY_TWO)
        recorder = Recorder(state)
        model.register_comm_hook(state, recorder)
        params = train(model, 6, rank)
        gathered = _gather(params)
        same = all(torch.equal(gathered[0], g) for g in gathered)
        # (1/L) sum_t sum_i g_i = N sum_t out + sum_i m_i  (memories in units of a node's mean)
        grad_total, out_total, memory = recorder.world_totals()
        residual = float((grad_total / 2 - 2 * out_total - memory).abs().max())
        # memories belong to the shard owner: zero outside the owned slice of every live bucket
        outside = 0.0
        for layout in state.memory.layouts():
            buffer = state.memory._buffers[layout]
            owned = state.hierarchy.owned_slice(buffer.numel())
            mask = torch.ones(buffer.numel(), dtype=torch.bool)
            mask[owned] = False
            outside = max(outside, float(buffer[mask].abs().max()) if mask.any() else 0.0)
        to_reference = max(float((a - b).abs().max()) for a, b in zip(params, reference))
        report[name] = (
            same,
            residual,
            float(grad_total.abs().max()),
            outside,
            to_reference,
            state.stats.as_dict(),
        )
    # bytes between nodes per rank: each rank sends its shard's payload once, not n payloads
    flat_model = DDP(make_model(), bucket_cap_mb=25)
    flat = ErrorFeedbackState(compressor=ec_hooks.TopK(0.1), module=flat_model)
    flat_model.register_comm_hook(flat, error_feedback_hook)
    train(flat_model, 2, rank)
    hier_model = DDP(make_model(), bucket_cap_mb=25)
    hier = ErrorFeedbackState(
        compressor=ec_hooks.TopK(0.1), module=hier_model, hierarchical=True, nodes=TWO_BY_TWO
    )
    hier_model.register_comm_hook(hier, error_feedback_hook)
    train(hier_model, 2, rank)
    report["bytes"] = (flat.stats.last_bytes_sent, hier.stats.last_bytes_sent)
    return report


@pytest.mark.slow
def test_two_nodes_of_two_ranks_agree_conserve_mass_and_keep_memories_with_owners():
    for per_rank in run_distributed(_two_by_two, 4):
        flat_bytes, hier_bytes = per_rank.pop("bytes")
        assert hier_bytes <= 0.6 * flat_bytes, (flat_bytes, hier_bytes)
        for name, (same, residual, scale, outside, to_reference, stats) in per_rank.items():
            assert same, f"{name}: ranks diverged"
            assert residual <= 1e-5 * max(scale, 1.0), f"{name}: gradient mass lost ({residual})"
            assert outside == 0.0, f"{name}: memory outside the owned shard"
            assert stats["steps"] == 6
            if name == "identity":
                assert to_reference <= 1e-6, "identity between nodes must be plain allreduce"
            else:
                assert stats["compression_ratio"] > 1.0, name
                assert to_reference > 1e-4, f"{name}: compression had no effect"


class _Undercounting(ec_hooks.TopK):
    """Top-k that claims to send one entry: the averaged shards overflow the sparse messages."""

    def entries_sent(self, numel):
        return 1


class _Dense(ec_hooks.TopK):
    """Top-k that claims to send every entry: the node gathers the dense shards directly."""

    def entries_sent(self, numel):
        return numel


class _Counted:
    def __init__(self, inner, calls, name):
        self.inner, self.calls, self.name = inner, calls, name
        calls[name] = 0

    def __call__(self, *args):
        self.calls[self.name] += 1
        return self.inner(*args)


def _failing_at(state, iteration, own):
    def failing(*args, **kwargs):
        if state.iteration >= iteration:
            raise OSError(28, "No space left on device")
        return own(*args, **kwargs)

    return failing


def _gather_paths(rank, world_size):
    results = {}
    for name, build, nodes, shared_memory in (
        ("sparse", lambda: ec_hooks.TopK(0.1), TWO_BY_TWO, "1"),
        ("overflow", lambda: _Undercounting(0.1), TWO_BY_TWO, "1"),
        ("dense", lambda: _Dense(0.1), TWO_BY_TWO, "1"),
        ("unsorted nodes", lambda: ec_hooks.TopK(0.1), [[1, 0], [3, 2]], "1"),
        ("shared memory", lambda: ec_hooks.TopK(0.1), TWO_BY_TWO, "0"),
        ("shared memory, unsorted nodes", lambda: ec_hooks.TopK(0.1), [[1, 0], [3, 2]], "0"),
        ("shared memory failing", lambda: ec_hooks.TopK(0.1), TWO_BY_TWO, "0"),
        ("shared memory mapping failing", lambda: ec_hooks.TopK(0.1), TWO_BY_TWO, "0"),
    ):
        model = DDP(make_model(), bucket_cap_mb=0.0005)
        os.environ[DISABLE_VARIABLE] = shared_memory
        state = ErrorFeedbackState(compressor=build(), module=model, hierarchical=True, nodes=nodes)
        calls = {"shared memory": state.hierarchy._shared is not None}
        if name == "shared memory failing" and rank == 1:
            # /dev/shm full at step 3 on one rank: every rank of its node goes back to gloo
            state.hierarchy._shared.own = _failing_at(state, 3, state.hierarchy._shared.own)
        if name == "shared memory mapping failing" and rank == 2:
            # a peer's new segment cannot be mapped (from the first step on): its node goes back to gloo
            state.hierarchy._shared.peer = _failing_at(state, 0, state.hierarchy._shared.peer)
        for method, counter in (("_gather_nonzeros", "nonzeros"), ("gather_rows", "gathers")):
            setattr(state.hierarchy, method, _Counted(getattr(state.hierarchy, method), calls, counter))
        model.register_comm_hook(state, error_feedback_hook)
        state.hierarchy.buffer("acc", ("a layout no longer in use",), (1000,), torch.float32, "cpu")
        params = train(model, 5, rank)
        memories = torch.cat([state.memory._buffers[layout] for layout in sorted(state.memory.layouts())])
        # the node stages keep buffers for the bucket layouts in use only
        owners = {key[1] for key in state.hierarchy._buffers}
        calls["stale buffers"] = len(owners - state.memory.layouts())
        calls["buffered buckets"] = len(owners)
        if state.hierarchy._shared is not None:
            shared = state.hierarchy._shared
            calls["stale segments"] = len({k[0] for k in shared._own} - state.memory.layouts())
            calls["segment files"] = sorted(shared._linked)
            calls["mapped"] = len(shared._own) + len(shared._peers)
        results[name] = (torch.cat([p.reshape(-1) for p in params]), memories, calls)
    return {
        name: (torch.equal(params, results["sparse"][0]), _gather([params]), memories, calls)
        for name, (params, memories, calls) in results.items()
    }


def test_node_gather_paths_and_node_orders_give_bit_identical_results():
    """Step 3 sends the owners' non-zeros, or (when they overflow the message, or the dense
    shard is smaller) the dense shards: the same bits either way; a node listing its ranks out
    of order reduces the same way."""
    per_rank = run_distributed(_gather_paths, 4)
    for rank, results in enumerate(per_rank):
        for name, (same_as_sparse, gathered, _, _) in results.items():
            assert same_as_sparse, f"{name} differs from the sparse gather on rank {rank}"
            assert all(torch.equal(gathered[0], g) for g in gathered), f"{name}: ranks diverged"
        sparse, overflow, dense = (results[n][3] for n in ("sparse", "overflow", "dense"))
        assert sparse["nonzeros"] > 0 and sparse["gathers"] == sparse["nonzeros"]
        assert overflow["nonzeros"] > 0 and overflow["gathers"] == 2 * overflow["nonzeros"]
        assert dense["nonzeros"] == 0 and dense["gathers"] > 0
        for calls in (sparse, overflow, dense):
            assert calls["stale buffers"] == 0 and calls["buffered buckets"] >= 1
            assert not calls["shared memory"]
        # the ranks of a node share this host: steps 1 and 3 go through shared memory, not gloo
        for name in ("shared memory", "shared memory, unsorted nodes"):
            calls = results[name][3]
            assert calls["shared memory"] and calls["nonzeros"] == 0 and calls["gathers"] == 0, calls
            assert calls["stale segments"] == 0
            # every peer has mapped the segments, and their files are gone from /dev/shm
            assert calls["mapped"] > 0 and calls["segment files"] == [], calls
        failing = results["shared memory failing"][3]
        if rank in (0, 1):  # the failing node: gloo from step 3 on
            assert "mapped" not in failing and failing["nonzeros"] > 0, failing
        else:
            assert failing["mapped"] > 0 and failing["nonzeros"] == 0, failing
        failing = results["shared memory mapping failing"][3]
        if rank in (2, 3):  # the node that could not map: gloo, and no file left behind
            assert "mapped" not in failing and failing["nonzeros"] > 0, failing
        else:
            assert failing["mapped"] > 0 and failing["nonzeros"] == 0, failing
    # the owner of a shard keeps its memory: local rank 0 of [1, 0] is global rank 1 (to
    # rounding: the memory a rank left on another's shard at DDP's rebuild is added in another order)
    for a, b in ((0, 1), (2, 3)):
        mine, swapped, other = (
            per_rank[a]["sparse"][2],
            per_rank[b]["unsorted nodes"][2],
            per_rank[b]["sparse"][2],
        )
        assert float((mine - swapped).abs().max()) <= 1e-6 < float((other - swapped).abs().max())


def _degenerate(rank, world_size):
    reference_model = DDP(make_model(), bucket_cap_mb=0.0005)
    reference_model.register_comm_hook(None, default_hooks.allreduce_hook)
    reference = train(reference_model, 4, rank)

    def run(**options):
        model = DDP(make_model(), bucket_cap_mb=0.0005)
        state = ErrorFeedbackState(compressor=ec_hooks.TopK(0.1), module=model, **options)
        model.register_comm_hook(state, error_feedback_hook)
        return train(model, 4, rank), state

    flat, _ = run()
    one_rank_nodes, _ = run(hierarchical=True, nodes=[[r] for r in range(world_size)])
    os.environ["LOCAL_WORLD_SIZE"] = str(world_size)
    one_node, state = run(hierarchical=True)
    del os.environ["LOCAL_WORLD_SIZE"]
    return (
        max(float((a - b).abs().max()) for a, b in zip(flat, one_rank_nodes)),
        max(float((a - b).abs().max()) for a, b in zip(reference, one_node)),
        state.memory.norm(),
        state.stats.as_dict()["bytes_sent"],
    )


@pytest.mark.slow
def test_nodes_of_one_rank_are_flat_mem_sgd_and_one_node_is_plain_allreduce():
    for flat_gap, allreduce_gap, memory_norm, bytes_between_nodes in run_distributed(_degenerate, 3):
        assert flat_gap == 0.0
        assert allreduce_gap == 0.0
        assert memory_norm == 0.0 and bytes_between_nodes == 0


def _void_and_resume(rank, world_size):
    def fresh():
        model = DDP(make_model(), bucket_cap_mb=0.0005)
        state = ErrorFeedbackState(
            compressor=ec_hooks.TopK(0.1), module=model, hierarchical=True, nodes=TWO_BY_TWO
        )
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        return model, state, opt

    outputs = []

    def poison(state, bucket):
        if state.iteration == 2 and rank == 3:
            bucket.buffer()[3] = float("inf")
        return error_feedback_hook(state, bucket).then(
            lambda f: outputs.append((state.iteration, f.value().clone())) or f.value()
        )

    def steps(model, state, opt, start, stop, memories=None):
        for step in range(start, stop):
            x, y = batch(rank, step)
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            if memories is not None:
                memories.append(state.memory.state_dict())
            if all(torch.isfinite(p.grad).all() for p in model.parameters()):
                opt.step()

    model, state, opt = fresh()
    model.register_comm_hook(state, poison)
    memories = []
    steps(model, state, opt, 0, 4, memories)
    voided = all(bool(torch.isnan(out).all()) for it, out in outputs if it == 3)
    others_finite = all(bool(torch.isfinite(out).all()) for it, out in outputs if it != 3)
    unchanged = max(float((memories[1][k] - memories[2][k]).abs().max()) for k in memories[1])

    model, state, opt = fresh()
    model.register_comm_hook(state, error_feedback_hook)
    steps(model, state, opt, 0, 8)
    straight = [p.detach().clone() for p in model.parameters()]
    model, state, opt = fresh()
    model.register_comm_hook(state, error_feedback_hook)
    steps(model, state, opt, 0, 4)
    checkpoint = {"model": model.state_dict(), "opt": opt.state_dict(), "hook": state.state_dict()}
    checkpoint = torch.load(_roundtrip(checkpoint), weights_only=False)
    model, state, opt = fresh()
    model.register_comm_hook(state, error_feedback_hook)
    model.load_state_dict(checkpoint["model"])
    opt.load_state_dict(checkpoint["opt"])
    state.load_state_dict(checkpoint["hook"])
    steps(model, state, opt, 4, 8)
    resumed = [p.detach().clone() for p in model.parameters()]
    gap = max(float((a - b).abs().max()) for a, b in zip(straight, resumed))

    flat = ErrorFeedbackState(compressor=ec_hooks.TopK(0.1), module=model)
    errors = []
    for target, source in ((flat, checkpoint["hook"]), (state, flat.state_dict())):
        try:
            target.load_state_dict(source)
        except ValueError as exc:
            errors.append(str(exc))
    return voided, others_finite, unchanged, gap, errors


@pytest.mark.slow
def test_overflow_voids_the_step_on_every_node_and_resume_is_exact():
    for voided, others_finite, unchanged, gap, errors in run_distributed(_void_and_resume, 4):
        assert voided and others_finite
        assert unchanged == 0.0
        assert gap == 0.0
        assert len(errors) == 2 and all("hierarchy" in e for e in errors)


def _bad_arguments(rank, world_size):
    errors = []
    for options in (
        {"hierarchical": "yes"},
        {"nodes": [[0], [1]]},
        {"hierarchical": True, "process_group": dist.group.WORLD},
        {"hierarchical": True, "nodes": [[0], [1]], "momentum": 0.9},
    ):
        try:
            ErrorFeedbackState(**options)
        except ValueError as exc:
            errors.append(str(exc))
    return errors


def test_bad_arguments_raise_at_construction():
    errors = run_distributed(_bad_arguments, 2)[0]
    assert len(errors) == 4
    assert "momentum correction" in errors[3]
    assert "hierarchical must be True or False" in errors[0]
    assert "nodes is only used with hierarchical=True" in errors[1]
    assert "process_group" in errors[2]


@pytest.mark.parametrize(
    "nodes, env, message",
    [
        (None, {}, "LOCAL_WORLD_SIZE"),
        (None, {"LOCAL_WORLD_SIZE": "3"}, "does not divide"),
        (None, {"LOCAL_WORLD_SIZE": "two"}, "must be an integer"),
        ([[0, 1, 2], [3]], {}, "same number of ranks"),
        ([[0, 1], [1, 2]], {}, "exactly once"),
        ("0123", {}, "lists of global ranks"),
    ],
)
def test_node_layout_refuses_bad_layouts(nodes, env, message):
    with pytest.raises(ValueError, match=message):
        node_layout(nodes, world_size=4, env=env)


def test_node_layout_from_the_launcher_environment():
    assert node_layout(None, world_size=4, env={"LOCAL_WORLD_SIZE": "2"}) == TWO_BY_TWO
    assert node_layout([[2, 3], [0, 1]], world_size=4) == [[2, 3], [0, 1]]


# ---------------------------------------------------------------- hierarchical gossip


def _local_steps(model, rank, step):
    x, y = batch(rank, step)
    model.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    with torch.no_grad():
        for p in model.parameters():
            p.sub_(0.1 * p.grad)


def _flat_params(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _world_mean(t):
    t = t.clone().double()
    dist.all_reduce(t)
    return t / dist.get_world_size()


def _gossip_two_by_two(rank, world_size):
    report = {}
    for name, build in (
        ("deepsqueeze", lambda p, **kw: ec_hooks.DeepSqueeze(p, compressor=ec_hooks.TopK(0.1), **kw)),
        ("choco", lambda p, **kw: ec_hooks.ChocoSGD(p, compressor=ec_hooks.TopK(0.1), **kw)),
        ("dpsgd", lambda p, **kw: ec_hooks.DPSGD(p, **kw)),
    ):
        model = make_model(seed=rank)  # different on every rank
        gossip = build(model.parameters(), hierarchical=True, nodes=TWO_BY_TWO, watch_every=0)
        drift, node_gap = 0.0, 0.0
        for step in range(5):
            _local_steps(model, rank, step)
            before = _world_mean(_flat_params(model))
            gossip.step()
            after = _flat_params(model)
            drift = max(drift, float((_world_mean(after) - before).abs().max()))
            peers = _gather([after])
            node_gap = max(
                node_gap, float((peers[0] - peers[1]).abs().max()), float((peers[2] - peers[3]).abs().max())
            )
        spread = float((peers[0] - peers[2]).abs().max())
        average = torch.cat([p.reshape(-1) for p in gossip.average_parameters()])
        copy = make_model()
        gossip.average_into(copy)
        assert torch.equal(_flat_params(copy), average), f"{name}: average_into is not the mean model"
        report[name] = (
            drift,
            node_gap,
            spread,
            float((average.double() - _world_mean(after)).abs().max()),
            gossip.stats.bytes_sent,
            gossip.consensus_distance(),
            gossip.iteration,
        )
    # D-PSGD between two nodes (pair weights 1/2) is the exact mean of everything
    report["dpsgd_exact"] = float((after.double() - _world_mean(after)).abs().max())
    model = make_model()
    flat_model = make_model()
    flat = ec_hooks.DeepSqueeze(flat_model.parameters(), compressor=ec_hooks.TopK(0.1), watch_every=0)
    hier = ec_hooks.DeepSqueeze(
        model.parameters(), compressor=ec_hooks.TopK(0.1), hierarchical=True, nodes=TWO_BY_TWO, watch_every=0
    )
    flat.step()
    hier.step()
    report["bytes"] = (flat.stats.bytes_sent, hier.stats.bytes_sent)

    # exact resume: 6 steps straight against 3, state dict round trip into a fresh object, 3 more
    def fresh():
        m = make_model(seed=rank)
        return m, ec_hooks.DeepSqueeze(
            m.parameters(), compressor=ec_hooks.TopK(0.1), hierarchical=True, nodes=TWO_BY_TWO, watch_every=0
        )

    model, gossip = fresh()
    for step in range(6):
        _local_steps(model, rank, step)
        gossip.step()
    straight = _flat_params(model)
    model, gossip = fresh()
    for step in range(3):
        _local_steps(model, rank, step)
        gossip.step()
    saved = torch.load(
        _roundtrip({"model": model.state_dict(), "gossip": gossip.state_dict()}), weights_only=False
    )
    model, gossip = fresh()
    model.load_state_dict(saved["model"])
    gossip.load_state_dict(saved["gossip"])
    for step in range(3, 6):
        _local_steps(model, rank, step)
        gossip.step()
    report["resume_gap"] = float((_flat_params(model) - straight).abs().max())
    errors = []
    for target, source in ((gossip, flat.state_dict()), (flat, saved["gossip"])):
        try:
            target.load_state_dict(source)
        except ValueError as exc:
            errors.append(str(exc))
    for options in ({"hierarchical": "yes"}, {"nodes": TWO_BY_TWO}):
        try:
            ec_hooks.DeepSqueeze(make_model().parameters(), **options)
        except ValueError as exc:
            errors.append(str(exc))
    report["errors"] = errors
    return report


@pytest.mark.slow
def test_hierarchical_gossip_averages_nodes_exactly_keeps_the_mean_and_resumes_exactly():
    for per_rank in run_distributed(_gossip_two_by_two, 4):
        flat_bytes, hier_bytes = per_rank.pop("bytes")
        assert 0 < hier_bytes <= flat_bytes / 2  # one neighbour node, half the model: a quarter here
        assert per_rank.pop("dpsgd_exact") < 1e-6
        assert per_rank.pop("resume_gap") == 0.0
        errors = per_rank.pop("errors")
        assert len(errors) == 4
        assert "flat gossip" in errors[0] and "not a gossip state dict" in errors[1]
        assert (
            "hierarchical must be True or False" in errors[2] and "only used with hierarchical" in errors[3]
        )
        for name, (drift, node_gap, spread, average_gap, sent, distance, iteration) in per_rank.items():
            assert drift < 1e-5, f"{name}: the mean model moved ({drift})"
            assert node_gap == 0.0, f"{name}: ranks of one node differ"
            assert iteration == 5 and sent > 0
            assert average_gap < 1e-6
            if name != "dpsgd":
                assert spread > 0 and distance > 0, (
                    f"{name}: compressed gossip cannot reach consensus in 5 steps"
                )


def test_strategies_check_the_hierarchy_arguments_at_construction():
    import lightning_plugin

    for cls in (
        lightning_plugin.MemSGDStrategy,
        lightning_plugin.DeepSqueezeStrategy,
        lightning_plugin.ChocoStrategy,
    ):
        with pytest.raises(ValueError, match="hierarchical must be True or False"):
            cls(hierarchical="yes")
        with pytest.raises(ValueError, match="nodes is only used with hierarchical=True"):
            cls(nodes=TWO_BY_TWO)
        strategy = cls(hierarchical=True, nodes=TWO_BY_TWO)
        assert strategy.hierarchical and strategy.nodes == TWO_BY_TWO
