"""Step time and time-to-accuracy on a slow network: ec-hooks against DDP allreduce and PowerSGD.

Launches ``--world-size`` gloo ranks (raw ``torch.distributed`` + DDP, no Lightning) inside a
Linux network namespace whose loopback is rate-limited with ``tc qdisc ... tbf`` (needs root and
iproute2; see ``benchmarks/_netns.py``), or on the plain loopback with ``--no-netns``.  All ranks
share the namespace's one loopback, so the rate caps the *aggregate* traffic of all ranks.

Two modes:

* ``--mode step-time`` (default): a compute-light, communication-heavy setting (a wide MLP of
  11.0M parameters on synthetic 3x32x32 inputs, small batch; ``--model resnet18`` or
  ``resnet20`` for the others).  Methods run one after the other in one process group, each
  on a fresh copy of the same model (back to back; ``--rounds R`` repeats the whole sequence,
  in alternating order, and pools the steps).  Per method: median step time over the measured
  steps (after ``--warmup`` steps; a step's time is the slowest rank's), bytes per step per
  worker from the hooks' / gossip's ``CommStats`` (analytic for torch's hooks), the bytes the
  collective algorithm should put on the wire, and the namespace's ``lo`` byte counter as a
  cross-check; the ratio to allreduce of the same run.  ``--profile`` adds, for the ec-hooks
  methods, timings of error compensation, selection/packing, decompression, memory update and
  residual norm on the real bucket sizes (all ranks at once, as in training); gossip methods
  always report the phases of ``gossip.step()`` (flatten, compress, exchange, mix).
* ``--mode time-to-accuracy``: the offline digits recipe (scikit-learn's 8x8 digits, the
  recipes' ``DigitsCNN``), trained for ``--tta-steps`` steps per method; wall time (training
  steps only, evaluation excluded) to reach ``--tta-target`` validation accuracy, and the final
  accuracy.  Decentralized methods are evaluated on their mean model.  SGD keeps momentum 0.9,
  except for methods whose hook applies it (``Method.hook_options``): their optimizer has none.

Writes ``<out>/step_time.{csv,png,md}`` or ``<out>/time_to_accuracy.{csv,png,md}`` (and
``time_to_accuracy_curves.csv``) and prints a Markdown table::

    python benchmarks/slow_network.py --rates 100mbit            # as root: 4 ranks, 100 Mbit/s
    python benchmarks/slow_network.py --no-netns --world-size 2  # anyone: plain loopback

``--world-sizes 2 4 8`` runs the methods at each number of ranks in turn and adds a table of the
bytes per worker per step against ``n``: the transports' formula (``ec_hooks.transport``; for
torch's methods the collective's) beside what the loopback carried as TCP payload (its byte
counter less 66 bytes of Ethernet/IP/TCP framing per packet), which is exact in the namespace.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import logging
import math
import os
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(_HERE))
sys.path.insert(0, _HERE)

import _netns  # noqa: E402

import ec_hooks  # noqa: E402

logger = logging.getLogger("slow_network")

MODES = ("step-time", "time-to-accuracy")
MODELS = ("mlp", "resnet18", "resnet20")
#: bytes of framing the loopback counts per packet: Ethernet 14, IPv4 20, TCP 20 + 12 of timestamps
FRAME_HEADER_BYTES = 66
DEFAULT_TTA_METHODS = (
    "allreduce",
    "fp16",
    "powersgd_r4",
    "memsgd_topk_1pct",
    "memsgd_cyclic_topk_1pct",
    "deepsqueeze_ring",
)


# ---------------------------------------------------------------------------------------- methods


@dataclass(frozen=True)
class Method:
    """One way of communicating.  ``kind``: ``ddp`` (torch's own path), ``hook`` (ec-hooks
    Mem-SGD hook), ``gossip`` (decentralized, DDP with ``local_hook``) or ``none``."""

    name: str
    label: str
    kind: str
    needs: tuple[str, ...] = ()
    density: float | None = None
    #: further ``TopK`` arguments, as ``(name, value)`` pairs (e.g. the compact wire format)
    topk_options: tuple[tuple[str, str], ...] = ()
    #: ``ec_hooks.transport`` classes added to the hook's transports (opt-in ones)
    extra_transports: tuple[str, ...] = ()
    #: further ``ErrorFeedbackState`` arguments, as ``(name, value)`` pairs (e.g. momentum
    #: correction: ``("momentum", 0.9), ("send_momentum_tail", True)``)
    hook_options: tuple[tuple[str, object], ...] = ()

    @property
    def hook_takes_momentum(self) -> bool:
        """Whether the hook applies the momentum itself (the optimizer's must then be 0, or it
        would apply twice)."""
        return bool(dict(self.hook_options).get("momentum", 0.0))


#: momentum correction as the main job's recipes run it: the hook keeps the velocity (SGD's
#: 0.9) and each entry sent carries its velocity's tail (``docs/momentum-correction.md``)
MOMENTUM_IN_HOOK: tuple[tuple[str, object], ...] = (("momentum", 0.9), ("send_momentum_tail", True))

METHODS = {
    m.name: m
    for m in (
        Method("compute_only", "no communication (compute floor)", "none"),
        Method("allreduce", "DDP allreduce", "ddp"),
        Method("fp16", "DDP fp16_compress_hook", "ddp"),
        Method("powersgd_r2", "torch PowerSGD rank 2", "ddp"),
        Method("powersgd_r4", "torch PowerSGD rank 4", "ddp"),
        Method("memsgd_topk_1pct", "Mem-SGD top-k 1%", "hook", density=0.01),
        Method(
            "memsgd_topk_1pct_mc_tail",
            "Mem-SGD top-k 1%, momentum in the hook + tail",
            "hook",
            density=0.01,
            hook_options=MOMENTUM_IN_HOOK,
        ),
        Method("memsgd_topk_0.1pct", "Mem-SGD top-k 0.1%", "hook", density=0.001),
        Method(
            "memsgd_topk_1pct_delta16",
            "Mem-SGD top-k 1%, delta16 indices",
            "hook",
            density=0.01,
            topk_options=(("index_encoding", "delta16"),),
        ),
        Method(
            "memsgd_topk_1pct_delta16_bf16",
            "Mem-SGD top-k 1%, delta16 indices + bf16 values",
            "hook",
            density=0.01,
            topk_options=(("index_encoding", "delta16"), ("value_dtype", "bf16")),
        ),
        Method(
            "memsgd_cyclic_topk_1pct", "Mem-SGD shared-index (cyclic) top-k 1%", "hook", ("CyclicTopK",), 0.01
        ),
        Method(
            "memsgd_cyclic_topk_1pct_bf16",
            "Mem-SGD shared-index (cyclic) top-k 1%, bf16 values",
            "hook",
            ("CyclicTopK",),
            0.01,
            topk_options=(("value_dtype", "bf16"),),
        ),
        Method(
            "memsgd_cyclic_topk_1pct_candidates",
            "Mem-SGD shared-index top-k 1%, indices from candidates",
            "hook",
            ("CyclicTopK",),
            0.01,
            topk_options=(("selection", "candidates"),),
        ),
        Method(
            "memsgd_cyclic_candidates_1_5pct_bf16_mc_tail",
            "Mem-SGD shared-index top-k 1.5%, candidates, bf16, momentum in the hook + tail",
            "hook",
            ("CyclicTopK",),
            0.015,
            topk_options=(("selection", "candidates"), ("value_dtype", "bf16")),
            hook_options=MOMENTUM_IN_HOOK,
        ),
        Method(
            "memsgd_cyclic_topk_2pct", "Mem-SGD shared-index (cyclic) top-k 2%", "hook", ("CyclicTopK",), 0.02
        ),
        Method(
            "memsgd_cyclic_topk_2pct_bf16",
            "Mem-SGD shared-index (cyclic) top-k 2%, bf16 values",
            "hook",
            ("CyclicTopK",),
            0.02,
            topk_options=(("value_dtype", "bf16"),),
        ),
        Method(
            "memsgd_topk_1pct_sparse",
            "Mem-SGD top-k 1%, sparse allreduce (Ok-Topk)",
            "hook",
            density=0.01,
            extra_transports=("SparseAllreduce",),
        ),
        Method("memsgd_randk_1pct", "Mem-SGD rand-k 1%", "hook", density=0.01),
        Method("ef_sign", "error-feedback scaled sign", "hook"),
        Method("deepsqueeze_ring", "DeepSqueeze top-k 1%, ring", "gossip", ("DeepSqueeze",), 0.01),
        Method(
            "deepsqueeze_one_peer_exp",
            "DeepSqueeze top-k 1%, one-peer exp.",
            "gossip",
            ("DeepSqueeze",),
            0.01,
        ),
        Method("choco_ring", "CHOCO-SGD top-k 1%, ring", "gossip", ("ChocoSGD",), 0.01),
    )
}
DEFAULT_METHODS = tuple(METHODS)


def available(method: Method) -> tuple[bool, str]:
    """Whether the method's ec-hooks classes can be imported here (and why not)."""
    missing = [name for name in method.needs if not hasattr(ec_hooks, name)]
    if missing:
        return False, f"ec_hooks has no {', '.join(missing)} yet (ec_hooks.gossip not importable)"
    return True, ""


