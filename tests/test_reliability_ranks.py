"""Edges of DDP, on real gloo processes: unused parameters, ranks that disagree, subgroups,
sparse gradients, the compiled-autograd Python reducer, fp64 models, zero_grad and clipping.

Each distributed function runs several cases in one process group, so that few processes are
started (each start imports torch).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from ec_hooks import (
    BF16,
    FP16,
    CyclicTopK,
    DeepSqueeze,
    ErrorFeedbackState,
    Identity,
    RandK,
    ScaledSign,
    TopK,
    error_feedback_hook,
)
from tests.distributed import run_distributed

S_GRAD = torch.tensor([1.0, 2.0, 3.0, 4.0])


class TwoParams(nn.Module):
    """A loss linear in its parameters: the gradient of ``w`` is ``a``, that of ``s`` is
    ``[1, 2, 3, 4]`` when ``s`` is used, and no gradient at all when it is not."""

    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(16, dtype=dtype))
        self.s = nn.Parameter(torch.zeros(4, dtype=dtype))

    def forward(self, a, use_s: bool, s_grad: torch.Tensor = S_GRAD):
        loss = (self.w * a).sum()
        if use_s:
            loss = loss + (self.s * s_grad.to(self.s.dtype)).sum()
        return loss


def _uses_s(pattern: str, rank: int, step: int) -> bool:
    return {"first": step == 0, "even": step % 2 == 0, "one_rank": rank == 0 and step % 2 == 0}[pattern]


# ------------------------------------------------------------------ 1. unused parameters


def _unused_parameters(rank, world_size, cases, steps=6):
    out = {}
    for pattern, compressor in cases:
        model = TwoParams()
        ddp = DDP(model, find_unused_parameters=True)
        state = ErrorFeedbackState(compressor=copy.deepcopy(compressor), module=ddp)
        ddp.register_comm_hook(state, error_feedback_hook)
        opt = torch.optim.SGD(ddp.parameters(), lr=1.0)
        start = {n: p.detach().clone() for n, p in model.named_parameters()}
        sum_g = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
        for step in range(steps):
            a = torch.randn(16, generator=torch.Generator().manual_seed(100 * rank + step))
            use_s = _uses_s(pattern, rank, step)
            sum_g["w"] += a
            if use_s:
                sum_g["s"] += S_GRAD
            opt.zero_grad()
            ddp(a, use_s).backward()
            opt.step()
        memories = state.memory.state_dict()
        row = {}
        for name, p in model.named_parameters():
            mean_g = sum_g[name].clone()
            dist.all_reduce(mean_g)
            memory = memories.get(name, torch.zeros(p.numel())).reshape(p.shape).clone()
            dist.all_reduce(memory)
            row[name] = {
                "applied": start[name] - p.detach(),
                "mean_memory": memory / world_size,
                "mean_grad": mean_g / world_size,
            }
        out[(pattern, repr(compressor))] = row
    return out


UNUSED_CASES_2 = [
    ("first", TopK(0.25)),
    ("even", TopK(0.25)),
    ("even", ScaledSign()),
    ("one_rank", RandK(0.25, seed=1)),
]
UNUSED_CASES_3 = [("first", TopK(0.25)), ("even", TopK(0.25)), ("one_rank", TopK(0.25))]


@pytest.mark.parametrize(
    "world_size, cases",
    [(2, UNUSED_CASES_2), pytest.param(3, UNUSED_CASES_3, marks=pytest.mark.slow)],
    ids=["2ranks", "3ranks"],
)
def test_unused_parameters_keep_their_memory(world_size, cases):
    """Nothing is lost: mean applied update + mean memory = mean gradient, for every parameter,
    also for one that no rank used at some steps (DDP drops the hook's output for it)."""
    rows = run_distributed(_unused_parameters, world_size, cases)[0]
    for (pattern, compressor), row in rows.items():
        for name, r in row.items():
            torch.testing.assert_close(
                r["applied"] + r["mean_memory"],
                r["mean_grad"],
                atol=1e-5,
                rtol=1e-5,
                msg=lambda m, p=pattern, c=compressor, n=name: f"{p} {c} {n}: {m}",
            )
    first = rows[("first", repr(TopK(0.25)))]["s"]
    # s had gradient [1, 2, 3, 4] once, then no rank used it: its memory keeps what was not sent.
    assert float(first["mean_memory"].abs().sum()) > 0
    torch.testing.assert_close(first["applied"] + first["mean_memory"], S_GRAD)


def _unused_with_momentum(rank, world_size):
    model = TwoParams()
    ddp = DDP(model, find_unused_parameters=True)
    state = ErrorFeedbackState(compressor=TopK(0.25), module=ddp, momentum=0.9)
    ddp.register_comm_hook(state, error_feedback_hook)
    snapshots = []
    for step in range(4):
        ddp(torch.randn(16, generator=torch.Generator().manual_seed(10 * rank + step)), step == 0).backward()
        snapshots.append(
            (
                state.memory.state_dict()["s"].clone(),
                state.momentum_correction.velocity.state_dict()["s"].clone(),
            )
        )
    return snapshots


def test_unused_parameters_keep_their_momentum_velocity():
    """The same rule for every per-parameter state: while no rank uses s, neither its memory nor
    its velocity changes (without it the velocity would decay and its memory would be sent)."""
    for snapshots in run_distributed(_unused_with_momentum, 2):
        memory0, velocity0 = snapshots[0]
        assert float(velocity0.abs().sum()) > 0
        for memory, velocity in snapshots[1:]:
            assert torch.equal(memory, memory0) and torch.equal(velocity, velocity0)


# ------------------------------------------------------------------ 2. ranks that disagree


def _hook_case(rank, world_size, case):
    """Each rank's ErrorFeedbackState for ``case``; the rest of the setup is the same everywhere."""
    kwargs = {"compressor": TopK(0.25)}
    if case == "density":
        kwargs["compressor"] = TopK(0.25 if rank == 0 else 0.5)
    elif case == "seed":
        kwargs["compressor"] = RandK(0.1, seed=rank)
    elif case == "wire":
        kwargs["compressor"] = FP16() if rank == 0 else BF16()
    elif case == "start_iter":
        kwargs["start_iter"] = 0 if rank == world_size - 1 else 2
    elif case == "backend":  # how, not what, is computed: no disagreement
        kwargs["compressor"] = TopK(0.25, backend="torch" if rank == 0 else "cpu")
    return kwargs


def _disagreements(rank, world_size, cases):
    out = {}
    for case in cases:
        model = TwoParams()
        ddp = DDP(model)
        if case == "resumed":
            # Every rank trains 2 steps and saves; then only rank 0 resumes, the others start afresh.
            state = ErrorFeedbackState(compressor=TopK(0.25), module=ddp)
            ddp.register_comm_hook(state, error_feedback_hook)
            for _ in range(2):
                ddp(torch.ones(16), True).backward()
            saved = state.state_dict()
            ddp = DDP(model)
            state = ErrorFeedbackState(compressor=TopK(0.25), module=ddp)
            if rank == 0:
                state.load_state_dict(saved)
        else:
            state = ErrorFeedbackState(module=ddp, **_hook_case(rank, world_size, case))
        ddp.register_comm_hook(state, error_feedback_hook)
        try:
            for _ in range(2):
                ddp(torch.ones(16), True).backward()
            out[case] = None
        except Exception as error:  # noqa: BLE001 - what each rank raised goes back to the test
            out[case] = (type(error).__name__, str(error))
    # gossip: another consensus step on the last rank; another topology on the last rank
    for case in ("consensus_step", "topology", "gossip_resumed"):
        params = [torch.zeros(10)]
        kwargs = {"compressor": TopK(0.5), "consensus_step": 0.5, "topology": "ring"}
        last = rank == world_size - 1
        if case == "consensus_step" and last:
            kwargs["consensus_step"] = 0.25
        if case == "topology" and last:
            kwargs["topology"] = "complete"
        gossip = DeepSqueeze(params, **kwargs)
        if case == "gossip_resumed":
            # Every rank resumes, but rank 0 from the checkpoint of a later step.
            earlier = gossip.state_dict()
            gossip.step()
            later = gossip.state_dict()
            gossip = DeepSqueeze([torch.zeros(10)], **kwargs)
            gossip.load_state_dict(later if rank == 0 else earlier)
        try:
            gossip.step()
            out[case] = None
        except Exception as error:  # noqa: BLE001
            out[case] = (type(error).__name__, str(error))
    return out


HOOK_CASES = ["density", "seed", "wire", "start_iter", "resumed", "backend"]
EXPECTED_FIELD = {
    "density": "compressor",
    "seed": "compressor",
    "wire": "compressor",
    "start_iter": "start_iter",
    "resumed": "resumed",
    "consensus_step": "consensus_step",
    "topology": "topology",
    "gossip_resumed": "iteration",
}


@pytest.mark.parametrize("world_size", [2, pytest.param(3, marks=pytest.mark.slow)])
def test_ranks_that_disagree_all_raise_a_value_error_naming_what_differs(world_size):
    results = run_distributed(_disagreements, world_size, HOOK_CASES)
    assert all(r["backend"] is None for r in results)  # a local choice is no disagreement
    for case, field in EXPECTED_FIELD.items():
        for rank, r in enumerate(results):
            assert r[case] is not None, f"{case}: rank {rank} raised nothing"
            kind, message = r[case]
            assert kind == "ValueError", (case, rank, message)
            assert "disagree" in message and f"  {field}:" in message, (case, message)
    # The message names the values and the ranks that hold them.
    message = results[0]["density"][1]
    assert "TopK(density=0.25) on rank 0" in message
    assert f"TopK(density=0.5) on rank{'s 1, 2' if world_size == 3 else ' 1'}" in message
    assert "RandK(density=0.1, seed=0) on rank 0" in results[0]["seed"][1]
    assert "iteration" in results[0]["resumed"][1]


# ------------------------------------------------------------------ 5. DDP over a subgroup


def _subgroup(rank, world_size):
    # Groups: {0, 1} and {2} on three ranks, {0} and {1} on two.
    members = [[0, 1], [2]] if world_size == 3 else [[0], [1]]
    groups = [dist.new_group(m) for m in members]
    mine = next(g for g, m in zip(groups, members) if rank in m)
    model = TwoParams()
    ddp = DDP(model, process_group=mine)
    state = ErrorFeedbackState(compressor=Identity(), module=ddp)
    ddp.register_comm_hook(state, error_feedback_hook)
    ddp(torch.full((16,), float(rank)), True).backward()
    try:
        ErrorFeedbackState(process_group=dist.group.WORLD, module=ddp)
        refused = None
    except ValueError as error:
        refused = str(error)
    return {"grad": model.w.grad.clone(), "group_is_ddps": state.process_group is mine, "refused": refused}


@pytest.mark.parametrize("world_size", [2, pytest.param(3, marks=pytest.mark.slow)])
def test_state_takes_the_ddp_process_group_and_refuses_another(world_size):
    results = run_distributed(_subgroup, world_size)
    expected = [0.5, 0.5, 2.0] if world_size == 3 else [0.0, 1.0]
    for rank, r in enumerate(results):
        assert r["group_is_ddps"]
        torch.testing.assert_close(r["grad"], torch.full((16,), expected[rank]))
        assert r["refused"] is not None and "pass process_group=None" in r["refused"]


# ------------------------------------------------------------------ 6. where support ends; fp64


class Embedder(nn.Module):
    def __init__(self, sparse: bool):
        super().__init__()
        self.emb = nn.Embedding(10, 4, sparse=sparse)

    def forward(self, idx):
        return self.emb(idx).sum()


def _fp64_and_limits(rank, world_size):
    out = {}
    # fp64: Identity reproduces DDP's default allreduce bit for bit; the sparsifiers work in fp64.
    finals = {}
    compressors = {
        "identity": lambda: Identity(),
        "topk": lambda: TopK(0.25),
        "cyclic": lambda: CyclicTopK(0.25),
        "cyclic_filter": lambda: CyclicTopK(0.25, memory_filter=0.9),
    }
    for name in ("ddp", *compressors):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 1)).double()
        ddp = DDP(model)
        state = None
        if name != "ddp":
            state = ErrorFeedbackState(compressor=compressors[name](), module=ddp)
            ddp.register_comm_hook(state, error_feedback_hook)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
        for step in range(4):
            x = torch.randn(
                5, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(10 * rank + step)
            )
            opt.zero_grad()
            ddp(x).pow(2).mean().backward()
            opt.step()
        finals[name] = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        if state is not None:
            out[f"{name}_memory_dtypes"] = {str(m.dtype) for m in state.memory.state_dict().values()}
    out["identity_equals_ddp"] = torch.equal(finals["identity"], finals["ddp"])
    for name in ("topk", "cyclic", "cyclic_filter"):
        out[f"{name}_finite"] = bool(torch.isfinite(finals[name]).all())
    # Sparse gradients: refused at construction when the module is known, and in the hook otherwise.
    ddp = DDP(Embedder(sparse=True))
    try:
        ErrorFeedbackState(module=ddp)
        out["sparse_construction"] = None
    except ValueError as error:
        out["sparse_construction"] = str(error)
    ddp.register_comm_hook(ErrorFeedbackState(), error_feedback_hook)
    try:
        ddp(torch.tensor([1, 2, 3])).backward()
        out["sparse_hook"] = None
    except Exception as error:  # noqa: BLE001
        out["sparse_hook"] = (type(error).__name__, str(error))
    # The compiled-autograd Python reducer calls comm hooks with (grad, param), not a bucket.
    state = ErrorFeedbackState()
    p = nn.Parameter(torch.ones(3))
    try:
        error_feedback_hook(state, (torch.ones(3), p))
        out["python_reducer_hook"] = None
    except TypeError as error:
        out["python_reducer_hook"] = str(error)
    import torch._dynamo as dynamo

    dynamo.config.optimize_ddp = "python_reducer"
    try:
        ddp = DDP(TwoParams())
        ErrorFeedbackState(module=ddp)
        out["python_reducer_construction"] = None
    except ValueError as error:
        out["python_reducer_construction"] = str(error)
    finally:
        dynamo.config.optimize_ddp = True
    return out


