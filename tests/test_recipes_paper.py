"""Recipes: the Mem-SGD paper reproduction (quick mode) shows the paper's shape."""

from __future__ import annotations

import csv

import pytest
import torch

from recipes import memsgd_paper


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("paper")
    return memsgd_paper.main(dataset="both", quick=True, out_dir=str(out)), out


@pytest.mark.slow
def test_top_k_with_memory_matches_sgd_and_without_memory_fails(quick):
    results, _ = quick
    dense = {r.method.name: r for r in results["dense (epsilon-like)"]}
    problem = memsgd_paper.dense_problem(1000, 200)
    f_star = memsgd_paper.optimum(problem, 1.0 / problem.n)
    sgd, top1, no_memory = (
        dense["SGD"].losses[-1],
        dense["top-1"].losses[-1],
        dense["top-1 no memory"].losses[-1],
    )
    assert sgd - f_star < 0.02  # SGD itself has converged
    assert abs(top1 - sgd) < 0.01 * sgd  # top-1 with memory ends at the SGD loss
    assert top1 - f_star < 2.5 * (sgd - f_star)
    assert no_memory > 1.2 * sgd  # the same compressor without memory does not
    assert no_memory - f_star > 10 * (top1 - f_star)
    # more coordinates per step: rand-k with memory closes in on SGD
    assert dense["rand-3"].losses[-1] < dense["rand-1"].losses[-1]


@pytest.mark.slow
def test_bits_per_update_are_the_compressors_wire_sizes(quick):
    results, _ = quick
    dense = {r.method.name: r for r in results["dense (epsilon-like)"]}
    d = 200
    assert dense["SGD"].bits_per_update == 32 * d
    assert dense["top-1"].bits_per_update == 64  # one int32 index and one fp32 value, as in the paper
    assert dense["top-3"].bits_per_update == 3 * 64
    assert dense["rand-1"].bits_per_update == 32  # shared indices: only the value travels
    assert dense["QSGD 8-bit"].bits_per_update == 8 * d + 32
    assert dense["QSGD 2-bit"].bits_per_update == 2 * d + 32 + 16  # padded to 4 bytes
    sparse = {r.method.name: r for r in results["sparse (RCV1-like)"]}
    assert sparse["top-10"].bits_per_update == 640 and sparse["SGD"].bits_per_update == 32 * 4000
    for r in [*dense.values(), *sparse.values()]:
        assert all(torch.isfinite(torch.tensor(r.losses)))


@pytest.mark.slow
def test_tables_are_written(quick):
    _, out = quick
    text = (out / "memsgd_paper.md").read_text()
    assert "dense (epsilon-like)" in text and "sparse (RCV1-like)" in text and "top-1 no memory" in text
    rows = list(csv.DictReader(open(out / "memsgd_paper.csv")))
    assert len(rows) == 22 and {"loss_epoch1", "loss_epoch2", "bits_per_update"} <= set(rows[0])


def test_sparse_problem_has_the_requested_shape():
    problem = memsgd_paper.sparse_problem(n=2000, d=20_000, density=0.0015)
    assert problem.sparse and problem.features.shape == (2000, 20_000)
    nnz_per_row = problem.features.values().numel() / 2000
    assert 20 < nnz_per_row < 32  # 0.15% of 20,000 = 30 draws per row, a few repeats merge
    row_norms = torch.zeros(2000, dtype=torch.float64).index_add_(
        0,
        torch.repeat_interleave(torch.arange(2000), problem.features.crow_indices().diff()),
        problem.features.values() ** 2,
    )
    torch.testing.assert_close(row_norms, torch.ones(2000, dtype=torch.float64))
    assert 0.35 < (problem.labels > 0).double().mean() < 0.65
