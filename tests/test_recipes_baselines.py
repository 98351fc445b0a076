"""Recipes: ``TorchHookDDPStrategy(hook="powersgd")`` checkpoints every worker's PowerSGD state and
resumes bit for bit, on real gloo processes (2 and 3 ranks).

Small DDP buckets (``bucket_cap_mb=0.05``) give the run several buckets, so the first step after
the resume (one bucket of every parameter) must be split into the saved layouts.
"""

from __future__ import annotations

import os

import pytest
import torch

from tests.distributed import run_distributed

EPOCHS = 2


def _fit(root, name, world_size, warm_start, ckpt_path=None, seed=0):
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint

    from recipes.baselines import TorchHookDDPStrategy
    from recipes.data import SyntheticDataModule
    from recipes.module import ClassificationModule

    pl.seed_everything(0, verbose=False)  # also the seed of the training sampler's shuffle
    torch.manual_seed(seed)
    module = ClassificationModule(arch="digits_cnn", lr=0.05, schedule="constant")
    data = SyntheticDataModule(num_samples=72, batch_size=8, noise=2.0)
    strategy = TorchHookDDPStrategy(
        hook="powersgd",
        matrix_approximation_rank=1,
        start_powerSGD_iter=2,
        warm_start=warm_start,
        bucket_cap_mb=0.05,
    )
    checkpoints = ModelCheckpoint(dirpath=os.path.join(root, name), filename="{epoch}", save_top_k=-1)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=world_size,
        strategy=strategy,
        max_epochs=EPOCHS,
        logger=False,
        callbacks=[checkpoints],
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        deterministic=True,
    )
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    params = torch.cat([p.detach().reshape(-1) for p in module.parameters()])
    return trainer, params


def _full_and_resumed(rank, world_size, root, warm_start):
    os.environ.update(LOCAL_RANK=str(rank), NODE_RANK="0")
    full, full_params = _fit(root, "full", world_size, warm_start)
    ckpt = os.path.join(root, "full", "epoch=0.ckpt")
    # Another seed: the weights, the optimizer and PowerSGD's state must all come from the checkpoint.
    resumed, resumed_params = _fit(root, "resumed", world_size, warm_start, ckpt_path=ckpt, seed=123)
    state = full.strategy.hook_state
    out = {
        "steps": (full.global_step, resumed.global_step),
        "full": full_params,
        "resumed": resumed_params,
        "iter": (state.iter, resumed.strategy.hook_state.iter),
        "layouts": full.strategy._counting_state.layouts,
        "error": {i: t.clone() for i, t in state.error_dict.items()},
        "stats": (full.strategy.stats.bytes_sent, resumed.strategy.stats.bytes_sent),
    }
    if rank == 0:
        out["checkpoint"] = torch.load(ckpt, weights_only=True)["ec_hooks"]
    # Control: the same checkpoint without the PowerSGD state resumes to other weights.
    if warm_start:
        stripped = os.path.join(root, "stripped.ckpt")
        if rank == 0:
            checkpoint = torch.load(ckpt, weights_only=False)
            del checkpoint["ec_hooks"]
            torch.save(checkpoint, stripped)
        torch.distributed.barrier()
        _, out["stripped"] = _fit(root, "stripped", world_size, warm_start, ckpt_path=stripped)
    return out


@pytest.mark.slow
@pytest.mark.parametrize(("world_size", "warm_start"), [(2, True), (3, False)])
def test_powersgd_resume_is_bit_identical(tmp_path, world_size, warm_start):
    results = run_distributed(_full_and_resumed, world_size, str(tmp_path), warm_start, timeout=400)
    steps_per_epoch = 72 // world_size // 8
    entry = results[0]["checkpoint"]
    assert entry["world_size"] == world_size and entry["strategy"] == "TorchHookDDPStrategy"
    assert len(entry["workers"]) == world_size
    for rank, r in enumerate(results):
        assert r["steps"] == (EPOCHS * steps_per_epoch,) * 2
        assert r["iter"] == (EPOCHS * steps_per_epoch,) * 2
        assert len(r["layouts"]) >= 2  # several buckets: the first resumed step was split
        assert torch.equal(r["full"], r["resumed"]), f"rank {rank}"
        torch.testing.assert_close(r["full"], results[0]["full"], rtol=0, atol=0)
        saved = entry["workers"][rank]["powersgd"]
        assert saved["state"]["counters"]["iter"] == steps_per_epoch
        assert [tuple(layout) for layout in saved["layouts"]] == r["layouts"]
        assert set(saved["state"]["error_dict"]) == set(range(len(r["layouts"])))
        # the P/Q memories of warm start, or none (they are drawn afresh every step)
        assert bool(saved["state"]["q_memory_dict"]) == warm_start
        # what the resumed run counted is what the uninterrupted run counted in its second half
        assert r["stats"][1] < r["stats"][0]
    # error feedback is per worker
    assert not torch.equal(
        entry["workers"][0]["powersgd"]["state"]["error_dict"][0],
        entry["workers"][1]["powersgd"]["state"]["error_dict"][0],
    )
    if warm_start:
        assert not torch.equal(results[0]["stripped"], results[0]["full"])


def test_powersgd_state_dict_rejects_other_options_and_restores_the_generator():
    from torch.distributed.algorithms.ddp_comm_hooks.powerSGD_hook import PowerSGDState

    from recipes.baselines import load_powersgd_state_dict, powersgd_state_dict

    saved = powersgd_state_dict(PowerSGDState(None, matrix_approximation_rank=2))
    with pytest.raises(ValueError, match=r"matrix_approximation_rank=2 \(this run: 1\)"):
        load_powersgd_state_dict(PowerSGDState(None, matrix_approximation_rank=1), saved, torch.device("cpu"))
    # the generator round-trips exactly
    state = PowerSGDState(None)
    state.rng.randint(1000, size=7)
    copy = PowerSGDState(None, random_seed=5)
    load_powersgd_state_dict(copy, powersgd_state_dict(state), torch.device("cpu"))
    assert copy.rng.randint(10**9, size=4).tolist() == state.rng.randint(10**9, size=4).tolist()