@pytest.mark.slow
def test_fp64_is_supported_and_sparse_gradients_and_the_python_reducer_are_refused_clearly():
    for r in run_distributed(_fp64_and_limits, 2):
        assert r["identity_equals_ddp"]
        for name in ("identity", "topk", "cyclic", "cyclic_filter"):
            assert r[f"{name}_memory_dtypes"] == {"torch.float64"}, name
        assert r["topk_finite"] and r["cyclic_finite"] and r["cyclic_filter_finite"]
        assert "sparse=True" in r["sparse_construction"] and "sparse=False" in r["sparse_construction"]
        kind, message = r["sparse_hook"]
        assert "sparse" in message and "sparse=False" in message, message
        assert "python_reducer" in r["python_reducer_hook"]
        assert "python_reducer" in r["python_reducer_construction"]


# ------------------------------------------------------------------ 9. zero_grad and clipping


def _zero_grad_and_clipping(rank, world_size):
    out = {}
    for name in ("ddp", "memsgd"):
        model = TwoParams()
        ddp = DDP(model)
        if name == "memsgd":
            ddp.register_comm_hook(ErrorFeedbackState(compressor=TopK(0.1), module=ddp), error_feedback_hook)
        opt = torch.optim.SGD(ddp.parameters(), lr=1.0)
        # A batch whose backward already ran is discarded with zero_grad(): top-2 of the 20
        # entries sent s's 3 and 4 and kept [1, 2, 0, 0] in memory ...
        ddp(torch.zeros(16), True).backward()
        opt.zero_grad()
        # ... and the next batch's gradient is zero: what does s receive?
        ddp(torch.zeros(16), True, torch.zeros(4)).backward()
        out[name] = model.s.grad.clone()
    # Clipping acts on the aggregated, compressed gradient; the memory keeps the unclipped residual.
    memories = []
    for clip in (False, True):
        model = TwoParams()
        ddp = DDP(model)
        state = ErrorFeedbackState(compressor=TopK(0.25), module=ddp)
        ddp.register_comm_hook(state, error_feedback_hook)
        ddp(torch.arange(16.0), True).backward()
        if clip:
            norm = float(torch.nn.utils.clip_grad_norm_(ddp.parameters(), max_norm=1e-3))
            out["clipped_norm"] = float(torch.cat([p.grad.reshape(-1) for p in model.parameters()]).norm())
            out["norm_before_clip"] = norm
        memories.append(state.memory.state_dict())
    out["memory_unchanged_by_clipping"] = all(
        torch.equal(memories[0][k], memories[1][k]) for k in memories[0]
    )
    return out