def _compressor(method: Method):
    if method.name == "ef_sign":
        return ec_hooks.ScaledSign()
    if "randk" in method.name:
        return ec_hooks.RandK(method.density)
    if "cyclic" in method.name:
        return ec_hooks.CyclicTopK(method.density, **dict(method.topk_options))
    return ec_hooks.TopK(method.density, **dict(method.topk_options))


def _powersgd_bytes(model: nn.Module, rank: int) -> int:
    """Bytes one worker contributes per step to torch's PowerSGD allreduces (P, Q, uncompressed)."""
    from torch.distributed.algorithms.ddp_comm_hooks.powerSGD_hook import _should_compress

    total = 0
    for p in model.parameters():
        matrix = p.detach().view(p.shape[0], -1) if p.dim() > 0 else p.detach().view(1, 1)
        n, m = matrix.shape
        compress, uncompressed, compressed = _should_compress(n, m, min(n, m, rank), 2)
        total += (compressed if compress else uncompressed) * p.element_size()
    return total


def _one_bucket_at_a_time(hook: Callable) -> Callable:
    """Make each bucket wait for the previous bucket's future before it starts communicating.

    torch's ``powerSGD_hook`` launches the P and Q allreduces from future callbacks (gloo's
    threads) while the autograd thread launches the next bucket's allreduce: with several buckets
    the order of collectives then differs across ranks and gloo aborts ("op.preamble.length <=
    op.nbytes").  Waiting serializes the buckets (no overlap between them; little is lost here,
    where compute is light).
    """
    previous: list[torch.futures.Future] = []

    def serialized_hook(state, bucket):
        if previous:
            previous.pop().wait()
        fut = hook(state, bucket)
        previous.append(fut)
        return fut

    return serialized_hook


