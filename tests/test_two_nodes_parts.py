"""The two-node harness and benchmark without root: arguments, counters, tables, the launch command."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


netns = _load("_netns")
bench = _load("two_nodes")

PROC_NET_DEV = """Inter-|   Receive                                                |  Transmit
 face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed
    lo:    1200      10    0    0    0     0          0         0     1200      10    0    0    0     0       0          0
ec1va:  500000     400    0    0    0     0          0         0   900000     700    0    0    0     0       0          0
"""


def test_interface_counters_are_read_per_device():
    assert netns.parse_interface_counters(PROC_NET_DEV, "ec1va") == {
        "rx_bytes": 500000,
        "rx_packets": 400,
        "tx_bytes": 900000,
        "tx_packets": 700,
    }
    with pytest.raises(RuntimeError, match="no 'ec1vb' device"):
        netns.parse_interface_counters(PROC_NET_DEV, "ec1vb")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"rate": "100mbps"}, "rate"),
        ({"mtu": 100}, "mtu"),
        ({"burst": 10}, "burst"),
        ({"delay": "soon"}, "delay"),
        ({"latency": "5"}, "latency"),
        ({"name": "much-too-long-name"}, "name"),
    ],
)
def test_two_nodes_refuse_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        netns.TwoNodes(**kwargs)


def test_torchrun_command_names_the_rendezvous_host_and_each_nodes_address():
    nodes = netns.TwoNodes(rate="100mbit", name="ecx")
    a = nodes.torchrun_command(0, 2, ["train.py", "--x"], port=29500, max_restarts=2)
    b = nodes.torchrun_command(1, 2, ["train.py"])
    assert a[:4] == ["ip", "netns", "exec", "ecx-a"] and b[:4] == ["ip", "netns", "exec", "ecx-b"]
    for command, rank, address, host in ((a, "0", "10.231.0.1", "true"), (b, "1", "10.231.0.2", "false")):
        joined = " ".join(command)
        assert f"--node-rank {rank}" in joined and f"--local-addr {address}" in joined
        assert f"--rdzv-conf is_host={host}" in joined and "--rdzv-backend c10d" in joined
        assert "--nnodes 2 --nproc-per-node 2" in joined
    assert "--rdzv-endpoint 10.231.0.1:29500" in " ".join(a) and a[-2:] == ["train.py", "--x"]
    assert "--max-restarts 2" in " ".join(a)
    assert nodes.environment(1) == {"GLOO_SOCKET_IFNAME": "ecxvb"}


def test_benchmark_arguments_and_tables():
    args = bench.parse_args([])
    assert args.rates == ["100mbit"] and args.methods == list(bench.DEFAULT_STEP_METHODS) and args.steps == 6
    assert bench.parse_args(["--mode", "accuracy"]).methods == list(bench.DEFAULT_ACCURACY_METHODS)
    for argv, message in (
        (["--mode", "fast"], "--mode"),
        (["--methods", "topk"], "--methods"),
        (["--warmup", "1"], "--warmup"),
        (["--rates", "1gbps"], "rate"),
    ):
        with pytest.raises(ValueError, match=message):
            bench.parse_args(argv)
    rows = [
        {
            "rate": "100mbit",
            "method": m,
            "label": bench.METHODS[m],
            "median_step_s": t,
            "link_bytes_per_step": b,
        }
        for m, t, b in (
            ("allreduce", 5.0, 1.3e8),
            ("memsgd_compact", 0.8, 2.7e6),
            ("memsgd_compact_hier", 0.4, 0.9e6),
        )
    ]
    table = bench.step_time_table(rows)
    assert "| Mem-SGD top-k 1% compact, hierarchical | 0.400 | 0.50 | 0.900 | 0.33 |" in table
    accuracy = bench.accuracy_table(
        [{"method": "allreduce", "label": "DDP allreduce", "val_accuracy": v} for v in (0.99, 0.98)]
    )
    assert "| DDP allreduce | 2 | 0.9900 0.9800 | 0.9850 |" in accuracy


class _Commands:
    """Stands in for subprocess.run: records the commands, fails the first one naming ``fail_on``."""

    def __init__(self, fail_on: str):
        self.commands: list[list[str]] = []
        self.fail_on = fail_on

    def __call__(self, cmd, check=False, **_):
        import subprocess

        self.commands.append(list(cmd))
        if self.fail_on in cmd and check:
            raise subprocess.CalledProcessError(2, cmd, stderr="RTNETLINK answers: Operation not permitted")
        return subprocess.CompletedProcess(cmd, 0, "", "")


@pytest.mark.parametrize(
    "fail_on, removed",
    [
        ("veth", [["ip", "netns", "del", "ecf-a"], ["ip", "netns", "del", "ecf-b"]]),
        ("tbf", [["ip", "netns", "del", "ecf-a"], ["ip", "netns", "del", "ecf-b"]]),
    ],
)
def test_failed_two_node_setup_says_what_failed_and_removes_what_it_created(monkeypatch, fail_on, removed):
    monkeypatch.setattr(netns, "check_can_create", lambda: None)
    run = _Commands(fail_on)
    with pytest.raises(
        netns.NamespaceUnavailable, match=f"setting up two nodes failed: .*{fail_on}.*not permitted"
    ):
        with netns.TwoNodes(rate="100mbit", name="ecf", run=run):
            pass
    deleted = [c for c in run.commands if c[:3] == ["ip", "netns", "del"]]
    assert deleted == removed
    assert run.commands.index(deleted[0]) > next(i for i, c in enumerate(run.commands) if fail_on in c)