@pytest.mark.slow
def test_zero_grad_cannot_discard_what_the_hook_took_and_clipping_acts_after_compression():
    for r in run_distributed(_zero_grad_and_clipping, 2):
        assert torch.equal(r["ddp"], torch.zeros(4))
        # The memory of the discarded batch is sent with the next one.
        assert torch.equal(r["memsgd"], torch.tensor([1.0, 2.0, 0.0, 0.0]))
        assert r["clipped_norm"] == pytest.approx(1e-3, rel=1e-4) and r["norm_before_clip"] > 1e-3
        assert r["memory_unchanged_by_clipping"]


# ------------------------------------------------------------------ 8. checkpoint checks; weights_only loads


class Shaped(nn.Module):
    def __init__(self, shape):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(shape))


def test_memories_of_another_shape_are_refused_at_load(one_rank_group):
    saved = ErrorFeedbackState(module=Shaped((6, 4)))
    saved.memory.buffer_for(["weight"], [24], torch.device("cpu")).fill_(1.0)
    sd = saved.state_dict()
    assert sd["shapes"] == {"weight": [6, 4]}
    with pytest.raises(ValueError, match=r"saved for shape \(6, 4\), the parameter has shape \(4, 6\)"):
        ErrorFeedbackState(module=Shaped((4, 6))).load_state_dict(sd)
    # Without module=, the state learns the shape when the hook first meets the parameter.
    unbound = ErrorFeedbackState()
    unbound.load_state_dict(
        {**sd, "memories": {"param0": sd["memories"]["weight"]}, "shapes": {"param0": [6, 4]}, "layouts": []}
    )
    with pytest.raises(ValueError, match=r"saved for shape \(6, 4\), the parameter has shape \(4, 6\)"):
        unbound._key(nn.Parameter(torch.zeros(4, 6)))
    ErrorFeedbackState(module=Shaped((6, 4))).load_state_dict(sd)  # the same shape loads