class MethodRun:
    """A method set up on one rank: its DDP model, what runs after ``optimizer.step()``, and
    its communication figures."""

    def __init__(
        self,
        method: Method,
        model: nn.Module,
        world_size: int,
        powersgd_start_iter: int = 2,
        skip_powersgd_warmup: bool = True,
    ) -> None:
        self.method = method
        self.world_size = world_size
        self.stats = None
        self.gossip = None
        self.powersgd_state = None
        self.hook_state = None
        self.bucket_numels: list[int] = []
        numel = sum(p.numel() for p in model.parameters())
        self.dense_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        self.ddp = DistributedDataParallel(
            model, broadcast_buffers=False, init_sync=False, gradient_as_bucket_view=True
        )
        ring_factor = 2 * (world_size - 1) / world_size  # bytes a worker sends in a ring allreduce, per byte
        name, kind = method.name, method.kind
        if kind == "none":
            self.ddp.register_comm_hook(None, ec_hooks.local_hook)
            self._bytes, self.bytes_source, self.wire_factor = (lambda: 0), "none", 0.0
        elif name == "allreduce":
            self._bytes, self.bytes_source, self.wire_factor = (
                (lambda: self.dense_bytes),
                "analytic",
                ring_factor,
            )
        elif name == "fp16":
            from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

            self.ddp.register_comm_hook(None, default_hooks.fp16_compress_hook)
            self._bytes, self.bytes_source, self.wire_factor = (lambda: 2 * numel), "analytic", ring_factor
        elif name.startswith("powersgd"):
            from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook

            rank = int(name.rsplit("_r", 1)[1])
            self.powersgd_state = powerSGD_hook.PowerSGDState(
                process_group=None,
                matrix_approximation_rank=rank,
                start_powerSGD_iter=powersgd_start_iter,
                min_compression_rate=2,
                use_error_feedback=True,
                warm_start=True,
            )
            if skip_powersgd_warmup:
                # Its allreduce warm-up only matters for convergence; step time is measured compressed.
                self.powersgd_state.iter = powersgd_start_iter
            self.ddp.register_comm_hook(
                self.powersgd_state, _one_bucket_at_a_time(powerSGD_hook.powerSGD_hook)
            )
            compressed = _powersgd_bytes(model, rank)
            self._bytes = lambda: compressed  # the warm-up steps (time-to-accuracy) send dense_bytes
            self.bytes_source, self.wire_factor = "analytic", ring_factor
        elif kind == "hook":
            compressor = _compressor(method)
            state = ec_hooks.ErrorFeedbackState(
                compressor=compressor, module=self.ddp, **dict(method.hook_options)
            )
            self.hook_state = state
            from ec_hooks import transport

            state.transports += tuple(getattr(transport, name)() for name in method.extra_transports)
            self.stats = state.stats
            self.ddp.register_comm_hook(state, self._recording(ec_hooks.error_feedback_hook))
            self._bytes, self.bytes_source = None, "CommStats"
            self.wire_factor = ring_factor if compressor.summable else float(world_size - 1)
        elif kind == "gossip":
            self.ddp.register_comm_hook(None, ec_hooks.local_hook)
            cls = ec_hooks.ChocoSGD if name.startswith("choco") else ec_hooks.DeepSqueeze
            topology = "one_peer_exponential" if name.endswith("one_peer_exp") else "ring"
            kwargs = {"watch_every": 0}  # the divergence watch allreduces the model: not gossip traffic
            try:
                self.gossip = cls(
                    self.ddp.parameters(), topology=topology, compressor=_compressor(method), **kwargs
                )
            except TypeError:
                self.gossip = cls(self.ddp.parameters(), topology=topology, compressor=_compressor(method))
            self.stats = self.gossip.stats
            self._bytes, self.bytes_source, self.wire_factor = None, "CommStats", 1.0
            self._time_gossip_phases()
        else:  # pragma: no cover - METHODS and this function go together
            raise ValueError(f"method must be one of {list(METHODS)}, got {name!r}")

    def _time_gossip_phases(self) -> None:
        """Seconds spent in each phase of ``gossip.step()``: flattening the model, compressing,
        mixing (decoding what arrived, updating, writing back); the exchange is the rest."""
        self.phase_seconds = dict.fromkeys(("flatten", "compress", "mix", "step"), 0.0)
        for phase, attr in (
            ("flatten", "_flatten"),
            ("compress", "_compress"),
            ("mix", "_finish"),
            ("step", "step"),
        ):
            original = getattr(self.gossip, attr, None)
            if original is None:  # another version of the gossip module: time what exists
                continue

            def timed(*args, _original=original, _phase=phase, **kwargs):
                start = time.perf_counter()
                try:
                    return _original(*args, **kwargs)
                finally:
                    self.phase_seconds[_phase] += time.perf_counter() - start

            setattr(self.gossip, attr, timed)

    def gossip_phases(self) -> dict[str, float]:
        seconds = dict(getattr(self, "phase_seconds", {}))
        if not seconds:
            return {}
        exchange = seconds["step"] - seconds["flatten"] - seconds["compress"] - seconds["mix"]
        return {
            "gossip_flatten_s": seconds["flatten"],
            "gossip_compress_s": seconds["compress"],
            "gossip_exchange_s": exchange,
            "gossip_mix_s": seconds["mix"],
        }

    def _recording(self, hook: Callable) -> Callable:
        def recording_hook(state, bucket):
            if bucket.index() >= len(self.bucket_numels):
                self.bucket_numels.append(0)
            self.bucket_numels[bucket.index()] = bucket.buffer().numel()
            return hook(state, bucket)

        return recording_hook

    def expected_wire_bytes(self, bytes_per_step: float) -> float:
        """Bytes one worker should put on the wire per step: for the hook, the formula of the
        transport each bucket chose (``ec_hooks.transport``); otherwise what the collective
        algorithm makes of ``bytes_per_step``."""
        state = self.hook_state
        if state is None or not self.bucket_numels:
            return bytes_per_step * self.wire_factor
        from ec_hooks import transport

        total = 0.0
        for numel in self.bucket_numels:
            chosen = transport.choose(
                state.transports, state.compressor, numel, torch.float32, self.world_size
            )
            total += chosen.wire_bytes(state.compressor, numel, torch.float32, self.world_size)
        return total

    def after_optimizer_step(self) -> None:
        if self.gossip is not None:
            self.gossip.step()

    def after_first_step(self) -> None:
        """DDP rebuilds its buckets once, after the first step; PowerSGD keys its error memories
        by bucket index, so they restart on the final layout."""
        if (
            self.powersgd_state is not None
            and self.powersgd_state.iter > self.powersgd_state.start_powerSGD_iter
        ):
            self.powersgd_state.error_dict.clear()
            self.powersgd_state.p_memory_dict.clear()
            self.powersgd_state.q_memory_dict.clear()

    def bytes_sent_total(self) -> float:
        """Cumulative bytes this worker contributed (for ``CommStats``) or, for analytic methods,
        the bytes of one step (callers multiply)."""
        return float(self.stats.bytes_sent) if self.stats is not None else float(self._bytes())

    def compress_seconds_total(self) -> float:
        return float(self.stats.compress_time_s) if self.stats is not None else 0.0

    def eval_parameters(self) -> list[torch.Tensor] | None:
        """The parameters to evaluate (the mean model for gossip; collective then)."""
        if self.gossip is not None:
            return self.gossip.average_parameters()
        return None


# ---------------------------------------------------------------------------------------- models


