"""Mem-SGD resumes bit for bit from a checkpoint, with several DDP buckets, on 2 and 3 gloo ranks.

A new DDP instance reduces its first step in one bucket holding every parameter and rebuilds its
buckets afterwards, so the first step after a resume meets another bucket layout than the
uninterrupted run.  Each scenario trains uninterrupted while writing a checkpoint per rank at
step ``RESUME_AT``; a second launch of all ranks resumes from those files.
"""

from __future__ import annotations

import logging

import pytest
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

import ec_hooks
from ec_hooks import ErrorFeedbackState, error_feedback_hook

from .distributed import run_distributed

STEPS = 6
RESUME_AT = 3
BUCKET_CAP_MB = 0.0002  # about 210 bytes: one bucket per Linear layer after DDP's rebuild

# name -> (compressor, start_iter, more ErrorFeedbackState arguments)
CONFIGS = {
    "randk": (lambda: ec_hooks.RandK(0.25, seed=3), 0, {}),
    "qsgd": (lambda: ec_hooks.QSGD(levels=3, seed=1), 0, {}),
    "topk": (lambda: ec_hooks.TopK(0.1), 0, {}),
    "randk_warmup": (lambda: ec_hooks.RandK(0.25, seed=3), RESUME_AT + 1, {}),  # resumes inside the warm-up
    # momentum correction with everything on, resumed inside the density warm-up (25% for 5 steps)
    "topk_momentum": (
        lambda: ec_hooks.TopK(0.1),
        0,
        {
            "momentum": 0.9,
            "nesterov": True,
            "weight_decay": 1e-3,
            "clip_norm": 1.0,
            "momentum_masking": True,
            "density_warmup_steps": 5,
        },
    ),
    # velocities through a dense warm-up (start_iter) that the resume falls into
    "randk_momentum_warmup": (lambda: ec_hooks.RandK(0.25, seed=3), RESUME_AT + 1, {"momentum": 0.9}),
    # the momentum tails travel with the payload (its second compression must resume too)
    "topk_momentum_tail": (lambda: ec_hooks.TopK(0.1), 0, {"momentum": 0.9, "send_momentum_tail": True}),
    # the leader rotates with the step and the bucket: a resume must pick the same leaders
    "cyclic_topk": (lambda: ec_hooks.CyclicTopK(0.1), 0, {}),
    "cyclic_topk_filter": (lambda: ec_hooks.CyclicTopK(0.1, memory_filter=0.5), 0, {}),
    # the nominations and the kept sums depend on the memories only, resumed inside the warm-up
    "cyclic_topk_candidates": (
        lambda: ec_hooks.CyclicTopK(0.1, selection="candidates"),
        0,
        {"density_warmup_steps": 5, "density_warmup_start": 0.4},
    ),
    # the digits recipe's setting: the tails added at the union by the transport
    "cyclic_topk_candidates_momentum_tail": (
        lambda: ec_hooks.CyclicTopK(0.1, selection="candidates"),
        0,
        {"momentum": 0.9, "send_momentum_tail": True},
    ),
}


def make_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(8, 16),
        torch.nn.Tanh(),
        torch.nn.Linear(16, 16),
        torch.nn.Tanh(),
        torch.nn.Linear(16, 4),
    )


def batch(rank, step):
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(6, 8, generator=g), torch.randn(6, 4, generator=g)


def fresh(config):
    make_compressor, start_iter, kwargs = CONFIGS[config]
    module = make_model()
    model = DDP(module, bucket_cap_mb=BUCKET_CAP_MB)
    state = ErrorFeedbackState(compressor=make_compressor(), start_iter=start_iter, module=model, **kwargs)
    model.register_comm_hook(state, error_feedback_hook)
    # with momentum correction the hook holds the momentum
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.0 if kwargs.get("momentum") else 0.9)
    return module, model, state, opt


def train(rank, module, model, state, opt, start, checkpoint_path=None):
    trajectory = []
    for step in range(start, STEPS):
        if step == RESUME_AT and checkpoint_path is not None:
            torch.save(
                {"model": module.state_dict(), "opt": opt.state_dict(), "hook": state.state_dict()},
                checkpoint_path,
            )
        x, y = batch(rank, step)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        trajectory.append(torch.cat([p.detach().reshape(-1).clone() for p in module.parameters()]))
    correction = state.momentum_correction
    return {
        "trajectory": trajectory,
        "memories": state.memory.state_dict(),
        "iteration": state.iteration,
        "velocities": {} if correction is None else correction.velocity.state_dict(),
        "bytes_sent": state.stats.bytes_sent,
        "memory_norm": state.memory.norm(),
        "residual_norm": state.stats.residual_norm,
        "layouts": sorted(state.memory.layouts()),
    }


def _uninterrupted(rank, world_size, directory, configs):
    return {c: train(rank, *fresh(c), 0, f"{directory}/{c}_rank{rank}.pt") for c in configs}


