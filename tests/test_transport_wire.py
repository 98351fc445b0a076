"""Bytes the transports say they put on the wire against the loopback counter of a network
namespace (exact: only this run's ranks talk there; frames less their TCP/IP headers), on 2 and
3 gloo ranks, with the slow-network benchmark's 11M-parameter MLP."""

from __future__ import annotations

import csv

import pytest

from .test_benchmark_slow_network import _can_create_namespaces, slow


@pytest.mark.slow
@pytest.mark.skipif(not _can_create_namespaces(), reason="needs root and iproute2")
def test_formula_bytes_match_the_loopback_counter_within_3_percent(tmp_path):
    methods = [
        "allreduce",
        "memsgd_topk_1pct",
        "memsgd_randk_1pct",
        "memsgd_cyclic_topk_1pct",
        "memsgd_cyclic_topk_1pct_bf16",
    ]
    code = slow.main(
        [
            "--rates",
            "10gbit",
            "--world-sizes",
            "2",
            "3",
            "--mlp-width",
            "2048",
            "--steps",
            "3",
            "--warmup",
            "1",
            "--methods",
            *methods,
            "--out",
            str(tmp_path),
        ]
    )
    assert code == 0
    with open(tmp_path / "step_time.csv") as f:
        rows = list(csv.DictReader(f))
    assert {(r["method"], int(r["world_size"])) for r in rows} == {(m, n) for m in methods for n in (2, 3)}
    for r in rows:
        ratio = float(r["lo_payload_over_expected"])
        assert 0.97 <= ratio <= 1.03, (r["method"], r["world_size"], ratio)
    cyclic = {
        int(r["world_size"]): float(r["lo_payload_bytes_per_step_per_worker"])
        for r in rows
        if r["method"] == "memsgd_cyclic_topk_1pct"
    }
    topk = {
        int(r["world_size"]): float(r["lo_payload_bytes_per_step_per_worker"])
        for r in rows
        if r["method"] == "memsgd_topk_1pct"
    }
    assert cyclic[3] < 0.6 * topk[3]  # about 6.7 bytes per entry (values ring, index broadcast) against 16
    assert (tmp_path / "step_time.md").read_text().count("lo growth") == 1


def test_bytes_against_n_table():
    def row(method, n, expected, payload):
        return {
            "rate": "100mbit",
            "method": method,
            "label": method,
            "world_size": n,
            "expected_wire_bytes_per_worker": expected,
            "lo_payload_bytes_per_step_per_worker": payload,
        }

    rows = [
        row("topk", 2, 0.88e6, 0.882e6),
        row("topk", 8, 6.17e6, 6.172e6),
        row("cyclic", 2, 0.552e6, 0.553e6),
        row("cyclic", 8, 0.965e6, 0.971e6),
    ]
    table = slow.bytes_vs_n_table(rows)
    assert "| n=2: formula / lo payload (MB) | n=8: formula / lo payload (MB) | lo growth n=2 to 8 |" in table
    assert "| topk | 0.880 / 0.882 | 6.170 / 6.172 | 7.00x |" in table
    assert "| cyclic | 0.552 / 0.553 | 0.965 / 0.971 | 1.76x |" in table