def wide_mlp(width: int = 2048, in_features: int = 3 * 32 * 32, num_classes: int = 10) -> nn.Module:
    """``in -> width -> width -> width/8 -> classes`` with ReLUs: 11,016,970 parameters at width 2048."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(in_features, width),
        nn.ReLU(),
        nn.Linear(width, width),
        nn.ReLU(),
        nn.Linear(width, max(1, width // 8)),
        nn.ReLU(),
        nn.Linear(max(1, width // 8), num_classes),
    )


def build_model(name: str, mlp_width: int) -> nn.Module:
    if name == "mlp":
        return wide_mlp(mlp_width)
    from recipes.models import resnet18, resnet20

    return resnet18(10) if name == "resnet18" else resnet20(10)


def build_digits_model(hidden: int) -> nn.Module:
    from recipes.models import DigitsCNN

    return DigitsCNN(num_classes=10, in_channels=1, hidden=hidden)


# ---------------------------------------------------------------------------------------- rank side


def _max_over_ranks(seconds: float) -> float:
    t = torch.tensor([seconds], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def _profile_compressor(
    compressor, numels: Sequence[int], world_size: int, repeats: int = 3, use_fused: bool = True
) -> dict[str, float]:
    """Seconds per step of the hook's non-network work on real bucket sizes (best of ``repeats``):
    error compensation (finite check + ``m += g``), compression (selection + packing), the sum of
    ``world_size`` payloads (decompression), the memory update ``m -= C(m)`` and the squared norm
    of the memory that the statistics keep.  Where the compressor has a fused accumulate-and-select
    pass (``compress_error_feedback_``, as the hook uses), it is timed as the compression and the
    accumulation reads 0.

    Every rank runs it at the same time, so the CPU is shared as during the measured steps."""
    generator = torch.Generator().manual_seed(0)
    keys = (
        "profile_accumulate_s",
        "profile_compress_s",
        "profile_decompress_s",
        "profile_memory_update_s",
        "profile_residual_norm_s",
    )
    totals = dict.fromkeys(keys, 0.0)
    fused = getattr(compressor, "compress_error_feedback_", None) if use_fused else None
    for numel in numels:
        grad = torch.randn(numel, generator=generator)
        memory = torch.randn(numel, generator=generator) * 0.1
        best = dict.fromkeys(keys, math.inf)
        for _ in range(repeats):
            acc = memory.clone()
            t0 = time.perf_counter()
            if fused is not None:  # as the hook does: accumulate and select in one pass
                payload, _ = fused(acc, grad, step=1, key=0, rank=0, wire_dtype=torch.float32)
                t1, t2 = t0, time.perf_counter()
            else:
                acc.add_(torch.where(torch.isfinite(grad), grad, 0))
                t1 = time.perf_counter()
                payload = compressor.compress(acc, step=1, key=0, rank=0, wire_dtype=torch.float32)
                t2 = time.perf_counter()
            payloads = [payload.with_data(payload.data.clone()) for _ in range(world_size)]
            t3 = time.perf_counter()
            if compressor.summable:
                compressor.decompress(payload)
            else:
                compressor.sum_payloads(payloads)
            t4 = time.perf_counter()
            compressor.subtract_sent_(acc, payload)
            t5 = time.perf_counter()
            acc.detach().float().pow(2).sum()  # what CommStats.set_residual computes every step
            t6 = time.perf_counter()
            for key, seconds in zip(keys, (t1 - t0, t2 - t1, t4 - t3, t5 - t4, t6 - t5)):
                best[key] = min(best[key], seconds)
        for key in keys:
            totals[key] += best[key]
    return totals


def _synthetic_batches(cfg: dict, rank: int, count: int = 4):
    generator = torch.Generator().manual_seed(1000 + rank)
    shape = (cfg["batch_size"], 3, 32, 32)
    return [
        (
            torch.randn(shape, generator=generator),
            torch.randint(0, 10, (cfg["batch_size"],), generator=generator),
        )
        for _ in range(count)
    ]


def _step_time_rank(rank: int, cfg: dict) -> list[dict]:
    n = dist.get_world_size()
    batches = _synthetic_batches(cfg, rank)
    order = list(cfg["methods"])
    rows: dict[str, dict] = {}
    for round_index in range(cfg["rounds"]):
        sequence = order if round_index % 2 == 0 else order[::-1]
        for name in sequence:
            method = METHODS[name]
            torch.manual_seed(0)  # the same initial model on every rank (DDP's init broadcast is off)
            model = build_model(cfg["model"], cfg["mlp_width"])
            run = MethodRun(method, model, n)
            optimizer = torch.optim.SGD(run.ddp.parameters(), lr=cfg["lr"])
            times: list[float] = []
            measured = 0
            started = time.perf_counter()
            step = 0
            while True:
                if step == cfg["warmup"]:
                    dist.barrier()
                    counters0 = _netns.loopback_counters()
                    stats0, compress0 = run.bytes_sent_total(), run.compress_seconds_total()
                    phases0 = run.gossip_phases()
                    window_started = time.perf_counter()
                dist.barrier()
                x, y = batches[step % len(batches)]
                t0 = time.perf_counter()
                optimizer.zero_grad(set_to_none=False)
                F.cross_entropy(run.ddp(x), y).backward()
                optimizer.step()
                run.after_optimizer_step()
                elapsed = _max_over_ranks(time.perf_counter() - t0)
                if step == 0:
                    run.after_first_step()
                if step >= cfg["warmup"]:
                    times.append(elapsed)
                    measured += 1
                step += 1
                spent = time.perf_counter() - started
                if measured >= cfg["steps"] or (
                    measured >= cfg["min_steps"] and spent > cfg["method_budget_s"]
                ):
                    break
            dist.barrier()
            counters1 = _netns.loopback_counters()
            window = time.perf_counter() - window_started
            if run.stats is not None:
                bytes_per_step = (run.bytes_sent_total() - stats0) / measured
            else:
                bytes_per_step = run.bytes_sent_total()
            compress_per_step = (run.compress_seconds_total() - compress0) / measured
            phases = {k: (v - phases0[k]) / measured for k, v in run.gossip_phases().items()}
            row = rows.setdefault(
                name,
                {
                    "method": name,
                    "label": method.label,
                    "kind": method.kind,
                    "times": [],
                    "bytes_per_step_per_worker": bytes_per_step,
                    "bytes_source": run.bytes_source,
                    "expected_wire_bytes_per_worker": run.expected_wire_bytes(bytes_per_step),
                    "dense_bytes_per_worker": run.dense_bytes,
                    "lo_bytes": 0,
                    "lo_packets": 0,
                    "lo_steps": 0,
                    "compress_s_per_step": [],
                    "loadavg_1m": [],
                    "window_s": 0.0,
                },
            )
            row["times"].extend(times)
            row["lo_bytes"] += counters1["tx_bytes"] - counters0["tx_bytes"]
            row["lo_packets"] += counters1["tx_packets"] - counters0["tx_packets"]
            row["lo_steps"] += measured
            row["compress_s_per_step"].append(compress_per_step)
            row["loadavg_1m"].append(os.getloadavg()[0])
            row["window_s"] += window
            if round_index == 0:
                row.update(phases)
            if method.kind == "hook":
                row["bucket_numels"] = " ".join(map(str, run.bucket_numels))
            if cfg["profile"] and method.kind in ("hook", "gossip") and round_index == 0:
                # Gossip: one flat tensor, own payload plus two received ones decoded (a ring).
                numels = (
                    run.bucket_numels
                    if method.kind == "hook"
                    else [sum(p.numel() for p in model.parameters())]
                )
                dist.barrier()
                profile = _profile_compressor(
                    _compressor(method),
                    numels,
                    n if method.kind == "hook" else 3,
                    use_fused=method.kind == "hook",
                )
                if rank == 0:
                    row.update(profile)
                    row["bucket_numels"] = " ".join(map(str, numels))
                dist.barrier()
            if rank == 0:
                print(
                    f"[{time.strftime('%H:%M:%S')}] {name}: median step {statistics.median(times):.3f} s over "
                    f"{measured} steps, {bytes_per_step:,.0f} B/step/worker",
                    flush=True,
                )
            del run, model, optimizer
    numel = sum(p.numel() for p in build_model(cfg["model"], cfg["mlp_width"]).parameters())
    out = []
    for name in order:
        row = rows[name]
        times = row.pop("times")
        row.update(
            model=cfg["model"],
            params=numel,
            world_size=n,
            batch_size=cfg["batch_size"],
            steps=len(times),
            median_step_s=statistics.median(times),
            min_step_s=min(times),
            max_step_s=max(times),
            lo_bytes_per_step_per_worker=row["lo_bytes"] / (row["lo_steps"] * n),
            lo_packets_per_step=row["lo_packets"] / row["lo_steps"],
            # The counter counts frames; the collectives' formulas count what TCP carries.
            lo_payload_bytes_per_step_per_worker=(
                row.pop("lo_bytes") - FRAME_HEADER_BYTES * row.pop("lo_packets")
            )
            / (row["lo_steps"] * n),
            compress_s_per_step=statistics.mean(row["compress_s_per_step"]),
            loadavg_1m=statistics.mean(row["loadavg_1m"]),
        )
        row.pop("lo_steps")
        out.append(row)
    return out


def _digits(cfg: dict):
    from recipes.data import DigitsDataModule

    data = DigitsDataModule(batch_size=cfg["batch_size"])
    data.setup()
    x_train, y_train = data.train_set.tensors
    x_val, y_val = data.val_set.tensors
    return (x_train - data.mean) / data.std, y_train, (x_val - data.mean) / data.std, y_val


@torch.no_grad()
def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    correct = (model(x).argmax(dim=1) == y).sum().item()
    model.train()
    return correct / len(y)


def tta_optimizer_momentum(method: Method, momentum: float = 0.9) -> float:
    """The optimizer's momentum in time-to-accuracy mode: ``momentum``, unless the method's hook
    applies it (then 0: once, in the hook, like the main job's momentum-correction rows).
    No weight decay on either side."""
    return 0.0 if method.hook_takes_momentum else momentum


def _time_to_accuracy_rank(rank: int, cfg: dict) -> tuple[list[dict], list[dict]]:
    n = dist.get_world_size()
    x_train, y_train, x_val, y_val = _digits(cfg)
    per_rank = cfg["batch_size"]
    summaries, curves = [], []
    for name in cfg["methods"]:
        method = METHODS[name]
        seed = cfg.get("tta_seed", 0)
        torch.manual_seed(seed)
        model = build_digits_model(cfg["tta_hidden"])
        run = MethodRun(
            method, model, n, powersgd_start_iter=cfg["powersgd_start_iter"], skip_powersgd_warmup=False
        )
        optimizer = torch.optim.SGD(
            run.ddp.parameters(), lr=cfg["tta_lr"], momentum=tta_optimizer_momentum(method)
        )
        evaluator = build_digits_model(cfg["tta_hidden"])
        wall, step, epoch = 0.0, 0, 0
        time_to_target = steps_to_target = None
        accuracy = 0.0
        while step < cfg["tta_steps"] and wall < cfg["tta_budget_s"]:
            order = torch.randperm(len(y_train), generator=torch.Generator().manual_seed(epoch + 1000 * seed))
            shard = order[rank::n]
            for start in range(0, len(shard) - per_rank + 1, per_rank):
                idx = shard[start : start + per_rank]
                dist.barrier()
                t0 = time.perf_counter()
                optimizer.zero_grad(set_to_none=False)
                F.cross_entropy(run.ddp(x_train[idx]), y_train[idx]).backward()
                optimizer.step()
                run.after_optimizer_step()
                wall += _max_over_ranks(time.perf_counter() - t0)
                if step == 0:
                    run.after_first_step()
                step += 1
                if step % cfg["tta_eval_every"] == 0 or step == cfg["tta_steps"]:
                    params = run.eval_parameters()  # collective for gossip
                    if rank == 0:
                        with torch.no_grad():
                            source = (
                                params if params is not None else [p.detach() for p in model.parameters()]
                            )
                            for target, value in zip(evaluator.parameters(), source):
                                target.copy_(value)
                        accuracy = _accuracy(evaluator, x_val, y_val)
                        curves.append(
                            {
                                "method": name,
                                "label": method.label,
                                "step": step,
                                "wall_s": wall,
                                "val_accuracy": accuracy,
                            }
                        )
                        if time_to_target is None and accuracy >= cfg["tta_target"]:
                            time_to_target, steps_to_target = wall, step
                    flags = torch.tensor([accuracy, wall], dtype=torch.float64)
                    dist.broadcast(flags, 0)  # every rank takes the same decisions
                    accuracy, wall = float(flags[0]), float(flags[1])
                if step >= cfg["tta_steps"] or wall >= cfg["tta_budget_s"]:
                    break
            epoch += 1
        if rank == 0:
            bytes_per_step = (
                (run.bytes_sent_total() / step) if run.stats is not None else run.bytes_sent_total()
            )
            summaries.append(
                {
                    "method": name,
                    "label": method.label,
                    "kind": method.kind,
                    "steps": step,
                    "wall_s": wall,
                    "time_to_target_s": time_to_target,
                    "steps_to_target": steps_to_target,
                    "target_accuracy": cfg["tta_target"],
                    "final_accuracy": accuracy,
                    "best_accuracy": max(c["val_accuracy"] for c in curves if c["method"] == name),
                    "bytes_per_step_per_worker": bytes_per_step,
                    "bytes_source": run.bytes_source,
                    "params": sum(p.numel() for p in model.parameters()),
                    "world_size": n,
                    "batch_size": per_rank,
                    "loadavg_1m": os.getloadavg()[0],
                }
            )
            ttt = (
                "not reached"
                if time_to_target is None
                else f"{time_to_target:.1f} s (step {steps_to_target})"
            )
            print(
                f"[{time.strftime('%H:%M:%S')}] {name}: {step} steps in {wall:.1f} s, final accuracy "
                f"{accuracy:.3f}, target {cfg['tta_target']}: {ttt}",
                flush=True,
            )
        dist.barrier()
        del run, model, optimizer
    return summaries, curves


def _rank_main(rank: int, cfg: dict, port: int, result_path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    torch.set_num_threads(cfg["threads"])
    logging.basicConfig(level=logging.WARNING)
    dist.init_process_group(
        "gloo",
        rank=rank,
        world_size=cfg["world_size"],
        timeout=datetime.timedelta(seconds=cfg["collective_timeout_s"]),
    )
    try:
        if cfg["mode"] == "step-time":
            result = {"rows": _step_time_rank(rank, cfg)}
        else:
            summaries, curves = _time_to_accuracy_rank(rank, cfg)
            result = {"rows": summaries, "curves": curves}
        if rank == 0:
            with open(result_path, "w") as f:
                json.dump(result, f)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(cfg: dict, result_path: str) -> None:
    """Start the ranks in this process's network namespace and wait for them."""
    mp.start_processes(
        _rank_main,
        args=(cfg, _free_port(), result_path),
        nprocs=cfg["world_size"],
        join=True,
        start_method="spawn",
    )


# ---------------------------------------------------------------------------------------- driver side


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mode", default="step-time", help=f"one of {list(MODES)}")
    parser.add_argument("--world-size", type=int, default=4)
    parser.add_argument(
        "--world-sizes",
        type=int,
        nargs="+",
        default=None,
        help="run every method at each of these numbers of ranks (e.g. 2 4 8) and add the table of "
        "bytes per worker against n; overrides --world-size",
    )
    parser.add_argument(
        "--rates",
        nargs="+",
        default=["100mbit"],
        help="tc rates to run, one namespace setting each (e.g. 100mbit 1gbit)",
    )
    parser.add_argument(
        "--no-netns", action="store_true", help="plain loopback, no rate limit, no root needed"
    )
    parser.add_argument("--mtu", type=int, default=9000, help="MTU of lo in the namespace (bytes)")
    parser.add_argument(
        "--burst", type=int, default=None, help="tbf bucket, bytes (default: rate/250Hz, >= 4 MTU)"
    )
    parser.add_argument("--latency", default="50ms", help="tbf queue latency (tc time)")
    parser.add_argument(
        "--methods",
        nargs="+",
        default=None,
        help=f"subset of {list(METHODS)} (default: all; time-to-accuracy: {list(DEFAULT_TTA_METHODS)})",
    )
    parser.add_argument("--model", default="mlp", help=f"step-time model, one of {list(MODELS)}")
    parser.add_argument(
        "--mlp-width", type=int, default=2048, help="hidden width of the MLP (2048: 11.0M parameters)"
    )
    parser.add_argument(
        "--batch-size", type=int, default=None, help="per rank (default 8; 32 for time-to-accuracy)"
    )
    parser.add_argument("--steps", type=int, default=5, help="measured steps per method (at most)")
    parser.add_argument("--min-steps", type=int, default=2, help="measured steps per method even over budget")
    parser.add_argument(
        "--warmup", type=int, default=1, help="unmeasured steps per method (>= 1: DDP's rebuild)"
    )
    parser.add_argument(
        "--rounds", type=int, default=1, help="repeat the method sequence, alternating its order"
    )
    parser.add_argument(
        "--method-budget-s",
        type=float,
        default=60.0,
        help="stop measuring a method after this many seconds (once --min-steps are done)",
    )
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument(
        "--profile", action="store_true", help="time selection/decompression/memory update too"
    )
    parser.add_argument("--tta-target", type=float, default=0.95, help="validation accuracy to reach")
    parser.add_argument("--tta-steps", type=int, default=200, help="training steps per method")
    parser.add_argument("--tta-eval-every", type=int, default=5)
    parser.add_argument(
        "--tta-budget-s",
        type=float,
        default=300.0,
        help="time-to-accuracy: stop a method after this much training wall time",
    )
    parser.add_argument(
        "--tta-hidden", type=int, default=512, help="hidden units of DigitsCNN (512: 0.27M params)"
    )
    parser.add_argument("--tta-lr", type=float, default=0.05)
    parser.add_argument(
        "--tta-seed",
        type=int,
        default=0,
        help="time-to-accuracy: seed of the model's initialisation and of the data order",
    )
    parser.add_argument(
        "--powersgd-start-iter",
        type=int,
        default=10,
        help="time-to-accuracy: PowerSGD's allreduce warm-up steps (counted in its time)",
    )
    parser.add_argument("--out", default="runs/slow_network", help="output folder for the CSV and the PNG")
    parser.add_argument(
        "--timeout-s", type=float, default=1800.0, help="kill the ranks after this long per rate"
    )
    parser.add_argument("--inner", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    validate(args)
    return args


def check_minimums(args: argparse.Namespace, *minimums: tuple[str, int]) -> None:
    """Each ``(name, low)``: the integer option ``--name`` must be at least ``low``."""
    for name, low in minimums:
        if getattr(args, name) < low:
            raise ValueError(
                f"--{name.replace('_', '-')} must be an integer >= {low}, got {getattr(args, name)}"
            )


def validate(args: argparse.Namespace) -> None:
    """ValueError naming the parameter and what it allows."""
    if args.mode not in MODES:
        raise ValueError(f"--mode must be one of {list(MODES)}, got {args.mode!r}")
    if args.model not in MODELS:
        raise ValueError(f"--model must be one of {list(MODELS)}, got {args.model!r}")
    if args.methods is None:
        args.methods = list(DEFAULT_METHODS if args.mode == "step-time" else DEFAULT_TTA_METHODS)
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        raise ValueError(f"--methods must be among {list(METHODS)}, got {unknown}")
    if len(set(args.methods)) != len(args.methods):
        raise ValueError(f"--methods lists a method twice: {args.methods}")
    if args.batch_size is None:
        args.batch_size = 8 if args.mode == "step-time" else 32
    if args.world_sizes is not None:
        if len(set(args.world_sizes)) != len(args.world_sizes) or any(n < 2 for n in args.world_sizes):
            raise ValueError(f"--world-sizes must be distinct integers >= 2, got {args.world_sizes}")
        args.world_size = args.world_sizes[0]
    check_minimums(
        args,
        ("world_size", 2),
        ("steps", 1),
        ("min_steps", 1),
        ("warmup", 1),
        ("rounds", 1),
        ("batch_size", 1),
        ("threads", 1),
        ("mlp_width", 8),
        ("tta_steps", 1),
        ("tta_eval_every", 1),
        ("tta_hidden", 1),
        ("powersgd_start_iter", 2),
        ("tta_seed", 0),
    )
    if args.world_sizes is None:
        args.world_sizes = [args.world_size]
    if args.min_steps > args.steps:
        raise ValueError(f"--min-steps must be <= --steps ({args.steps}), got {args.min_steps}")
    for name in ("lr", "tta_lr", "method_budget_s", "tta_budget_s", "timeout_s"):
        if not getattr(args, name) > 0:
            raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    if not 0 < args.tta_target <= 1:
        raise ValueError(f"--tta-target must be in (0, 1], got {args.tta_target}")
    if args.no_netns and len(args.rates) > 1:
        raise ValueError("--rates takes one value with --no-netns (the plain loopback has no rate limit)")
    for rate in args.rates:
        _netns.parse_rate(rate)
    if args.mode == "step-time" and "allreduce" not in args.methods:
        raise ValueError(
            "--methods must include 'allreduce' in step-time mode: ratios are to allreduce of the same run"
        )


def rank_config(args: argparse.Namespace, methods: Sequence[str]) -> dict:
    keys = (
        "mode",
        "world_size",
        "model",
        "mlp_width",
        "batch_size",
        "steps",
        "min_steps",
        "warmup",
        "rounds",
        "method_budget_s",
        "lr",
        "threads",
        "profile",
        "tta_target",
        "tta_steps",
        "tta_eval_every",
        "tta_hidden",
        "tta_lr",
        "tta_budget_s",
        "powersgd_start_iter",
        "tta_seed",
    )
    cfg = {key: getattr(args, key) for key in keys}
    cfg["methods"] = list(methods)
    cfg["collective_timeout_s"] = int(args.timeout_s)
    return cfg


def _run_in_namespace(ns: _netns.RateLimitedNamespace, cfg: dict, result_path: str, timeout_s: float) -> None:
    """Re-run this script inside the namespace (``ip netns exec``); its ranks inherit the namespace."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump({"cfg": cfg, "result_path": result_path}, f)
        inner = f.name
    command = ns.exec_prefix() + [sys.executable, os.path.abspath(__file__), "--inner", inner]
    # A session of its own, so that the whole tree (ranks included) can be stopped by its group id.
    child = subprocess.Popen(command, start_new_session=True)
    try:
        code = child.wait(timeout=timeout_s)
        if code != 0:
            raise RuntimeError(f"the ranks failed (exit code {code}): {shlex.join(command)}")
    except BaseException:
        _stop_group(child)
        raise
    finally:
        os.unlink(inner)


def _stop_group(child: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        try:
            os.killpg(child.pid, sig)
        except ProcessLookupError:
            return
        try:
            child.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def run_rate(
    args: argparse.Namespace, rate: str | None, methods: Sequence[str], ns: _netns.RateLimitedNamespace | None
) -> dict:
    cfg = rank_config(args, methods)
    with tempfile.TemporaryDirectory() as tmp:
        result_path = os.path.join(tmp, "result.json")
        if ns is None:
            run_ranks(cfg, result_path)
        else:
            ns.set_rate(rate, args.burst)
            _run_in_namespace(ns, cfg, result_path, args.timeout_s)
        with open(result_path) as f:
            result = json.load(f)
    network = "plain loopback" if ns is None else ns.describe()
    for row in result["rows"] + result.get("curves", []):
        row["rate"] = rate or "unlimited"
        row["network"] = network
    return result


def finish_step_time_rows(rows: list[dict]) -> list[dict]:
    """Add the ratios to allreduce of the same rate and world size, and the counter cross-check."""
    base = {(r["rate"], r.get("world_size")): r["median_step_s"] for r in rows if r["method"] == "allreduce"}
    for row in rows:
        key = (row["rate"], row.get("world_size"))
        row["step_vs_allreduce"] = row["median_step_s"] / base[key] if key in base else float("nan")
        expected = row["expected_wire_bytes_per_worker"]
        row["lo_over_expected"] = row["lo_bytes_per_step_per_worker"] / expected if expected else float("nan")
        payload = row.get("lo_payload_bytes_per_step_per_worker")
        row["lo_payload_over_expected"] = (
            payload / expected if expected and payload is not None else float("nan")
        )
    return rows


CSV_FIELDS = {
    "step-time": [
        "rate",
        "method",
        "label",
        "kind",
        "model",
        "params",
        "world_size",
        "batch_size",
        "steps",
        "median_step_s",
        "min_step_s",
        "max_step_s",
        "step_vs_allreduce",
        "bytes_per_step_per_worker",
        "bytes_source",
        "dense_bytes_per_worker",
        "expected_wire_bytes_per_worker",
        "lo_bytes_per_step_per_worker",
        "lo_over_expected",
        "lo_packets_per_step",
        "lo_payload_bytes_per_step_per_worker",
        "lo_payload_over_expected",
        "compress_s_per_step",
        "profile_accumulate_s",
        "profile_compress_s",
        "profile_decompress_s",
        "profile_memory_update_s",
        "profile_residual_norm_s",
        "gossip_flatten_s",
        "gossip_compress_s",
        "gossip_exchange_s",
        "gossip_mix_s",
        "bucket_numels",
        "loadavg_1m",
        "window_s",
        "network",
    ],
    "time-to-accuracy": [
        "rate",
        "method",
        "label",
        "kind",
        "params",
        "world_size",
        "batch_size",
        "steps",
        "wall_s",
        "target_accuracy",
        "time_to_target_s",
        "steps_to_target",
        "time_to_target_vs_allreduce",
        "final_accuracy",
        "best_accuracy",
        "bytes_per_step_per_worker",
        "bytes_source",
        "loadavg_1m",
        "network",
    ],
    "curves": ["rate", "method", "label", "step", "wall_s", "val_accuracy", "network"],
}


def write_csv(rows: Sequence[dict], path: str, fields: Sequence[str]) -> None:
    """Rows as CSV with the given columns (missing values empty, floats as written by repr)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(fields), extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in fields})


