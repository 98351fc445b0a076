"""Recipes: the training entry point and the comparison, on real gloo processes with synthetic data.

* every method's digits config trains a few steps on 2 ranks through ``recipes.train`` (the
  LightningCLI ``fit`` subcommand), all methods in the same two processes;
* ``recipes.compare`` runs a subset of the methods on 3 ranks and writes its table and plot;
* ``python -m recipes.train fit`` runs as a user runs it, Lightning launching the second rank.
"""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from recipes.compare import DEFAULT_METHODS
from tests.distributed import run_distributed

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "recipes" / "configs"
SYNTHETIC = (
    '{"class_path": "recipes.data.SyntheticDataModule", "init_args": {"num_samples": 64, "batch_size": 8}}'
)
STEPS = 4


def _warmup_k(method: str, numel: int) -> int:
    """Entries a Mem-SGD top-k recipe sends per step in these short runs: it ramps the density down
    from ``density_warmup_start`` over more steps than the test trains."""
    config = yaml.safe_load((CONFIGS / f"digits_{method}.yaml").read_text())
    init_args = config["trainer"]["strategy"]["init_args"]
    assert init_args["density_warmup_steps"] > STEPS
    return math.ceil(numel * init_args["density_warmup_start"])


def _smoke_args(method: str, world_size: int, root: str, csv_logger: bool = False) -> list[str]:
    logger = ["--trainer.logger.init_args.save_dir", root] if csv_logger else ["--trainer.logger", "false"]
    args = [
        "fit",
        "--config",
        str(CONFIGS / f"digits_{method}.yaml"),
        "--data",
        SYNTHETIC,
        "--trainer.devices",
        str(world_size),
        "--trainer.max_steps",
        str(STEPS),
        "--trainer.num_sanity_val_steps",
        "0",
        "--trainer.log_every_n_steps",
        "1",
        *logger,
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.enable_model_summary",
        "false",
        "--trainer.default_root_dir",
        os.path.join(root, method),
    ]
    if method == "powersgd":  # compress from the third step on, within the few steps of the test
        args += ["--trainer.strategy.init_args.start_powerSGD_iter", "2"]
    return args


def _fit_every_method(rank, world_size, methods, root):
    # The process group exists already; LOCAL_RANK tells Lightning not to launch processes itself.
    os.environ.update(LOCAL_RANK=str(rank), NODE_RANK="0")
    sys.argv = ["recipes.train"]
    from recipes.train import main

    out = {}
    for method in methods:
        cli = main(_smoke_args(method, world_size, root))
        trainer = cli.trainer
        stats = trainer.strategy.comm_stats
        stats = [stats] if hasattr(stats, "bytes_sent") else list(stats)
        out[method] = {
            "steps": trainer.global_step,
            "loss": float(trainer.callback_metrics["train/loss"]),
            "val_acc": float(trainer.callback_metrics["val/acc"]),
            "params": torch.cat([p.detach().reshape(-1) for p in cli.model.parameters()]),
            "bytes_sent": sum(s.bytes_sent for s in stats),
            "bytes_dense": sum(s.bytes_dense for s in stats),
            "last_sent": sum(s.last_bytes_sent for s in stats),
            "logged_ratio": float(trainer.callback_metrics["comm/compression_ratio"]),
        }
    return out


