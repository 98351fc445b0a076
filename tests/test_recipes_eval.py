"""Recipes: validation and test metrics count every sample exactly once on several ranks.

25 validation samples on 3 gloo ranks: Lightning's ``DistributedSampler`` would pad them to 27
(two samples counted twice); the recipes' unrepeated sampler gives the ranks 9, 8 and 8 samples,
that is 2, 1 and 1 batches of 8, and the logged accuracy and loss must equal those computed
over the whole set in one process, for DDP and for gossip (which evaluates the average model).
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from tests.distributed import run_distributed

NUM_SAMPLES = 100  # 25 validation samples
BATCH = 8


def _whole_set(module, data):
    """Accuracy and mean loss over the whole validation set, in this process alone."""
    x, y = data.val_set.tensors
    x, y = data.on_after_batch_transfer((x, y), 0)
    module.eval()
    with torch.no_grad():
        logits = module(x)
    return (logits.argmax(1) == y).double().mean().item(), F.cross_entropy(logits, y).item(), logits


def _evaluate_each(rank, world_size, root, strategy_names):
    os.environ.update(LOCAL_RANK=str(rank), NODE_RANK="0")
    return {name: _evaluate(world_size, root, name) for name in strategy_names}


def _evaluate(world_size, root, strategy_name):
    import lightning.pytorch as pl

    import lightning_plugin  # noqa: F401 - registers "dpsgd"
    from recipes.baselines import TorchHookDDPStrategy
    from recipes.data import SyntheticDataModule
    from recipes.module import ClassificationModule

    pl.seed_everything(0, verbose=False)
    module = ClassificationModule(arch="mlp", lr=0.05, schedule="constant")
    data = SyntheticDataModule(num_samples=NUM_SAMPLES, batch_size=BATCH, noise=3.0)
    strategy = TorchHookDDPStrategy() if strategy_name == "ddp" else strategy_name
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=world_size,
        strategy=strategy,
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=root,
    )
    trainer.fit(module, datamodule=data)
    fitted = {k: float(trainer.callback_metrics[k]) for k in ("val/acc", "val/loss")}
    batches = len(trainer.val_dataloaders)
    validated = trainer.validate(module, datamodule=data, verbose=False)[0]
    tested = trainer.test(module, datamodule=data, verbose=False)[0]
    accuracy, loss, logits = _whole_set(module, data)
    return {
        "fitted": fitted,
        "validated": validated,
        "tested": tested,
        "accuracy": accuracy,
        "loss": loss,
        "batches": batches,
        "logits": logits,
        "labels": data.val_set.tensors[1],
    }


@pytest.mark.slow
def test_eval_metrics_count_every_sample_once_on_three_ranks(tmp_path):
    strategies = ["ddp", "dpsgd"]  # dpsgd evaluates the average model, swapped in at validation start
    per_rank = run_distributed(_evaluate_each, 3, str(tmp_path), strategies, timeout=300)
    for strategy in strategies:
        _check([rank[strategy] for rank in per_rank])


def _check(results):
    assert [r["batches"] for r in results] == [2, 1, 1]  # 9, 8 and 8 samples: uneven, and nothing hangs
    r = results[0]
    assert len(r["labels"]) == NUM_SAMPLES // 4 and 0 < r["accuracy"] < 1
    for rank in results:
        torch.testing.assert_close(rank["logits"], r["logits"])  # the same (average) model everywhere
        for logged in (
            rank["fitted"],
            {k: rank["validated"][k] for k in ("val/acc", "val/loss")},
            {"val/acc": rank["tested"]["test/acc"], "val/loss": rank["tested"]["test/loss"]},
        ):
            assert logged["val/acc"] == pytest.approx(r["accuracy"], abs=1e-6)
            assert logged["val/loss"] == pytest.approx(r["loss"], rel=1e-5)
    # What a padded sampler would have logged: samples 0 and 1 once more.
    correct = (r["logits"].argmax(1) == r["labels"]).double()
    losses = F.cross_entropy(r["logits"], r["labels"], reduction="none")
    padded_loss = (losses.sum() + losses[:2].sum()).item() / 27
    assert padded_loss != pytest.approx(r["loss"], rel=1e-5)
    assert (correct.sum() + correct[:2].sum()).item() / 27 != pytest.approx(r["accuracy"])


def test_an_evaluation_set_smaller_than_the_world_is_refused():
    from recipes.data import SyntheticDataModule

    class _Trainer:
        world_size, global_rank = 3, 2

    data = SyntheticDataModule(num_samples=4, batch_size=1)
    data.setup()
    data.trainer = _Trainer()
    with pytest.raises(ValueError, match="the evaluation set has 1 samples, fewer than the 3 ranks"):
        data.val_dataloader()