def _mb(value: float) -> str:
    return f"{value / 1e6:.3f}" if value < 1e7 else f"{value / 1e6:.1f}"


def step_time_table(rows: Sequence[dict]) -> str:
    lines = [
        "| rate | method | median step (s) | vs allreduce | MB/step/worker (stats) | expected on wire (MB) "
        "| lo counter (MB) | lo / expected | compress (s/step) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        source = "" if r["bytes_source"] == "CommStats" else f" ({r['bytes_source']})"
        ratio = r["lo_over_expected"]
        lines.append(
            f"| {r['rate']} | {r['label']} | {r['median_step_s']:.3f} | {r['step_vs_allreduce']:.3f} "
            f"| {_mb(r['bytes_per_step_per_worker'])}{source} | {_mb(r['expected_wire_bytes_per_worker'])} "
            f"| {_mb(r['lo_bytes_per_step_per_worker'])} | {'-' if math.isnan(ratio) else f'{ratio:.2f}'} "
            f"| {r['compress_s_per_step']:.3f} |"
        )
    return "\n".join(lines)


def bytes_vs_n_table(rows: Sequence[dict]) -> str:
    """Bytes per worker per step against the number of ranks: the transports' formula (or the
    collective's, for torch's methods) and what the loopback carried as TCP payload (frames less
    their headers), per method; and the growth from the smallest to the largest ``n``."""
    sizes = sorted({r["world_size"] for r in rows})
    rate = rows[0]["rate"]
    by = {(r["method"], r["world_size"]): r for r in rows if r["rate"] == rate}
    head = " | ".join(f"n={n}: formula / lo payload (MB)" for n in sizes)
    lines = [
        f"| method | {head} | lo growth n={sizes[0]} to {sizes[-1]} |",
        "|---|" + "---:|" * (len(sizes) + 1),
    ]
    for method in dict.fromkeys(r["method"] for r in rows):
        cells, lo = [], []
        for n in sizes:
            r = by.get((method, n))
            if r is None:
                cells.append("-")
                continue
            lo.append(r["lo_payload_bytes_per_step_per_worker"])
            cells.append(f"{_mb(r['expected_wire_bytes_per_worker'])} / {_mb(lo[-1])}")
        growth = f"{lo[-1] / lo[0]:.2f}x" if len(lo) == len(sizes) and lo[0] > 0 else "-"
        label = next(r["label"] for r in rows if r["method"] == method)
        lines.append(f"| {label} | {' | '.join(cells)} | {growth} |")
    return "\n".join(lines)


def tta_table(rows: Sequence[dict]) -> str:
    lines = [
        "| rate | method | steps | train wall (s) | time to target (s) | vs allreduce | final acc. | best acc. "
        "| MB/step/worker |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        ttt = (
            "-"
            if r["time_to_target_s"] is None
            else f"{r['time_to_target_s']:.1f} (step {r['steps_to_target']})"
        )
        ratio = r.get("time_to_target_vs_allreduce")
        lines.append(
            f"| {r['rate']} | {r['label']} | {r['steps']} | {r['wall_s']:.1f} | {ttt} "
            f"| {'-' if ratio is None else f'{ratio:.3f}'} | {r['final_accuracy']:.3f} "
            f"| {r['best_accuracy']:.3f} | {_mb(r['bytes_per_step_per_worker'])} |"
        )
    return "\n".join(lines)


def plot_step_time(rows: Sequence[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = list(dict.fromkeys(r["rate"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    labels = {r["method"]: r["label"] for r in rows}
    fig, axes = plt.subplots(1, 2, figsize=(14, 0.45 * len(methods) * len(rates) + 2.5))
    height = 0.8 / len(rates)
    for i, rate in enumerate(rates):
        by_method = {r["method"]: r for r in rows if r["rate"] == rate}
        ys = [k + i * height for k in range(len(methods))]
        steps = [by_method[m]["median_step_s"] if m in by_method else 0 for m in methods]
        sent = [by_method[m]["lo_bytes_per_step_per_worker"] / 1e6 if m in by_method else 0 for m in methods]
        axes[0].barh(ys, steps, height=height, label=rate)
        axes[1].barh(ys, sent, height=height, label=rate)
        for y, m in zip(ys, methods):
            if m in by_method:
                axes[0].text(
                    by_method[m]["median_step_s"],
                    y,
                    f" {by_method[m]['step_vs_allreduce']:.3f}x",
                    va="center",
                    fontsize=7,
                )
    for ax, title in (
        (axes[0], "median step time (s), log; label: ratio to allreduce"),
        (axes[1], "MB per step per worker on lo (counter), log"),
    ):
        ax.set_yticks([k + 0.4 - height / 2 for k in range(len(methods))], [labels[m] for m in methods])
        ax.invert_yaxis()
        ax.set_xscale("log")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=8)
    first = rows[0]
    fig.suptitle(
        f"{first['world_size']} ranks, {first['model']} ({first['params'] / 1e6:.1f}M params), "
        f"batch {first['batch_size']}/rank",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_tta(curves: Sequence[dict], target: float, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for (rate, method), label in {(c["rate"], c["method"]): c["label"] for c in curves}.items():
        points = [c for c in curves if c["rate"] == rate and c["method"] == method]
        ax.plot(
            [c["wall_s"] for c in points],
            [c["val_accuracy"] for c in points],
            marker=".",
            label=f"{label} ({rate})",
        )
    ax.axhline(target, color="grey", linestyle="--", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("training wall time (s, log)")
    ax.set_ylabel("validation accuracy (digits)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--inner"]:  # inside the namespace: start the ranks
        with open(argv[1]) as f:
            job = json.load(f)
        run_ranks(job["cfg"], job["result_path"])
        return 0
    try:
        args = parse_args(argv)
    except ValueError as exc:
        print(f"slow_network.py: error: {exc}", file=sys.stderr)
        return 2
    methods = []
    for name in args.methods:
        ok, why = available(METHODS[name])
        if ok:
            methods.append(name)
        else:
            print(f"note: skipping {name}: {why}", flush=True)
    if not methods:
        print("slow_network.py: error: none of the methods can run here", file=sys.stderr)
        return 2
    ns = None
    try:
        if not args.no_netns:
            ns = _netns.RateLimitedNamespace(
                args.rates[0], mtu=args.mtu, burst=args.burst, latency=args.latency
            )
            ns.__enter__()
            print(f"network: {ns.describe()}", flush=True)
        results = []
        for world_size in args.world_sizes:
            args.world_size = world_size
            results += [
                run_rate(args, None if ns is None else rate, methods, ns)
                for rate in (args.rates if ns is not None else [None])
            ]
    except _netns.NamespaceUnavailable as exc:
        print(f"slow_network.py: error: {exc}", file=sys.stderr)
        return 2
    finally:
        if ns is not None:
            ns.close()
    os.makedirs(args.out, exist_ok=True)
    command = "python benchmarks/slow_network.py " + shlex.join(argv)
    rows = [row for result in results for row in result["rows"]]
    if args.mode == "step-time":
        rows = finish_step_time_rows(rows)
        csv_path, png_path = os.path.join(args.out, "step_time.csv"), os.path.join(args.out, "step_time.png")
        write_csv(rows, csv_path, CSV_FIELDS["step-time"])
        sizes = sorted({r["world_size"] for r in rows})
        if len(sizes) == 1:
            plot_step_time(rows, png_path)
            table = step_time_table(rows)
        else:
            plot_step_time([{**r, "rate": f"{r['rate']}, {r['world_size']} ranks"} for r in rows], png_path)
            table = "\n\n".join(
                f"{n} ranks:\n\n" + step_time_table([r for r in rows if r["world_size"] == n]) for n in sizes
            )
            table += "\n\nBytes per worker per step against the number of ranks:\n\n" + bytes_vs_n_table(rows)
    else:
        base = {r["rate"]: r["time_to_target_s"] for r in rows if r["method"] == "allreduce"}
        for row in rows:
            b = base.get(row["rate"])
            row["time_to_target_vs_allreduce"] = (
                row["time_to_target_s"] / b if b and row["time_to_target_s"] else None
            )
        curves = [c for result in results for c in result["curves"]]
        csv_path, png_path = (
            os.path.join(args.out, "time_to_accuracy.csv"),
            os.path.join(args.out, "time_to_accuracy.png"),
        )
        write_csv(rows, csv_path, CSV_FIELDS["time-to-accuracy"])
        write_csv(curves, os.path.join(args.out, "time_to_accuracy_curves.csv"), CSV_FIELDS["curves"])
        plot_tta(curves, args.tta_target, png_path)
        table = tta_table(rows)
    with open(os.path.join(args.out, f"{args.mode.replace('-', '_')}.md"), "w") as f:
        f.write(f"`{command}`\n\n{rows[0]['network']}\n\n{table}\n")
    print(f"\n`{command}`\n\n{table}\n\nwrote {csv_path} and {png_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
