"""The slow-network benchmark's own parts: arguments, the namespace's setup and teardown, the
counters, the CSV, and one short real run on the plain loopback (2 gloo ranks)."""

from __future__ import annotations

import csv
import importlib.util
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHMARKS = os.path.join(ROOT, "benchmarks")


def _load(name: str):
    sys.path.insert(0, BENCHMARKS)
    spec = importlib.util.spec_from_file_location(name, os.path.join(BENCHMARKS, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


netns = _load("_netns")
slow = _load("slow_network")


# ------------------------------------------------------------------------------------ arguments


def test_defaults_cover_every_method_with_four_ranks_at_100mbit():
    args = slow.parse_args([])
    assert args.world_size == 4 and args.rates == ["100mbit"] and not args.no_netns
    assert args.methods == list(slow.METHODS) and args.batch_size == 8
    for required in (
        "allreduce",
        "fp16",
        "powersgd_r2",
        "powersgd_r4",
        "memsgd_topk_1pct",
        "memsgd_topk_0.1pct",
        "memsgd_randk_1pct",
        "ef_sign",
        "deepsqueeze_ring",
        "deepsqueeze_one_peer_exp",
        "choco_ring",
    ):
        assert required in args.methods
    tta = slow.parse_args(["--mode", "time-to-accuracy"])
    assert tta.methods == list(slow.DEFAULT_TTA_METHODS) and tta.batch_size == 32
    assert "memsgd_cyclic_topk_1pct" in tta.methods and tta.tta_seed == 0


def test_the_candidate_selection_is_a_method_of_its_own():
    built = slow._compressor(slow.METHODS["memsgd_cyclic_topk_1pct_candidates"])
    assert built.selects_from_candidates and built.density == 0.01
    assert not slow._compressor(slow.METHODS["memsgd_cyclic_topk_1pct"]).selects_from_candidates
    recipe = slow._compressor(slow.METHODS["memsgd_cyclic_topk_2pct_bf16"])  # the digits recipe's setting
    assert (recipe.density, recipe.value_dtype, recipe.selection) == (0.02, torch.bfloat16, "leader")


def test_hook_options_reach_the_hook_state_and_take_the_optimizer_momentum(tmp_path):
    """The momentum-correction methods build their ErrorFeedbackState with the method's options
    (1 gloo rank: DDP needs a process group, no network); their time-to-accuracy optimizer then
    has no momentum, and the plain ones keep SGD's 0.9."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        for name, compressor in (
            ("memsgd_topk_1pct_mc_tail", "TopK"),
            ("memsgd_cyclic_candidates_1_5pct_bf16_mc_tail", "CyclicTopK"),
        ):
            method = slow.METHODS[name]
            assert method.hook_takes_momentum and slow.tta_optimizer_momentum(method) == 0.0
            run = slow.MethodRun(method, slow.build_digits_model(16), 1)
            state = run.hook_state
            assert type(state.compressor).__name__ == compressor
            assert state.momentum_correction is not None
            assert state.momentum_correction.momentum == 0.9
            assert state.momentum_correction.send_tail and state.momentum_correction.weight_decay == 0
        recipe = slow.MethodRun(
            slow.METHODS["memsgd_cyclic_candidates_1_5pct_bf16_mc_tail"], slow.build_digits_model(16), 1
        ).hook_state.compressor
        assert (recipe.density, recipe.selection, recipe.value_dtype) == (0.015, "candidates", torch.bfloat16)
        plain = slow.METHODS["memsgd_topk_1pct"]
        assert not plain.hook_takes_momentum and slow.tta_optimizer_momentum(plain) == 0.9
        assert slow.MethodRun(plain, slow.build_digits_model(16), 1).hook_state.momentum_correction is None
        assert slow.tta_optimizer_momentum(slow.METHODS["powersgd_r4"]) == 0.9
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize(
    "argv, names",
    [
        (["--mode", "fast"], "--mode"),
        (["--model", "vgg"], "--model"),
        (["--world-size", "1"], "--world-size"),
        (["--warmup", "0"], "--warmup"),
        (["--steps", "2", "--min-steps", "3"], "--min-steps"),
        (["--methods", "allreduce", "topk"], "--methods"),
        (["--methods", "memsgd_topk_1pct"], "allreduce"),
        (["--world-sizes", "2", "2"], "--world-sizes"),
        (["--world-sizes", "4", "1"], "--world-sizes"),
        (["--rates", "100mbps"], "rate"),
        (["--rates", "0mbit"], "rate"),
        (["--tta-target", "1.5"], "--tta-target"),
        (["--no-netns", "--rates", "100mbit", "1gbit"], "--rates"),
        (["--powersgd-start-iter", "1"], "--powersgd-start-iter"),
        (["--tta-seed", "-1"], "--tta-seed"),
    ],
)
def test_bad_arguments_raise_value_errors_naming_the_parameter(argv, names):
    with pytest.raises(ValueError, match=names):
        slow.parse_args(argv)


def test_main_reports_bad_arguments_with_exit_code_2(capsys):
    assert slow.main(["--world-size", "0"]) == 2
    assert "--world-size must be an integer >= 2" in capsys.readouterr().err


def test_parse_rate():
    assert netns.parse_rate("100mbit") == 100_000_000
    assert netns.parse_rate("1gbit") == 1_000_000_000
    assert netns.parse_rate("2.5mbit") == 2_500_000
    assert netns.parse_rate("800kbit") == 800_000
    for bad in ("100", "100MB", "fast", "-1mbit"):
        with pytest.raises(ValueError, match="rate must be"):
            netns.parse_rate(bad)


def test_burst_holds_a_timer_tick_of_traffic_and_several_packets():
    assert netns.default_burst_bytes(100_000_000, 9000) == 50_000
    assert netns.default_burst_bytes(1_000_000_000, 9000) == 500_000
    assert netns.default_burst_bytes(1_000_000, 9000) == 36_000  # slow links: four packets
    with pytest.raises(ValueError, match="burst"):
        netns.RateLimitedNamespace("100mbit", mtu=9000, burst=8000)
    with pytest.raises(ValueError, match="mtu"):
        netns.RateLimitedNamespace("100mbit", mtu=500)
    with pytest.raises(ValueError, match="latency"):
        netns.RateLimitedNamespace("100mbit", latency="fifty")


# ------------------------------------------------------------------------------------ rights


def test_refuses_clearly_without_root_or_iproute2():
    with pytest.raises(netns.NamespaceUnavailable, match="needs root .*uid is 1000.*--no-netns"):
        netns.check_can_create(euid=1000, which=lambda tool: f"/usr/sbin/{tool}")
    with pytest.raises(netns.NamespaceUnavailable, match="tc not found: install iproute2"):
        netns.check_can_create(euid=0, which=lambda tool: None if tool == "tc" else "/usr/sbin/ip")
    netns.check_can_create(euid=0, which=lambda tool: f"/usr/sbin/{tool}")


def test_main_without_root_exits_2_and_names_the_way_out(monkeypatch, capsys):
    monkeypatch.setattr(netns.os, "geteuid", lambda: 1000)
    assert slow.main(["--methods", "allreduce", "fp16"]) == 2
    err = capsys.readouterr().err
    assert "needs root" in err and "--no-netns" in err


class _Recorder:
    """Stands in for subprocess.run: records the commands, optionally fails one of them."""

    def __init__(self, fail_on: str | None = None):
        self.commands: list[list[str]] = []
        self.fail_on = fail_on

    def __call__(self, cmd, check=False, **_):
        self.commands.append(list(cmd))
        if self.fail_on and self.fail_on in cmd and check:
            raise subprocess.CalledProcessError(2, cmd, stderr="RTNETLINK answers: Operation not permitted")
        return subprocess.CompletedProcess(cmd, 0, "", "")


def test_namespace_commands_and_removal_on_error(monkeypatch):
    monkeypatch.setattr(netns, "check_can_create", lambda: None)
    run = _Recorder()
    with pytest.raises(KeyboardInterrupt):
        with netns.RateLimitedNamespace("100mbit", name="ecb-test", run=run) as ns:
            assert ns.exec_prefix() == ["ip", "netns", "exec", "ecb-test"]
            ns.set_rate("1gbit")
            raise KeyboardInterrupt  # Ctrl-C in the middle of a run
    assert run.commands == [
        ["ip", "netns", "add", "ecb-test"],
        ["ip", "netns", "exec", "ecb-test", "ip", "link", "set", "lo", "mtu", "9000", "up"],
        [
            "ip",
            "netns",
            "exec",
            "ecb-test",
            "tc",
            "qdisc",
            "add",
            "dev",
            "lo",
            "root",
            "tbf",
            "rate",
            "100mbit",
            "burst",
            "50000b",
            "latency",
            "50ms",
        ],
        [
            "ip",
            "netns",
            "exec",
            "ecb-test",
            "tc",
            "qdisc",
            "replace",
            "dev",
            "lo",
            "root",
            "tbf",
            "rate",
            "1gbit",
            "burst",
            "500000b",
            "latency",
            "50ms",
        ],
        ["ip", "netns", "del", "ecb-test"],
    ]


def test_failed_setup_removes_the_namespace_and_says_what_failed(monkeypatch):
    monkeypatch.setattr(netns, "check_can_create", lambda: None)
    run = _Recorder(fail_on="tc")
    with pytest.raises(netns.NamespaceUnavailable, match="Operation not permitted"):
        with netns.RateLimitedNamespace("100mbit", name="ecb-test", run=run):
            pass
    assert run.commands[-1] == ["ip", "netns", "del", "ecb-test"]


def _can_create_namespaces() -> bool:
    try:
        netns.check_can_create()
    except netns.NamespaceUnavailable:
        return False
    return True


@pytest.mark.skipif(not _can_create_namespaces(), reason="needs root and iproute2")
def test_real_namespace_is_shaped_and_always_removed():
    def listed(name):
        out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
        return any(line.split()[0] == name for line in out.splitlines() if line.strip())

    name = f"ecb-test-{os.getpid()}"
    with pytest.raises(RuntimeError, match="boom"):
        with netns.RateLimitedNamespace("100mbit", name=name) as ns:
            assert listed(name)
            qdisc = subprocess.run(
                ns.exec_prefix() + ["tc", "qdisc", "show", "dev", "lo"],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            assert "tbf" in qdisc and "100Mbit" in qdisc
            counters = subprocess.run(
                ns.exec_prefix()
                + [
                    sys.executable,
                    "-c",
                    "import sys; sys.path.insert(0, "
                    f"{BENCHMARKS!r}); import _netns; print(_netns.loopback_counters()['tx_bytes'])",
                ],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            assert int(counters) == 0  # a fresh namespace: its own loopback, nothing sent yet
            raise RuntimeError("boom")
    assert not listed(name)


# ------------------------------------------------------------------------------------ counters, CSV


def test_loopback_counters_parse_proc_net_dev(tmp_path):
    path = tmp_path / "dev"
    path.write_text(
        "Inter-|   Receive                                                |  Transmit\n"
        " face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls "
        "carrier compressed\n"
        "    lo: 123456     789    0    0    0     0          0         0   123456     789    0    0    0     0 "
        "      0          0\n"
        "  eth0: 1 2 0 0 0 0 0 0 3 4 0 0 0 0 0 0\n"
    )
    assert netns.loopback_counters(str(path)) == {
        "rx_bytes": 123456,
        "rx_packets": 789,
        "tx_bytes": 123456,
        "tx_packets": 789,
    }
    path.write_text("header\nheader\n  eth0: 1 2 0 0 0 0 0 0 3 4 0 0 0 0 0 0\n")
    with pytest.raises(RuntimeError, match="no 'lo'"):
        netns.loopback_counters(str(path))


def test_csv_ratios_and_table(tmp_path):
    def row(method, step, sent, factor, lo):
        return {
            "rate": "100mbit",
            "method": method,
            "label": method,
            "median_step_s": step,
            "bytes_per_step_per_worker": sent,
            "bytes_source": "CommStats",
            "expected_wire_bytes_per_worker": sent * factor,
            "lo_bytes_per_step_per_worker": lo,
            "compress_s_per_step": 0.01,
            "profile_compress_s": None,
        }

    rows = slow.finish_step_time_rows(
        [row("allreduce", 20.0, 44e6, 1.5, 66.6e6), row("topk", 1.0, 0.88e6, 3, 2.7e6)]
    )
    assert rows[0]["step_vs_allreduce"] == 1.0 and rows[1]["step_vs_allreduce"] == pytest.approx(0.05)
    assert rows[1]["lo_over_expected"] == pytest.approx(2.7 / 2.64)
    path = tmp_path / "sub" / "step_time.csv"
    slow.write_csv(rows, str(path), slow.CSV_FIELDS["step-time"])
    with open(path) as f:
        read = list(csv.DictReader(f))
    assert [r["method"] for r in read] == ["allreduce", "topk"]
    assert float(read[1]["step_vs_allreduce"]) == pytest.approx(0.05)
    assert read[1]["profile_compress_s"] == "" and read[0]["world_size"] == ""
    table = slow.step_time_table(rows)
    assert "| 100mbit | topk | 1.000 | 0.050 | 0.880 | 2.640 | 2.700 | 1.02 | 0.010 |" in table


# ------------------------------------------------------------------------------------ a real run


@pytest.mark.slow
def test_plain_loopback_run_writes_csv_plot_and_bytes_that_match_the_compressors(tmp_path, capsys):
    import ec_hooks

    out = tmp_path / "out"
    methods = ["allreduce", "memsgd_topk_1pct", "memsgd_randk_1pct", "powersgd_r2"]
    if hasattr(ec_hooks, "DeepSqueeze"):
        methods.append("deepsqueeze_ring")
    code = slow.main(
        [
            "--no-netns",
            "--world-size",
            "2",
            "--mlp-width",
            "32",
            "--steps",
            "2",
            "--warmup",
            "1",
            "--methods",
            *methods,
            "--out",
            str(out),
        ]
    )
    assert code == 0
    assert (out / "step_time.png").stat().st_size > 1000
    with open(out / "step_time.csv") as f:
        rows = {r["method"]: r for r in csv.DictReader(f)}
    assert list(rows) == methods
    model = slow.wide_mlp(32)
    numel = sum(p.numel() for p in model.parameters())
    assert int(rows["allreduce"]["params"]) == numel
    assert float(rows["allreduce"]["bytes_per_step_per_worker"]) == 4 * numel
    assert float(rows["allreduce"]["step_vs_allreduce"]) == 1.0
    # Mem-SGD top-k: per bucket k int32 indices + k fp32 values + the 4-byte status word.
    buckets = (
        [int(n) for n in rows["memsgd_topk_1pct"]["bucket_numels"].split()]
        if rows["memsgd_topk_1pct"]["bucket_numels"]
        else None
    )
    topk = ec_hooks.TopK(0.01)
    sent = float(rows["memsgd_topk_1pct"]["bytes_per_step_per_worker"])
    if buckets:
        assert sent == sum(topk.wire_bytes(n) + 4 for n in buckets)
    else:  # one bucket holds this small model
        assert sent == topk.wire_bytes(numel) + 4
    assert float(rows["memsgd_randk_1pct"]["bytes_per_step_per_worker"]) < sent
    assert 0 < float(rows["powersgd_r2"]["bytes_per_step_per_worker"]) < 4 * numel
    if (
        "deepsqueeze_ring" in rows
    ):  # a ring of 2: one neighbour, one top-k payload of the whole model + status
        assert float(rows["deepsqueeze_ring"]["bytes_per_step_per_worker"]) == topk.wire_bytes(numel) + 4
    for r in rows.values():
        assert int(r["steps"]) == 2 and float(r["median_step_s"]) > 0
        assert float(r["lo_bytes_per_step_per_worker"]) > 0  # the loopback carried this run's traffic
    assert "| unlimited | DDP allreduce |" in capsys.readouterr().out


@pytest.mark.slow
def test_time_to_accuracy_run_on_plain_loopback(tmp_path):
    out = tmp_path / "tta"
    code = slow.main(
        [
            "--mode",
            "time-to-accuracy",
            "--no-netns",
            "--world-size",
            "2",
            "--tta-steps",
            "12",
            "--tta-eval-every",
            "4",
            "--tta-target",
            "0.3",
            "--methods",
            "allreduce",
            "memsgd_topk_1pct",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    with open(out / "time_to_accuracy.csv") as f:
        rows = {r["method"]: r for r in csv.DictReader(f)}
    with open(out / "time_to_accuracy_curves.csv") as f:
        curves = list(csv.DictReader(f))
    assert (out / "time_to_accuracy.png").stat().st_size > 1000
    for name, row in rows.items():
        assert int(row["steps"]) == 12
        points = [c for c in curves if c["method"] == name]
        assert [int(c["step"]) for c in points] == [4, 8, 12]
        walls = [float(c["wall_s"]) for c in points]
        assert walls == sorted(walls) and walls[0] > 0
        assert float(row["final_accuracy"]) == float(points[-1]["val_accuracy"])
        if row["time_to_target_s"]:
            first = next(c for c in points if float(c["val_accuracy"]) >= 0.3)
            assert float(row["time_to_target_s"]) == float(first["wall_s"])
    assert float(rows["allreduce"]["final_accuracy"]) > 0.3  # 12 steps of SGD on the digits beat chance (0.1)
    assert (
        float(rows["memsgd_topk_1pct"]["bytes_per_step_per_worker"])
        < float(rows["allreduce"]["bytes_per_step_per_worker"]) / 10
    )


def _default_sigint() -> None:
    # Runs in the child before exec: a shell starts background jobs (`&`, nohup) with SIGINT
    # ignored, which exec keeps and Python then respects; Ctrl-C reaches a foreground program.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _remove_namespace(name: str) -> None:
    """Stop what still runs in namespace ``name`` and delete it, if it is there."""
    listing = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True)
    for pid in (int(p) for p in listing.stdout.split()):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if name in _namespaces():
        subprocess.run(["ip", "netns", "del", name], capture_output=True, text=True)


def _namespaces() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


@pytest.mark.skipif(not _can_create_namespaces(), reason="needs root and iproute2")
@pytest.mark.parametrize(
    "sig, background",
    [(signal.SIGINT, False), (signal.SIGINT, True), (signal.SIGTERM, False)],
    ids=["ctrl-c", "ctrl-c-from-background", "sigterm"],
)
@pytest.mark.slow
def test_interrupted_run_stops_its_ranks_and_removes_the_namespace(tmp_path, sig, background):
    command = [
        sys.executable,
        os.path.join(BENCHMARKS, "slow_network.py"),
        "--world-size",
        "2",
        "--mlp-width",
        "32",
        "--steps",
        "1000",
        "--min-steps",
        "1000",
        "--methods",
        "allreduce",
        "--out",
        str(tmp_path),
    ]
    # The suite run as `nohup pytest &` has SIGINT ignored; so does every child unless it restores it.
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if background else None
    try:
        proc = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=_default_sigint
        )
    finally:
        if background:
            signal.signal(signal.SIGINT, previous)
    name = f"ecb-{proc.pid}"
    pids: list[int] = []
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(pids) < 3:  # the launcher and its two ranks
            time.sleep(0.5)
            listing = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True)
            pids = [int(p) for p in listing.stdout.split()]
        assert len(pids) >= 3, f"the ranks did not start in {name}"
        time.sleep(3)
        proc.send_signal(sig)
        assert proc.wait(timeout=60) != 0
        left_behind = name in _namespaces()
        time.sleep(1)
        alive = [p for p in pids if os.path.exists(f"/proc/{p}") and "zombie" not in _proc_state(p)]
    finally:
        # Whatever went wrong above, the host keeps no namespace and no rank of this test.
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        _remove_namespace(name)
    assert not left_behind, f"{name} was left behind"
    assert not alive, f"processes left running: {alive}"


def _proc_state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(line for line in f if line.startswith("State:")).lower()
    except (OSError, StopIteration):
        return "zombie"