@pytest.mark.slow
def test_every_method_trains_through_the_entry_point_on_two_ranks(tmp_path):
    results = run_distributed(_fit_every_method, 2, list(DEFAULT_METHODS), str(tmp_path), timeout=600)
    numel = results[0]["ddp"]["params"].numel()
    dense = 4 * numel
    for method in DEFAULT_METHODS:
        r0, r1 = results[0][method], results[1][method]
        assert r0["steps"] == r1["steps"] == STEPS, method
        assert torch.isfinite(torch.tensor(r0["loss"])), method
        # Every method leaves the same model on every rank (the average model for gossip).
        torch.testing.assert_close(r0["params"], r1["params"], msg=method)
        # What the strategy counted is what the monitor logged.
        assert r0["logged_ratio"] == pytest.approx(
            (r0["bytes_dense"] + r1["bytes_dense"]) / (r0["bytes_sent"] + r1["bytes_sent"]), rel=1e-6
        ), method
    r = results[0]
    # torch's hooks really ran on CPU: their rounding and low-rank errors change the model
    for method in ("fp16", "powersgd"):
        assert not torch.equal(r[method]["params"], r["ddp"]["params"]), method
    assert r["ddp"]["bytes_sent"] == STEPS * dense and r["ddp"]["logged_ratio"] == 1.0
    assert r["fp16"]["last_sent"] == dense // 2
    assert (
        r["powersgd"]["last_sent"] < dense / 4 and r["powersgd"]["bytes_sent"] > 2 * dense
    )  # 2 dense steps first
    k = -(-numel // 100)
    # k (index, value) pairs and a status word
    assert r["memsgd_topk1"]["last_sent"] == 8 * _warmup_k("memsgd_topk1", numel) + 4
    assert r["memsgd_topk01"]["last_sent"] == 8 * _warmup_k("memsgd_topk01", numel) + 4
    assert r["memsgd_randk"]["last_sent"] == 4 * k + 4  # values only: the indices are shared
    assert r["ef_sign"]["logged_ratio"] > 25
    # On two ranks the ring is a pair: one neighbour, one message per step, ending in a status word.
    assert r["deepsqueeze_topk"]["last_sent"] == 8 * k + 4
    assert r["choco"]["last_sent"] == 8 * k + 4
    assert r["deepsqueeze_sign"]["logged_ratio"] > 25
    assert r["dpsgd"]["last_sent"] == dense + 4


@pytest.mark.slow
def test_compare_writes_table_and_plot_on_three_ranks(tmp_path):
    from recipes.compare import main

    methods = ["ddp", "memsgd_topk1", "deepsqueeze_sign", "dpsgd"]
    overrides = ["--data", SYNTHETIC, "--trainer.max_steps", "3", "--trainer.num_sanity_val_steps", "0"]
    results = main(
        methods=methods,
        devices=3,
        max_epochs=2,
        overrides=overrides,
        out_dir=str(tmp_path),
        method_timeout=300,
    )
    assert [r.method for r in results] == methods and not any(r.error for r in results)
    by_name = {r.method: r for r in results}
    numel = 38_282
    assert by_name["ddp"].bytes_per_step == 4 * numel and by_name["ddp"].compression_ratio == 1.0
    topk1_bytes = 8 * _warmup_k("memsgd_topk1", numel) + 4
    assert by_name["memsgd_topk1"].bytes_per_step == topk1_bytes
    assert by_name["memsgd_topk1"].compression_ratio == pytest.approx(4 * numel / topk1_bytes)
    # a ring of three: two neighbours, each sent the same payload
    assert by_name["dpsgd"].bytes_per_step == 2 * 4 * (numel + 1)  # two neighbours; + the status word
    assert 10 < by_name["deepsqueeze_sign"].compression_ratio < 20
    for r in results:
        assert r.steps == 3 and 0.0 <= r.accuracy <= 1.0 and len(r.curve) >= 1
    rows = list(csv.DictReader(open(tmp_path / "results.csv")))
    assert [row["method"] for row in rows] == methods
    # 64 samples on 3 ranks, whole batches of 8: 2 steps per epoch.  One validation, after epoch 0
    # (step 2); max_steps=3 ends training inside epoch 1, before its validation.  Every method
    # sends the same bytes at each step, so 2 steps' worth by then.
    curves = list(csv.DictReader(open(tmp_path / "curves.csv")))
    assert [(row["method"], row["epoch"], row["step"]) for row in curves] == [(m, "0", "2") for m in methods]
    for row, r in zip(curves, results):
        assert float(row["accuracy"]) == pytest.approx(r.accuracy)
        assert float(row["bytes_sent"]) == pytest.approx(2 * r.bytes_per_step)
    assert float(curves[0]["bytes_sent"]) == 2 * 4 * numel
    table = (tmp_path / "results.md").read_text()
    assert "| memsgd_topk1 |" in table and "compression vs allreduce" in table
    png = (tmp_path / "accuracy_vs_bytes.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    assert (tmp_path / "ddp" / "config.yaml").is_file()


def test_compare_rejects_unknown_methods(tmp_path):
    from recipes.compare import compare

    with pytest.raises(ValueError, match="methods: no config .* for method 'allgather'"):
        compare(methods=["allgather"], out_dir=tmp_path)
    with pytest.raises(ValueError, match="devices must be an integer >= 1"):
        compare(methods=["ddp"], devices=0, out_dir=tmp_path)


@pytest.mark.slow
def test_command_line_entry_point_launches_two_ranks(tmp_path):
    args = _smoke_args("memsgd_topk1", 2, str(tmp_path), csv_logger=True)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("LOCAL_RANK", None)
    proc = subprocess.run(
        [sys.executable, "-m", "recipes.train", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = list(tmp_path.rglob("metrics.csv"))
    assert len(metrics) == 1
    rows = list(csv.DictReader(open(metrics[0])))
    ratios = [float(row["comm/compression_ratio"]) for row in rows if row.get("comm/compression_ratio")]
    topk1_bytes = 8 * _warmup_k("memsgd_topk1", 38_282) + 4
    assert len(ratios) == STEPS and ratios[-1] == pytest.approx(4 * 38_282 / topk1_bytes, rel=1e-6)