def test_memories_of_another_model_are_refused_at_load_when_the_module_is_known(one_rank_group):
    sd = ErrorFeedbackState(module=nn.Linear(4, 3)).state_dict()
    sd["memories"] = {"weight": torch.zeros(12), "bias": torch.zeros(3)}
    with pytest.raises(ValueError, match="parameters the model does not have"):
        ErrorFeedbackState(module=nn.Sequential(nn.Linear(4, 3))).load_state_dict(sd)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_memories_are_refused_at_load(one_rank_group, bad):
    state = ErrorFeedbackState(module=Shaped((6, 4)))
    sd = state.state_dict()
    memory = torch.zeros(24)
    memory[5] = bad
    sd["memories"] = {"weight": memory}
    with pytest.raises(ValueError, match="1 non-finite entries"):
        state.load_state_dict(sd)


def test_hook_and_gossip_state_dicts_load_with_weights_only(one_rank_group, tmp_path):
    model = nn.Linear(4, 3)
    state = ErrorFeedbackState(compressor=TopK(0.5), module=model)
    state.memory.buffer_for(["weight", "bias"], [12, 3], torch.device("cpu")).fill_(0.5)
    torch.save(state.state_dict(), tmp_path / "hook.pt")
    loaded = torch.load(tmp_path / "hook.pt", weights_only=True)
    fresh = ErrorFeedbackState(compressor=TopK(0.5), module=model)
    fresh.load_state_dict(loaded)
    assert all(
        torch.equal(a, b)
        for a, b in zip(fresh.memory.state_dict().values(), state.memory.state_dict().values())
    )
    workers = DeepSqueeze.simulated(
        [[torch.randn(7)] for _ in range(3)], compressor=TopK(0.5), consensus_step=0.5
    )
    from ec_hooks.gossip import simulate_step

    simulate_step(workers)
    torch.save(workers[1].state_dict(), tmp_path / "gossip.pt")
    loaded = torch.load(tmp_path / "gossip.pt", weights_only=True)
    assert loaded["iteration"] == 1 and torch.equal(
        loaded["buffers"]["delta"], workers[1].state_dict()["buffers"]["delta"]
    )