def _resumed(rank, world_size, directory, configs, edit=None):
    out = {}
    for config in configs:
        module, model, state, opt = fresh(config)
        checkpoint = torch.load(f"{directory}/{config}_rank{rank}.pt", weights_only=False)
        out[config] = {"saved_layouts": checkpoint["hook"].get("layouts")}
        if edit == "drop_layouts":  # a state dict written before layouts were recorded
            del checkpoint["hook"]["layouts"]
        elif edit == "straddle":  # a saved layout that DDP's first bucket holds only part of
            layouts = checkpoint["hook"]["layouts"]
            checkpoint["hook"]["layouts"] = [layouts[0][:1]]
        module.load_state_dict(checkpoint["model"])
        opt.load_state_dict(checkpoint["opt"])
        state.load_state_dict(checkpoint["hook"])
        records = []
        handler = logging.Handler()
        handler.emit = records.append
        logging.getLogger("ec_hooks.layouts").addHandler(handler)
        logging.getLogger("ec_hooks.layouts").setLevel(logging.INFO)
        try:
            out[config].update(train(rank, module, model, state, opt, RESUME_AT))
        finally:
            logging.getLogger("ec_hooks.layouts").removeHandler(handler)
        out[config]["log"] = [r.getMessage() for r in records]
    return out


@pytest.fixture(scope="module", params=[2, pytest.param(3, marks=pytest.mark.slow)], ids=["2ranks", "3ranks"])
def uninterrupted(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(f"resume{request.param}")
    results = run_distributed(_uninterrupted, request.param, str(directory), list(CONFIGS))
    return request.param, directory, results


def test_resume_is_bit_identical_to_the_uninterrupted_run(uninterrupted):
    world_size, directory, full = uninterrupted
    resumed = run_distributed(_resumed, world_size, str(directory), list(CONFIGS))
    for rank in range(world_size):
        for config in CONFIGS:
            a, b = full[rank][config], resumed[rank][config]
            # the run really had several buckets, and the checkpoint recorded them
            assert len(b["saved_layouts"]) == 3, config
            assert sorted(map(tuple, b["saved_layouts"])) == a["layouts"], config
            for step, (x, y) in enumerate(zip(a["trajectory"][RESUME_AT:], b["trajectory"]), RESUME_AT):
                assert torch.equal(x, y), f"{config}: rank {rank} differs after step {step}"
            assert a["memories"].keys() == b["memories"].keys()
            assert all(torch.equal(a["memories"][k], b["memories"][k]) for k in a["memories"]), config
            assert a["velocities"].keys() == b["velocities"].keys()
            assert all(torch.equal(a["velocities"][k], b["velocities"][k]) for k in a["velocities"]), config
            assert bool(a["velocities"]) == ("momentum" in config), config
            assert (a["iteration"], a["bytes_sent"]) == (b["iteration"], b["bytes_sent"]), config
            assert a["memory_norm"] == b["memory_norm"], config  # memories listed in the same order
            # the same memories, summed in another order
            assert a["residual_norm"] == pytest.approx(b["residual_norm"], rel=1e-12), config
            assert b["layouts"] == a["layouts"] and not b["log"], config
    # the workers agree with each other, and the compressors did select (no step was dense: a
    # dense step empties a whole bucket's memory; one parameter's may empty when all of it is sent)
    for config in CONFIGS:
        assert all(torch.equal(full[0][config]["trajectory"][-1], r[config]["trajectory"][-1]) for r in full)
        memories = full[0][config]["memories"]
        assert all(sum(memories[k].abs().sum() for k in layout) > 0 for layout in full[0][config]["layouts"])


@pytest.mark.parametrize("edit", ["drop_layouts", "straddle"])
def test_without_whole_saved_layouts_the_first_step_differs_and_nothing_is_lost(uninterrupted, edit):
    world_size, directory, full = uninterrupted
    if world_size == 3:
        pytest.skip("the 2-rank run covers the documented inexact case")
    resumed = run_distributed(_resumed, world_size, str(directory), ["randk"], edit)
    for rank in range(world_size):
        a, b = full[rank]["randk"], resumed[rank]["randk"]
        # the first step compresses DDP's one initial bucket whole: other rand-k indices
        assert not torch.equal(a["trajectory"][RESUME_AT], b["trajectory"][0])
        assert b["iteration"] == STEPS
        assert all(torch.isfinite(t).all() for t in b["trajectory"])
        assert b["layouts"] == a["layouts"]  # DDP's rebuilt layout rules afterwards
        assert bool(b["log"]) == (edit == "straddle")
    # the memories stay consistent across ranks: every rank still applies the same update
    assert all(
        torch.equal(resumed[0]["randk"]["trajectory"][-1], r["randk"]["trajectory"][-1]) for r in resumed
    )


def _layout_key_check(rank, world_size):
    model = DDP(make_model(), bucket_cap_mb=BUCKET_CAP_MB)
    state = ErrorFeedbackState(compressor=ec_hooks.RandK(0.25), module=model)
    errors = {}
    for name, layouts in (("unknown", [["nope"]]), ("twice", [["0.bias"], ["0.bias"]]), ("shape", "0.bias")):
        try:
            state.load_state_dict(
                {"memories": {}, "world_size": world_size, "rank": rank, "layouts": layouts}
            )
        except ValueError as exc:
            errors[name] = str(exc)
    return errors, state._layout_seed(("0.weight", "0.bias"))


def test_layout_keys_are_stable_and_bad_layouts_are_refused():
    results = run_distributed(_layout_key_check, 2)
    errors, key = results[0]
    assert "does not have" in errors["unknown"] and "nope" in errors["unknown"]
    assert "more than one" in errors["twice"]
    assert "list of non-empty lists" in errors["shape"]
    # the same on every rank and in every process (no salted hash)
    assert key == results[1][1]
    from ec_hooks.compressors import _seed_from

    assert key == _seed_from("0.weight", "0.bias")
