"""Two nodes of two ranks over a slow link: step time and bytes between the nodes, and accuracy.

Two Linux network namespaces, node A and node B, are joined by a veth pair shaped with
``tc tbf`` (``--rates``, each direction; ``benchmarks/_netns.py`` :class:`TwoNodes`); inside
each node the ranks talk over the namespace's loopback, unshaped.  Each node runs its own
``torchrun --nnodes 2 --nproc-per-node 2`` (c10d rendezvous on A's address), as on a cluster.
Needs root and iproute2.

* ``--mode step-time`` (default): the wide MLP of ``slow_network.py`` (11.0M parameters,
  synthetic 3x32x32 inputs, batch 8 per rank).  Methods run one after the other in one process
  group.  Per method: the median step time (the slowest rank's, after ``--warmup`` steps), and
  the bytes that crossed the link per step, from the veth ``tx`` counters of both nodes
  (``/proc/net/dev`` inside each namespace: exact, TCP/IP headers and the per-step barrier
  included).
* ``--mode accuracy``: the offline digits recipe (``DigitsCNN``), ``--steps`` steps per method
  and seed, final validation accuracy (the mean model for gossip).

Writes ``<out>/two_nodes_<mode>.{csv,md}`` and, for step time, ``two_nodes_step_time.png``::

    sudo python benchmarks/two_nodes.py --rates 100mbit 1gbit
    sudo python benchmarks/two_nodes.py --mode accuracy --rates 1gbit --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import csv
import functools
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(_HERE))
sys.path.insert(0, _HERE)

import _netns  # noqa: E402
import slow_network  # noqa: E402

import ec_hooks  # noqa: E402
import ec_hooks.hierarchical  # noqa: E402,F401 - loaded with the rest, not midway through a run
from ec_hooks import shared_memory  # noqa: E402

MODES = ("step-time", "accuracy", "profile")


def _compact_topk(density: float = 0.01) -> ec_hooks.TopK:
    return ec_hooks.TopK(density, index_encoding="delta16", value_dtype="bf16")


# name -> (label, builder(ddp) -> object with .after_step() and .stats or None)
METHODS = {
    "local": "no communication (local_hook)",
    "allreduce": "DDP allreduce",
    "powersgd_r4": "torch PowerSGD rank 4",
    "memsgd_compact": "Mem-SGD top-k 1% compact, flat",
    "memsgd_compact_hier": "Mem-SGD top-k 1% compact, hierarchical",
    "memsgd_compact_hier_gloo": "Mem-SGD top-k 1% compact, hierarchical, node stages over gloo (no shared memory)",
    "deepsqueeze_ring": "DeepSqueeze top-k 1%, ring over ranks",
    "deepsqueeze_hier": "DeepSqueeze top-k 1%, hierarchical (ring over nodes)",
}
DEFAULT_STEP_METHODS = tuple(m for m in METHODS if m not in ("local", "memsgd_compact_hier_gloo"))
DEFAULT_PROFILE_METHODS = ("local", "memsgd_compact", "memsgd_compact_hier", "memsgd_compact_hier_gloo")
DEFAULT_ACCURACY_METHODS = (
    "allreduce",
    "memsgd_compact",
    "memsgd_compact_hier",
    "deepsqueeze_ring",
    "deepsqueeze_hier",
)


class Run:
    """One method on one rank: the DDP model and what runs after ``optimizer.step()``."""

    def __init__(self, name: str, model: torch.nn.Module, powersgd_warmup: int = 2, skip_warmup: bool = True):
        self.name = name
        self.gossip = None
        self.powersgd_state = None
        self.ddp = DistributedDataParallel(model, broadcast_buffers=False, gradient_as_bucket_view=True)
        if name == "powersgd_r4":
            from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook

            state = powerSGD_hook.PowerSGDState(
                process_group=None,
                matrix_approximation_rank=4,
                start_powerSGD_iter=powersgd_warmup,
                min_compression_rate=2,
                use_error_feedback=True,
                warm_start=True,
            )
            if skip_warmup:
                state.iter = powersgd_warmup  # step time is measured compressed
            self.powersgd_state = state
            self.ddp.register_comm_hook(
                state, slow_network._one_bucket_at_a_time(powerSGD_hook.powerSGD_hook)
            )
        elif name.startswith("memsgd"):
            # the gloo variant: the node stages as before shared memory, for a side-by-side figure
            saved = os.environ.get(shared_memory.DISABLE_VARIABLE)
            os.environ[shared_memory.DISABLE_VARIABLE] = "1" if name.endswith("_gloo") else "0"
            try:
                state = ec_hooks.ErrorFeedbackState(
                    compressor=_compact_topk(), module=self.ddp, hierarchical="_hier" in name
                )
            finally:
                if saved is None:
                    del os.environ[shared_memory.DISABLE_VARIABLE]
                else:
                    os.environ[shared_memory.DISABLE_VARIABLE] = saved
            self.ddp.register_comm_hook(state, ec_hooks.error_feedback_hook)
        elif name == "local":
            self.ddp.register_comm_hook(None, ec_hooks.local_hook)
        elif name.startswith("deepsqueeze"):
            self.ddp.register_comm_hook(None, ec_hooks.local_hook)
            options = {"hierarchical": True} if name.endswith("_hier") else {}
            self.gossip = ec_hooks.DeepSqueeze(
                self.ddp.parameters(),
                topology="ring",
                compressor=ec_hooks.TopK(0.01),
                watch_every=0,
                **options,
            )
        elif name != "allreduce":
            raise ValueError(f"method must be one of {list(METHODS)}, got {name!r}")

    def after_step(self, step: int) -> None:
        if self.gossip is not None:
            self.gossip.step()
        state = self.powersgd_state
        if step == 0 and state is not None and state.iter > state.start_powerSGD_iter:
            # PowerSGD keys its memories by bucket index: they restart on DDP's rebuilt buckets.
            state.error_dict.clear()
            state.p_memory_dict.clear()
            state.q_memory_dict.clear()

    def eval_parameters(self) -> list[torch.Tensor]:
        if self.gossip is not None:
            return self.gossip.average_parameters()
        return [p.detach() for p in self.ddp.module.parameters()]


def _link_bytes() -> int:
    """Bytes this node has sent to the other one (its veth ``tx`` counter); 0 on other local ranks,
    so that a sum over the world counts each node once."""
    if int(os.environ.get("LOCAL_RANK", "0")) != 0:
        return 0
    return _netns.interface_counters(os.environ["GLOO_SOCKET_IFNAME"])["tx_bytes"]


def _tcp_retransmits() -> int:
    """TCP segments this node retransmitted (``/proc/net/snmp`` counts per network namespace); 0 on
    other local ranks, as for :func:`_link_bytes`.  A segment lost on the shaped link costs a
    retransmission timeout (200 ms at least)."""
    if int(os.environ.get("LOCAL_RANK", "0")) != 0:
        return 0
    with open("/proc/net/snmp") as f:
        header, values = [line.split() for line in f if line.startswith("Tcp:")][:2]
    return int(values[header.index("RetransSegs")])


def _sum_over_ranks(value: float) -> float:
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t)


def _step_time_rank(cfg: dict) -> list[dict]:
    rank, n = dist.get_rank(), dist.get_world_size()
    batches = slow_network._synthetic_batches(cfg, rank)
    rows = []
    for name in cfg["methods"]:
        torch.manual_seed(0)
        model = slow_network.wide_mlp(cfg["mlp_width"])
        run = Run(name, model)
        optimizer = torch.optim.SGD(run.ddp.parameters(), lr=cfg["lr"])
        times = []
        for step in range(cfg["warmup"] + cfg["steps"]):
            if step == cfg["warmup"]:
                dist.barrier()
                crossed0 = _sum_over_ranks(_link_bytes())
                retransmits0 = _sum_over_ranks(_tcp_retransmits())
            dist.barrier()
            x, y = batches[step % len(batches)]
            t0 = time.perf_counter()
            optimizer.zero_grad(set_to_none=False)
            F.cross_entropy(run.ddp(x), y).backward()
            optimizer.step()
            run.after_step(step)
            elapsed = slow_network._max_over_ranks(time.perf_counter() - t0)
            if step >= cfg["warmup"]:
                times.append(elapsed)
        dist.barrier()
        crossed = (_sum_over_ranks(_link_bytes()) - crossed0) / cfg["steps"]
        retransmits = _sum_over_ranks(_tcp_retransmits()) - retransmits0
        row = {
            "method": name,
            "label": METHODS[name],
            "median_step_s": statistics.median(times),
            "min_step_s": min(times),
            "step_times_s": [round(t, 4) for t in times],
            "max_step_s": max(times),
            "steps": len(times),
            "link_bytes_per_step": crossed,
            "tcp_retransmits": retransmits,
            "params": sum(p.numel() for p in model.parameters()),
            "world_size": n,
            "local_world_size": int(os.environ["LOCAL_WORLD_SIZE"]),
            "batch_size": cfg["batch_size"],
            "loadavg_1m": os.getloadavg()[0],
        }
        rows.append(row)
        if rank == 0:
            print(
                f"[{time.strftime('%H:%M:%S')}] {name}: median step {row['median_step_s']:.3f} s, "
                f"{crossed / 1e6:.3f} MB/step across the link, {retransmits:.0f} TCP retransmissions",
                flush=True,
            )
        del run, model, optimizer
    return rows


class StageTimers:
    """Wall time per stage of a Mem-SGD step, from wrapping the functions each stage calls.

    ``wrap(owner, attr, label)`` times every call of ``owner.attr`` (the time until it returns);
    with ``future=True`` also the time until the future it returns is done (``label + " done"``),
    which for the stages left running includes the time they overlap with other work.
    """

    def __init__(self) -> None:
        self.totals: dict[str, float] = {}
        self._undo: list[tuple[object, str, object]] = []
        # (label, start, end) of the calls of the current step, in seconds from ``step_started``
        self.events: list[tuple[str, float, float]] = []
        self.step_started = time.perf_counter()

    def start_step(self) -> None:
        self.events = []
        self.step_started = time.perf_counter()

    def add(self, label: str, seconds: float) -> None:
        self.totals[label] = self.totals.get(label, 0.0) + seconds
        end = time.perf_counter() - self.step_started
        self.events.append((label, end - seconds, end))

    def wrap(self, owner, attr: str, label: str, future: bool = False):
        original = owner.__dict__[attr] if isinstance(owner, type) else getattr(owner, attr)

        @functools.wraps(original)
        def timed(*args, **kwargs):
            started = time.perf_counter()
            out = original(*args, **kwargs)
            self.add(label, time.perf_counter() - started)
            if future:
                fut = out[0] if isinstance(out, tuple) else out
                fut.add_done_callback(lambda _: self.add(label + " done", time.perf_counter() - started))
            return out

        setattr(owner, attr, timed)
        self._undo.append((owner, attr, original))
        return timed

    def restore(self) -> None:
        while self._undo:
            owner, attr, original = self._undo.pop()
            setattr(owner, attr, original)


def _install_stage_timers(timers: StageTimers) -> None:
    from ec_hooks import hierarchical, hooks, transport

    timers.wrap(ec_hooks, "error_feedback_hook", "hook (blocking part)")
    timers.wrap(hooks, "_reduce", "flat path", future=True)
    timers.wrap(ec_hooks.TopK, "compress_error_feedback_", "compression (top-k, memory)")
    timers.wrap(transport.AllgatherSum, "start", "exchange (allgather)", future=True)
    timers.wrap(hierarchical.NodeHierarchy, "reduce", "hierarchical reduce", future=True)
    timers.wrap(hierarchical.NodeHierarchy, "_node_sum", "1 node sum (all of it)")
    timers.wrap(hierarchical._NodeGroups, "_exchange", "1+3 exchanges inside the node")
    timers.wrap(hierarchical.NodeHierarchy, "_gather_means", "3 node gather (all of it)")
    timers.wrap(hierarchical.NodeHierarchy, "_finish", "3 finish (wait, gather, memory)")


def _profile_rank(cfg: dict) -> list[dict]:
    """Per method: the step time and where it goes, per stage (seconds per step, mean over ranks)."""
    rank = dist.get_rank()
    batches = slow_network._synthetic_batches(cfg, rank)
    rows = []
    for name in cfg["methods"]:
        torch.manual_seed(0)
        model = slow_network.wide_mlp(cfg["mlp_width"])
        timers = StageTimers()
        _install_stage_timers(timers)
        try:
            run = Run(name, model)
            optimizer = torch.optim.SGD(run.ddp.parameters(), lr=cfg["lr"])
            step_times, backward_times, cpu_times = [], [], []
            for step in range(cfg["warmup"] + cfg["steps"]):
                if step == cfg["warmup"]:
                    timers.totals.clear()
                dist.barrier()
                x, y = batches[step % len(batches)]
                timers.start_step()
                t0, cpu0 = time.perf_counter(), time.process_time()
                optimizer.zero_grad(set_to_none=False)
                loss = F.cross_entropy(run.ddp(x), y)
                t1 = time.perf_counter()
                loss.backward()  # returns once every bucket's future is done
                t2 = time.perf_counter()
                optimizer.step()
                run.after_step(step)
                if step >= cfg["warmup"]:
                    step_times.append(time.perf_counter() - t0)
                    backward_times.append(t2 - t1)
                    cpu_times.append(time.process_time() - cpu0)
                    timers.add("forward", t1 - t0)
                    timers.add("optimizer step", time.perf_counter() - t2)
        finally:
            timers.restore()
        # the last step's timeline of every rank, as rank 0 prints it
        timelines = [None] * dist.get_world_size()
        dist.all_gather_object(timelines, sorted(timers.events, key=lambda e: e[1]))
        steps = cfg["steps"]
        stages = {
            label: _sum_over_ranks(total / steps) / dist.get_world_size()
            for label, total in sorted(timers.totals.items())
        }
        row = {
            "method": name,
            "label": METHODS[name],
            "step_s": _sum_over_ranks(statistics.median(step_times)) / dist.get_world_size(),
            "backward_s": _sum_over_ranks(statistics.median(backward_times)) / dist.get_world_size(),
            # CPU seconds of the whole process (all its threads, user and system), summed over ranks:
            # with more ranks than cores, this bounds the step from below
            "cpu_s": _sum_over_ranks(statistics.median(cpu_times)),
            "stages": stages,
            "timelines": timelines,
            "loadavg_1m": os.getloadavg()[0],
        }
        rows.append(row)
        if rank == 0:
            print(
                f"[{time.strftime('%H:%M:%S')}] {name}: step {row['step_s']:.3f} s, backward {row['backward_s']:.3f} s, "
                + ", ".join(f"{k} {v:.3f}" for k, v in stages.items()),
                flush=True,
            )
        del run, model, optimizer
    return rows


def _accuracy_rank(cfg: dict) -> list[dict]:
    rank, n = dist.get_rank(), dist.get_world_size()
    x_train, y_train, x_val, y_val = slow_network._digits(cfg)
    per_rank = cfg["batch_size"]
    rows = []
    for seed in cfg["seeds"]:
        for name in cfg["methods"]:
            torch.manual_seed(seed)
            model = slow_network.build_digits_model(cfg["hidden"])
            run = Run(name, model, powersgd_warmup=10, skip_warmup=False)
            optimizer = torch.optim.SGD(run.ddp.parameters(), lr=cfg["lr"], momentum=0.9)
            step, epoch, wall = 0, 0, 0.0
            while step < cfg["steps"]:
                order = torch.randperm(
                    len(y_train), generator=torch.Generator().manual_seed(1000 * seed + epoch)
                )
                shard = order[rank::n]
                for start in range(0, len(shard) - per_rank + 1, per_rank):
                    idx = shard[start : start + per_rank]
                    t0 = time.perf_counter()
                    optimizer.zero_grad(set_to_none=False)
                    F.cross_entropy(run.ddp(x_train[idx]), y_train[idx]).backward()
                    optimizer.step()
                    run.after_step(step)
                    wall += time.perf_counter() - t0
                    step += 1
                    if step >= cfg["steps"]:
                        break
                epoch += 1
            params = run.eval_parameters()  # collective for gossip
            evaluator = slow_network.build_digits_model(cfg["hidden"])
            with torch.no_grad():
                for target, value in zip(evaluator.parameters(), params):
                    target.copy_(value)
            accuracy = slow_network._accuracy(evaluator, x_val, y_val)
            rows.append(
                {
                    "method": name,
                    "label": METHODS[name],
                    "seed": seed,
                    "steps": step,
                    "val_accuracy": accuracy,
                    "wall_s": wall,
                    "world_size": n,
                    "local_world_size": int(os.environ["LOCAL_WORLD_SIZE"]),
                }
            )
            if rank == 0:
                print(
                    f"[{time.strftime('%H:%M:%S')}] {name} seed {seed}: accuracy {accuracy:.4f}", flush=True
                )
            del run, model, optimizer
    return rows


def _inner(config_path: str) -> None:
    with open(config_path) as f:
        job = json.load(f)
    cfg = job["cfg"]
    torch.set_num_threads(cfg["threads"])
    dist.init_process_group("gloo")
    try:
        rows = {"step-time": _step_time_rank, "accuracy": _accuracy_rank, "profile": _profile_rank}[
            cfg["mode"]
        ](cfg)
        if dist.get_rank() == 0:
            with open(job["result_path"], "w") as f:
                json.dump(rows, f)
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------- driver


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mode", default="step-time", help=f"one of {list(MODES)}")
    parser.add_argument(
        "--rates", nargs="+", default=["100mbit"], help="tc rates of the link (e.g. 100mbit 1gbit)"
    )
    parser.add_argument("--methods", nargs="+", default=None, help=f"subset of {list(METHODS)}")
    parser.add_argument("--ranks-per-node", type=int, default=2)
    parser.add_argument(
        "--mlp-width", type=int, default=2048, help="step time: hidden width (2048: 11.0M params)"
    )
    parser.add_argument("--batch-size", type=int, default=None, help="per rank (default 8; accuracy 32)")
    parser.add_argument("--steps", type=int, default=None, help="measured steps (default 6; accuracy 300)")
    parser.add_argument("--warmup", type=int, default=2, help="unmeasured steps per method (>= 2)")
    parser.add_argument("--lr", type=float, default=None, help="default 0.01; accuracy 0.05")
    parser.add_argument("--hidden", type=int, default=512, help="accuracy: hidden units of DigitsCNN")
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=[0], help="accuracy: seeds (model and data order)"
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="runs/two_nodes")
    parser.add_argument("--timeout-s", type=float, default=1800.0)
    parser.add_argument("--inner", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.inner:
        return args
    if args.mode not in MODES:
        raise ValueError(f"--mode must be one of {list(MODES)}, got {args.mode!r}")
    step_time = args.mode != "accuracy"
    if args.methods is None:
        args.methods = list(
            {
                "step-time": DEFAULT_STEP_METHODS,
                "accuracy": DEFAULT_ACCURACY_METHODS,
                "profile": DEFAULT_PROFILE_METHODS,
            }[args.mode]
        )
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        raise ValueError(f"--methods must be among {list(METHODS)}, got {unknown}")
    args.batch_size = args.batch_size or (8 if step_time else 32)
    args.steps = args.steps or (6 if step_time else 300)
    args.lr = args.lr or (0.01 if step_time else 0.05)
    slow_network.check_minimums(
        args,
        ("ranks_per_node", 1),
        ("mlp_width", 8),
        ("batch_size", 1),
        ("steps", 1),
        ("warmup", 2),
        ("hidden", 1),
        ("threads", 1),
    )
    for rate in args.rates:
        _netns.parse_rate(rate)
    return args


def run_rate(args: argparse.Namespace, nodes: _netns.TwoNodes, rate: str) -> list[dict]:
    nodes.set_rate(rate)
    cfg = {
        key: getattr(args, key)
        for key in (
            "mode",
            "methods",
            "mlp_width",
            "batch_size",
            "steps",
            "warmup",
            "lr",
            "hidden",
            "seeds",
            "threads",
        )
    }
    with tempfile.TemporaryDirectory() as tmp:
        os.chmod(tmp, 0o755)
        job = os.path.join(tmp, "job.json")
        result_path = os.path.join(tmp, "result.json")
        with open(job, "w") as f:
            json.dump({"cfg": cfg, "result_path": result_path}, f)
        env = {
            "PYTHONPATH": os.path.dirname(_HERE),
            "PYTHONWARNINGS": "ignore",
            "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1",
        }
        codes = nodes.run_torchrun(
            args.ranks_per_node,
            [os.path.abspath(__file__), "--inner", job],
            env=env,
            logs=tmp,
            timeout_s=args.timeout_s,
        )
        if codes != [0, 0]:
            logs = "".join(open(os.path.join(tmp, f"node{r}.log")).read()[-4000:] for r in (0, 1))
            raise RuntimeError(f"the ranks failed with exit codes {codes}:\n{logs}")
        with open(result_path) as f:
            rows = json.load(f)
    for row in rows:
        row["rate"] = rate
        row["network"] = nodes.describe()
    return rows


def step_time_table(rows: Sequence[dict]) -> str:
    lines = []
    for rate in dict.fromkeys(r["rate"] for r in rows):
        subset = [r for r in rows if r["rate"] == rate]
        flat = next((r for r in subset if r["method"] == "memsgd_compact"), None)
        lines += [
            f"**{rate} between the nodes**",
            "",
            "| method | median step (s) | vs flat Mem-SGD | MB/step across the link | vs flat Mem-SGD |",
            "|---|---:|---:|---:|---:|",
        ]
        for r in subset:
            vs_time = f"{r['median_step_s'] / flat['median_step_s']:.2f}" if flat else "-"
            vs_bytes = f"{r['link_bytes_per_step'] / flat['link_bytes_per_step']:.2f}" if flat else "-"
            lines.append(
                f"| {r['label']} | {r['median_step_s']:.3f} | {vs_time} | "
                f"{r['link_bytes_per_step'] / 1e6:.3f} | {vs_bytes} |"
            )
        lines.append("")
    return "\n".join(lines)


def accuracy_table(rows: Sequence[dict]) -> str:
    lines = ["| method | seeds | val accuracy per seed | mean |", "|---|---:|---|---:|"]
    for name in dict.fromkeys(r["method"] for r in rows):
        subset = [r for r in rows if r["method"] == name]
        values = [r["val_accuracy"] for r in subset]
        lines.append(
            f"| {subset[0]['label']} | {len(values)} | {' '.join(f'{v:.4f}' for v in values)} | "
            f"{statistics.mean(values):.4f} |"
        )
    return "\n".join(lines)


def profile_table(rows: Sequence[dict]) -> str:
    """Seconds per step by stage (rows) and method (columns), per link rate."""
    lines = []
    for rate in dict.fromkeys(r["rate"] for r in rows):
        subset = [r for r in rows if r["rate"] == rate]
        labels = list(dict.fromkeys(k for r in subset for k in r["stages"]))
        lines += [
            f"**{rate} between the nodes** (seconds per step, mean over the ranks)",
            "",
            "| | " + " | ".join(r["label"] for r in subset) + " |",
            "|---|" + "---:|" * len(subset),
        ]
        for key, title in (
            ("step_s", "step (median)"),
            ("backward_s", "backward, until every bucket is done"),
            ("cpu_s", "CPU seconds, all ranks together (process time)"),
        ):
            lines.append(f"| {title} | " + " | ".join(f"{r[key]:.3f}" for r in subset) + " |")
        for label in labels:
            lines.append(
                f"| {label} | "
                + " | ".join(f"{r['stages'][label]:.3f}" if label in r["stages"] else "-" for r in subset)
                + " |"
            )
        lines.append("")
    return "\n".join(lines)


def timeline_text(rows: Sequence[dict]) -> str:
    """The last measured step of every rank, per method: each timed call as ``label start-end``
    (seconds from the start of the step), in order of start."""
    lines = []
    for r in rows:
        lines.append(f"{r['label']}, {r['rate']}, last step:")
        for rank, events in enumerate(r["timelines"]):
            lines.append(
                f"  rank {rank}: "
                + "; ".join(f"{label} {start:.3f}-{end:.3f}" for label, start, end in events)
            )
    return "\n".join(lines)


def plot_step_time(rows: Sequence[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = list(dict.fromkeys(r["rate"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.8 / len(rates)
    for i, rate in enumerate(rates):
        by_method = {r["method"]: r for r in rows if r["rate"] == rate}
        xs = [j + i * width for j in range(len(methods))]
        axes[0].bar(xs, [by_method[m]["median_step_s"] for m in methods], width, label=rate)
        axes[1].bar(
            xs, [max(by_method[m]["link_bytes_per_step"], 1) / 1e6 for m in methods], width, label=rate
        )
    for ax, title in zip(axes, ("median step time (s)", "MB per step across the link")):
        ax.set_yscale("log")
        ax.set_title(title)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(methods))])
        ax.set_xticklabels(
            [METHODS[m].replace(", ", "\n") for m in methods], rotation=60, ha="right", fontsize=7
        )
        ax.legend(title="link")
    fig.suptitle("2 nodes x 2 ranks (network namespaces joined by a tc-shaped veth pair)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_csv(rows: Sequence[dict], path: str) -> None:
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.inner:
        _inner(args.inner)
        return 0
    _netns.check_can_create()
    os.makedirs(args.out, exist_ok=True)
    rows: list[dict] = []
    started = time.time()
    with _netns.TwoNodes(rate=args.rates[0]) as nodes:
        print(nodes.describe(), flush=True)
        for rate in args.rates:
            rows += run_rate(args, nodes, rate)
    stem = os.path.join(args.out, f"two_nodes_{args.mode.replace('-', '_')}")
    write_csv(rows, stem + ".csv")
    table = {"step-time": step_time_table, "accuracy": accuracy_table, "profile": profile_table}[args.mode](
        rows
    )
    with open(stem + ".md", "w") as f:
        f.write(table + "\n")
    if args.mode == "step-time":
        plot_step_time(rows, stem + ".png")
    print(table)
    if args.mode == "profile":
        print(timeline_text(rows))
    print(f"({time.time() - started:.0f} s; results in {stem}.*)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
