"""Recipes: ``recipes.compare`` reports every method when one hangs or fails.

Three methods on 2 gloo processes: one whose setup never returns (it must time out, the workers
are replaced), one that raises on every rank, and plain DDP, which must still train and get its
row in the table and the CSV.
"""

from __future__ import annotations

import csv
import time
from pathlib import Path

import pytest
import yaml
from lightning.pytorch import Callback

ROOT = Path(__file__).resolve().parents[1]
SYNTHETIC = (
    '{"class_path": "recipes.data.SyntheticDataModule", "init_args": {"num_samples": 64, "batch_size": 8}}'
)
TIMEOUT = 30.0  # long enough for the DDP method on a loaded 2-core machine; the hang waits it out once


class HangInSetup(Callback):
    def setup(self, trainer, pl_module, stage):
        time.sleep(3600)


class FailInSetup(Callback):
    def setup(self, trainer, pl_module, stage):
        raise ValueError("this method is broken on purpose")


def _configs(folder: Path) -> Path:
    folder.mkdir()
    ddp = yaml.safe_load((ROOT / "recipes" / "configs" / "digits_ddp.yaml").read_text())
    (folder / "digits_ddp.yaml").write_text(yaml.safe_dump(ddp))
    for method, callback in (("hang", HangInSetup), ("fail", FailInSetup)):
        config = yaml.safe_load(yaml.safe_dump(ddp))
        config["trainer"]["callbacks"] = [{"class_path": f"{__name__}.{callback.__name__}"}]
        (folder / f"digits_{method}.yaml").write_text(yaml.safe_dump(config))
    return folder


@pytest.mark.slow
def test_a_method_that_hangs_or_fails_leaves_the_others_running(tmp_path):
    from recipes.compare import main

    out = tmp_path / "out"
    methods = ["hang", "fail", "ddp"]
    overrides = ["--data", SYNTHETIC, "--trainer.num_sanity_val_steps", "0"]  # one epoch: 4 steps
    started = time.monotonic()
    results = main(
        methods=methods,
        devices=2,
        max_epochs=1,
        overrides=overrides,
        out_dir=str(out),
        method_timeout=TIMEOUT,
        config_dir=str(_configs(tmp_path / "configs")),
    )
    assert time.monotonic() - started < 300
    assert [r.method for r in results] == methods
    hang, fail, ddp = results
    assert hang.error == f"timeout: no result within {TIMEOUT:g} s"
    assert fail.error == "ValueError: this method is broken on purpose"
    assert not ddp.error and ddp.steps == 4 and ddp.bytes_per_step == 4 * 38_282 and 0 <= ddp.accuracy <= 1
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert [(row["method"], row["error"]) for row in rows] == [(r.method, r.error) for r in results]
    table = (out / "results.md").read_text()
    assert f"| hang | failed: timeout: no result within {TIMEOUT:g} s |" in table
    assert "| fail | failed: ValueError: this method is broken on purpose |" in table
    assert "| ddp | " in table and (out / "ddp" / "config.yaml").is_file()


def test_method_timeout_must_be_positive(tmp_path):
    from recipes.compare import compare

    with pytest.raises(ValueError, match="method_timeout must be a number of seconds > 0, got 0"):
        compare(methods=["ddp"], method_timeout=0, out_dir=tmp_path)


def _result(method: str, accuracy: float, bytes_per_step: float, epochs: int = 3):
    from recipes.compare import CurvePoint, MethodResult

    curve = [
        CurvePoint(bytes_per_step * 10 * (e + 1), accuracy - 0.1 / (e + 1), e, 10 * (e + 1))
        for e in range(epochs)
    ]
    return MethodResult(
        method,
        f"{method}.yaml",
        accuracy,
        bytes_per_step,
        153_128.0,
        153_128 / bytes_per_step,
        10 * epochs,
        1.0,
        curve,
    )


# The main job's table: several methods share their bytes and accuracy (two points coincide).
MAIN_JOB = [
    ("ddp", 0.9833, 153_128),
    ("fp16", 0.9833, 76_564),
    ("powersgd", 0.9805, 18_344),
    ("memsgd_topk1", 0.9805, 3_932),
    ("memsgd_topk1_nocorr", 0.9610, 3_068),
    ("memsgd_topk1_compact", 0.9721, 1_536),
    ("memsgd_cyclic_topk1", 0.9861, 2_968),
    ("memsgd_topk01", 0.9721, 4_349),
    ("memsgd_randk", 0.7409, 1_536),
    ("ef_sign", 0.9777, 4_796),
    ("deepsqueeze_topk", 0.9777, 6_136),
    ("deepsqueeze_sign", 0.9777, 9_592),
    ("choco", 0.9777, 6_136),
    ("dpsgd", 0.9749, 306_264),
]


def test_curves_csv_has_one_row_per_validation_of_every_method(tmp_path):
    from recipes.compare import MethodResult, write_curves_csv

    results = [
        _result("ddp", 0.98, 153_128),
        MethodResult("broken", "b.yaml", error="timeout"),
        _result("memsgd_topk1", 0.97, 3_068, epochs=2),
    ]
    write_curves_csv(results, tmp_path / "curves.csv")
    rows = list(csv.DictReader(open(tmp_path / "curves.csv")))
    assert list(rows[0]) == ["method", "epoch", "step", "accuracy", "bytes_sent"]
    assert [(row["method"], int(row["epoch"]), int(row["step"])) for row in rows] == [
        ("ddp", 0, 10),
        ("ddp", 1, 20),
        ("ddp", 2, 30),
        ("memsgd_topk1", 0, 10),
        ("memsgd_topk1", 1, 20),
    ]
    assert float(rows[2]["bytes_sent"]) == 30 * 153_128 and float(rows[2]["accuracy"]) == pytest.approx(
        0.98 - 0.1 / 3
    )


def test_spread_labels_keeps_order_and_gap_and_stays_near_the_points():
    from recipes.compare import spread_labels

    heights = [0.5, 0.2, 0.51, 0.99, 0.98, 0.5]
    placed = spread_labels(heights, gap=0.05)
    order = sorted(range(len(heights)), key=lambda i: heights[i])
    column = [placed[i] for i in order]
    assert all(b - a >= 0.05 - 1e-12 for a, b in zip(column, column[1:]))
    assert 0.0 <= min(placed) and max(placed) <= 1.0
    assert placed[1] == 0.2  # alone: stays at its point
    assert spread_labels([0.1, 0.7], gap=0.05) == [0.1, 0.7]
    with pytest.raises(ValueError, match="gap: 3 labels 0.6 apart do not fit"):
        spread_labels([0.1, 0.2, 0.3], gap=0.6)


def test_labels_of_the_final_accuracy_panel_do_not_overlap():
    import matplotlib.pyplot as plt

    from recipes.compare import MethodResult, figure

    results = [_result(*row) for row in MAIN_JOB] + [MethodResult("failed", "f.yaml", error="timeout")]
    fig = figure(results, title="main job")
    try:
        right = fig.axes[1]
        renderer = fig.canvas.get_renderer()
        labels = [t for t in right.texts if t.get_text()]
        assert sorted(t.get_text() for t in labels) == sorted(row[0] for row in MAIN_JOB)
        boxes = [t.get_window_extent(renderer) for t in labels]
        for i, a in enumerate(boxes):
            for j, b in enumerate(boxes[:i]):
                assert not a.overlaps(b), (labels[i].get_text(), labels[j].get_text())
    finally:
        plt.close(fig)
