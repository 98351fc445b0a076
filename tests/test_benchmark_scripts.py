"""The small benchmark scripts run, and what they print is what the library computes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ec_hooks import TopK

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    return done.stdout


def _table(out: str) -> list[list[str]]:
    rows = [
        line.strip("|").split("|") for line in out.splitlines() if line.startswith("| ") and "---" not in line
    ]
    return [[cell.strip() for cell in row] for row in rows[1:]]


def test_topk_wire_cost_reports_the_exact_payload_sizes():
    numel, density = 300_000, 0.01
    rows = {row[0]: row for row in _table(_run("topk_wire_cost.py", "--numel", str(numel), "--repeat", "2"))}
    expected = {
        "int32 + fp32": TopK(density).wire_bytes(numel, torch.float32),
        "delta16 + fp32": TopK(density, index_encoding="delta16").wire_bytes(numel, torch.float32),
        "delta16 + bf16": TopK(density, index_encoding="delta16", value_dtype="bf16").wire_bytes(
            numel, torch.float32
        ),
    }
    assert {name: int(row[1].replace(",", "")) for name, row in rows.items()} == expected
    assert expected["delta16 + bf16"] < 0.51 * expected["int32 + fp32"]


def test_gossip_step_cost_measures_every_requested_case():
    out = _run(
        "gossip_step_cost.py",
        "--numel",
        "50000",
        "--steps",
        "1",
        "--threads",
        "1",
        "--algorithms",
        "ChocoSGD",
        "DeepSqueeze",
        "--compressors",
        "topk",
        "identity",
    )
    rows = _table(out)
    assert [(r[0], r[1], r[2]) for r in rows] == [
        (algorithm, compressor, "this checkout")
        for algorithm in ("ChocoSGD", "DeepSqueeze")
        for compressor in ("topk", "identity")
    ]
    # each step allocates something (the payloads) and takes some time
    assert all(float(r[3]) >= 0 and float(r[5]) > 0 for r in rows)
    assert "profiler" not in out.lower()


def test_memsgd_accuracy_configs_instantiate_with_their_variants(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    monkeypatch.setattr("sys.argv", ["recipes.train"])
    import memsgd_accuracy

    from recipes.train import main

    names = [
        "ddp_adam",
        "topk1_ef",
        "topk1_mc_masking",
        "topk1_mc_warmup",
        "topk01_mc_ramp",
        "topk1_mc_wd_in_optimizer",
        "sign_mc",
        "topk1_mc_ramp16_tail",
    ]
    memsgd_accuracy.write_configs(names, tmp_path)
    built = {
        name: main(
            ["--config", str(tmp_path / f"digits_{name}.yaml"), "--trainer.logger", "false"], run=False
        )
        for name in names
    }
    assert built["ddp_adam"].model.hparams.optimizer == "adam" and built["ddp_adam"].model.hparams.lr == 0.003
    assert built["topk1_ef"].trainer.strategy.momentum_correction is False
    assert built["topk1_mc_masking"].trainer.strategy.momentum_masking is True
    assert built["topk1_mc_warmup"].trainer.strategy.density_warmup_steps == memsgd_accuracy.WARMUP_STEPS
    assert built["topk01_mc_ramp"].trainer.strategy.density_warmup_start == 0.0625
    assert type(built["topk1_mc_wd_in_optimizer"].trainer.strategy).__name__ == "WeightDecayInOptimizer"
    assert built["sign_mc"].trainer.strategy.compressor.name == "sign"
    assert "sign_mc_warmup" not in memsgd_accuracy.rows()  # sign has no density to ramp
    tail = built["topk1_mc_ramp16_tail"].trainer.strategy
    assert tail.send_momentum_tail is True and tail.density_warmup_start == 0.015625
    assert "sign_mc_tail" not in memsgd_accuracy.rows()  # a dense compressor sends no entry whole
    # the logistic regression's momentum-in-the-hook rows: the L2 term in the hook, as the strategy puts it
    placements = {name: method[3] for name, method in memsgd_accuracy.LOGREG_METHODS.items() if method[2]}
    assert sorted(placements.values()) == ["hook", "hook+tail", "optimizer"]


def test_cyclic_accuracy_configs_instantiate_with_their_momentum_settings(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    monkeypatch.setattr("sys.argv", ["recipes.train"])
    import cyclic_accuracy

    from ec_hooks import CyclicTopK
    from recipes.train import main

    names = [
        "cyclic1",
        "cyclic1_mc",
        "cyclic1_ef_filter0.9",
        "cyclic2_bf16",
        "cyclic1_global_oracle_ef",
        "cyclic1_ef_private33",
        "topk1_sparse_allreduce",
        "cyclic1_candidates_ramp16",
        "cyclic2_bf16_ramp_mc_tail",
    ]
    cyclic_accuracy.write_configs(names, tmp_path)
    built = {
        name: main(
            ["--config", str(tmp_path / f"digits_{name}.yaml"), "--trainer.logger", "false"], run=False
        ).trainer.strategy
        for name in names
    }
    assert built["cyclic1"].momentum_correction is False  # the compressor's choice
    assert built["cyclic1_mc"].momentum_correction is True
    assert built["cyclic1_ef_filter0.9"].compressor.memory_filter == 0.9
    assert built["cyclic2_bf16"].compressor.density == 0.02
    assert built["cyclic2_bf16"].compressor.value_dtype == torch.bfloat16
    assert isinstance(built["cyclic1_global_oracle_ef"].compressor, CyclicTopK)
    assert built["cyclic1_ef_private33"].first_steps == 33 and built["cyclic1_ef_private33"].first_private
    assert type(built["topk1_sparse_allreduce"]).__name__ == "WithSparseAllreduce"
    candidates = built["cyclic1_candidates_ramp16"]
    assert candidates.compressor.selects_from_candidates and candidates.density_warmup_steps == 66
    tails = built["cyclic2_bf16_ramp_mc_tail"]
    assert tails.momentum_correction is True and tails.send_momentum_tail is True


@pytest.mark.slow
def test_gossip_bf16_reports_every_case_and_the_master_copy_mixes_in_fp32():
    rows = _table(_run("gossip_bf16.py", "--workers", "3", "--numel", "200", "--steps", "300"))
    assert [(r[0], r[1], r[2]) for r in rows] == [
        (algorithm, dtype, steps)
        for algorithm in ("ChocoSGD", "DeepSqueeze", "DPSGD")
        for steps in ("no", "yes")
        for dtype in ("float32", "bfloat16")
    ]
    choco = {(r[1], r[2]): [float(v) for v in r[3:]] for r in rows if r[0] == "ChocoSGD"}
    fp32, bf16 = choco[("float32", "no")], choco[("bfloat16", "no")]
    assert fp32[0] == fp32[1] and fp32[2] == fp32[3]  # an fp32 model has no master copy
    assert (
        bf16[1] < 10 * fp32[1] + 1e-6 < bf16[0]
    )  # the master copy agrees like fp32; the bf16 parameters cannot
