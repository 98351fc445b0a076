"""Compare communication methods by accuracy and bytes: one table and one plot.

    python -m recipes.compare                                  # every method, digits, 4 CPU processes
    python -m recipes.compare --methods '[ddp, memsgd_topk1, deepsqueeze_topk]' --max_epochs 5
    python -m recipes.compare --dataset resnet20_cifar10 --devices 2 --accelerator gpu

Each method is the config ``recipes/configs/<dataset>_<method>.yaml`` (the same files
``python -m recipes.train fit --config ...`` takes).  The ``devices`` worker processes are started
once (gloo on CPU, NCCL on GPUs) and train every method in turn, each from the same seed, so
the machine's start-up cost is paid once.  Written to ``out_dir`` (default ``runs/compare/``):

* ``results.md`` and ``results.csv``: method, final validation accuracy (of the model a user
  keeps: the average model for the gossip methods), bytes one worker sends per optimizer step
  (mean over the run and the workers), compression ratio against DDP's allreduce of the same
  model (``4 * parameters`` bytes per step for fp32), training wall time;
* ``curves.csv``: every validation of every method (after each epoch): method, epoch
  (Lightning's 0-based index of the epoch just trained), optimizer step, validation accuracy and
  the bytes one worker has sent so far (mean over the workers);
* ``accuracy_vs_bytes.png``: those curves, accuracy against bytes sent so far (log scale), and
  final accuracy against bytes per step.

The byte figures are the strategies' own counts (:class:`ec_hooks.CommStats`): the payloads a
worker puts into the collectives, or sends to its neighbours for gossip.
"""

from __future__ import annotations

import csv
import logging
import math
import os
import queue as queue_module
import socket
import sys
import time
import traceback
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
import torch.multiprocessing as mp

from ec_hooks.validation import check_int

__all__ = [
    "DEFAULT_METHODS",
    "CurvePoint",
    "MethodResult",
    "compare",
    "format_table",
    "main",
    "plot",
    "write_csv",
    "write_curves_csv",
]

logger = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
# Seconds the worker processes may take to start (imports, first rendezvous) before the first method.
STARTUP_TIMEOUT = 300.0

DEFAULT_METHODS = (
    "ddp",
    "fp16",
    "powersgd",
    "memsgd_topk1",
    "memsgd_topk1_nocorr",
    "memsgd_topk1_compact",
    "memsgd_cyclic_topk1",
    "memsgd_topk01",
    "memsgd_randk",
    "ef_sign",
    "deepsqueeze_topk",
    "deepsqueeze_sign",
    "choco",
    "dpsgd",
)


class CurvePoint(NamedTuple):
    """One validation during training: accuracy against the bytes a worker has sent so far."""

    bytes_sent: float
    accuracy: float
    epoch: int
    step: int


@dataclass
class MethodResult:
    """One row of the comparison."""

    method: str
    config: str
    accuracy: float = float("nan")
    bytes_per_step: float = float("nan")
    dense_bytes_per_step: float = float("nan")
    compression_ratio: float = float("nan")
    steps: int = 0
    seconds: float = float("nan")
    curve: list[CurvePoint] = field(default_factory=list)
    error: str = ""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _comm_bytes(strategy) -> float:
    stats = getattr(strategy, "comm_stats", None)
    if stats is None:
        return float("nan")
    stats = [stats] if hasattr(stats, "bytes_sent") else list(stats)
    return float(sum(s.bytes_sent for s in stats))


def _collective_device() -> torch.device:
    import torch.distributed as dist

    # NCCL reduces CUDA tensors only; Lightning has set this rank's device by then.
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _mean_over_workers(values: list[float]) -> list[float]:
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=_collective_device())
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t.tolist()


def _recorder():
    from lightning.pytorch import Callback

    class _Recorder(Callback):
        """Validation accuracy against the bytes this worker has sent, after every validation."""

        def __init__(self) -> None:
            self.curve: list[CurvePoint] = []

        def on_validation_end(self, trainer, pl_module) -> None:
            if trainer.sanity_checking or "val/acc" not in trainer.callback_metrics:
                return
            sent = _comm_bytes(trainer.strategy)
            sent = 0.0 if math.isnan(sent) else sent
            (sent,) = _mean_over_workers([sent])
            accuracy = float(trainer.callback_metrics["val/acc"])
            self.curve.append(CurvePoint(sent, accuracy, trainer.current_epoch, trainer.global_step))

    return _Recorder()


def _run_method(
    name: str, config: Path, devices: int, accelerator: str, overrides: list[str], out_dir: Path
) -> MethodResult:
    import lightning.pytorch as pl

    from recipes.train import main as cli_main

    # The run's full configuration is saved as <out_dir>/<method>/config.yaml.
    args = [
        "--config",
        str(config),
        "--trainer.devices",
        str(devices),
        "--trainer.accelerator",
        accelerator,
        "--trainer.default_root_dir",
        str(out_dir / name),
        "--trainer.logger",
        "false",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.enable_model_summary",
        "false",
        "--trainer.enable_checkpointing",
        "false",
        *overrides,
    ]
    cli = cli_main(args, run=False)
    recorder = _recorder()
    cli.trainer.callbacks.append(recorder)  # type: ignore[attr-defined]  # set by Lightning's connector
    started = time.perf_counter()
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    seconds = time.perf_counter() - started
    trainer: pl.Trainer = cli.trainer
    steps = max(trainer.global_step, 1)
    dense = sum(p.numel() * p.element_size() for p in cli.model.parameters() if p.requires_grad)
    sent = _comm_bytes(trainer.strategy)
    accuracy = float(trainer.callback_metrics.get("val/acc", float("nan")))
    sent, seconds = _mean_over_workers([sent, seconds])
    per_step = sent / steps
    return MethodResult(
        name,
        str(config),
        accuracy,
        per_step,
        float(dense),
        dense / per_step if per_step else math.inf,
        trainer.global_step,
        seconds,
        recorder.curve,
    )


def _worker(rank, world_size, port, jobs, accelerator, overrides, out_dir, results):
    """Train ``jobs`` (``(index, method, config)``) in turn; rank 0 reports each start and result."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        LOCAL_RANK=str(rank),
        NODE_RANK="0",
        WORLD_SIZE=str(world_size),
    )
    torch.set_num_threads(1)
    sys.argv = sys.argv[:1]  # the configs are the arguments of LightningCLI, not this command line
    import lightning.pytorch  # noqa: F401 - sets its loggers' levels on import; quieten them after
    import torch.distributed as dist

    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # Lightning 2.6 on recent torch warns about its own pytree use on every fit.
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")

    try:
        for index, name, config in jobs:
            if rank == 0:
                results.put(("started", index))
            try:
                result = _run_method(name, config, world_size, accelerator, overrides, out_dir)
                failed = 0.0
            except Exception as exc:  # noqa: BLE001 - reported in the table, the other methods still run
                result = MethodResult(name, str(config), error=f"{type(exc).__name__}: {exc}")
                failed = 1.0
                logger.error("method %s failed on rank %d:\n%s", name, rank, traceback.format_exc())
            if dist.is_initialized():
                flag = torch.tensor([failed], device=_collective_device())
                dist.all_reduce(flag)  # every rank agrees that the method failed somewhere
                if flag.item() and not result.error:
                    result = MethodResult(name, str(config), error="failed on another rank")
            if rank == 0:
                results.put(("result", (index, asdict(result))))
    except BaseException:  # noqa: BLE001
        results.put(("fatal", f"rank {rank}:\n{traceback.format_exc()}"))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _stop(procs, graceful: bool) -> None:
    for p in procs:
        p.join(timeout=30 if graceful else 0.1)
        if p.is_alive():
            p.kill()
            p.join(timeout=10)


def _run_jobs(jobs, devices, accelerator, overrides, out_dir, method_timeout, startup_timeout, on_result):
    """One set of ``devices`` worker processes trains ``jobs`` until all are done or one fails hard.

    Returns the index of the job that timed out or lost a worker (with the reason), or ``None``
    when every job reported a result.  ``on_result`` receives each ``(index, MethodResult)``.
    """
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [
        ctx.Process(target=_worker, args=(r, devices, port, jobs, accelerator, overrides, out_dir, queue))
        for r in range(devices)
    ]
    for p in procs:
        p.start()
    remaining = [index for index, _, _ in jobs]
    current: int | None = None  # the job the workers are training
    deadline = time.monotonic() + startup_timeout
    failure: tuple[int, str] | None = None
    try:
        while remaining:
            try:
                kind, value = queue.get(timeout=max(0.05, min(1.0, deadline - time.monotonic())))
            except queue_module.Empty:
                dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
                if dead:
                    failure = (
                        remaining[0] if current is None else current,
                        f"a worker process exited (exit code {dead[0]})",
                    )
                elif time.monotonic() > deadline:
                    what = (
                        f"timeout: no result within {method_timeout:g} s"
                        if current is not None
                        else f"timeout: the workers did not start within {startup_timeout:g} s"
                    )
                    failure = (remaining[0] if current is None else current, what)
                if failure:
                    break
                continue
            if kind == "started":
                current, deadline = value, time.monotonic() + method_timeout
            elif kind == "result":
                index, fields = value
                on_result(index, MethodResult(**fields))
                remaining.remove(index)
                current = None
                deadline = time.monotonic() + method_timeout  # until the next one starts
            else:  # "fatal": a worker's own code broke outside a method
                failure = (
                    remaining[0] if current is None else current,
                    f"worker failed: {value.splitlines()[-1]}",
                )
                logger.error("a compare worker failed:\n%s", value)
                break
    finally:
        _stop(procs, graceful=failure is None)
    return failure


def compare(
    methods: list[str] | tuple[str, ...] = DEFAULT_METHODS,
    dataset: str = "digits",
    devices: int = 4,
    accelerator: str = "cpu",
    max_epochs: int | None = None,
    overrides: list[str] | None = None,
    config_dir: str | Path = CONFIG_DIR,
    method_timeout: float = 900.0,
    out_dir: str | Path = "runs/compare",
) -> list[MethodResult]:
    """Train every method on ``devices`` worker processes; return one result per method.

    Each method's full configuration is saved in ``out_dir/<method>/config.yaml``.
    """
    check_int("devices", devices, 1)
    if (
        isinstance(method_timeout, bool)
        or not isinstance(method_timeout, (int, float))
        or not method_timeout > 0
    ):
        raise ValueError(f"method_timeout must be a number of seconds > 0, got {method_timeout!r}")
    if accelerator not in ("cpu", "gpu", "cuda"):
        raise ValueError(f"accelerator must be one of ['cpu', 'gpu', 'cuda'], got {accelerator!r}")
    if accelerator != "cpu" and torch.cuda.device_count() < devices:
        raise ValueError(f"devices={devices} but only {torch.cuda.device_count()} CUDA devices are visible")
    config_paths = []
    for name in methods:
        path = Path(config_dir) / f"{dataset}_{name}.yaml"
        if not path.is_file():
            known = sorted(p.stem[len(dataset) + 1 :] for p in Path(config_dir).glob(f"{dataset}_*.yaml"))
            raise ValueError(
                f"methods: no config {path} for method {name!r}; methods of {dataset!r}: {known}"
            )
        config_paths.append(path)
    overrides = list(overrides or [])
    if max_epochs is not None:
        overrides += ["--trainer.max_epochs", str(max_epochs)]
    jobs = list(zip(range(len(methods)), methods, config_paths))
    done: dict[int, MethodResult] = {}

    def on_result(index: int, result: MethodResult) -> None:
        result.curve = [CurvePoint(*point) for point in result.curve]
        done[index] = result
        print(_progress_line(result), flush=True)

    # A method that hangs or kills a worker leaves the others stuck in a collective: the workers
    # are stopped, that method gets a failed row, and fresh workers train the methods after it.
    while len(done) < len(jobs):
        pending = [job for job in jobs if job[0] not in done]
        failure = _run_jobs(
            pending,
            devices,
            accelerator,
            overrides,
            Path(out_dir),
            method_timeout,
            max(method_timeout, STARTUP_TIMEOUT),
            on_result,
        )
        if failure is not None:
            index, reason = failure
            logger.error(
                "method %s failed: %s; restarting the workers for the methods after it",
                methods[index],
                reason,
            )
            on_result(index, MethodResult(methods[index], str(config_paths[index]), error=reason))
    return [done[index] for index in range(len(jobs))]


def _progress_line(r: MethodResult) -> str:
    if r.error:
        return f"{r.method}: FAILED ({r.error})"
    return (
        f"{r.method}: accuracy {r.accuracy:.4f}, {r.bytes_per_step:,.0f} bytes/step, "
        f"compression {r.compression_ratio:,.1f}x vs allreduce, {r.seconds:.1f} s"
    )


def format_table(results: list[MethodResult]) -> str:
    """A Markdown table of the results."""
    lines = [
        "| method | final accuracy | bytes sent / step / worker | compression vs allreduce | steps | train time (s) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        if r.error:
            lines.append(f"| {r.method} | failed: {r.error.splitlines()[0][:80]} | | | | |")
            continue
        lines.append(
            f"| {r.method} | {r.accuracy:.4f} | {r.bytes_per_step:,.0f} | {r.compression_ratio:,.1f}x | "
            f"{r.steps} | {r.seconds:.1f} |"
        )
    return "\n".join(lines)


def write_csv(results: list[MethodResult], path: Path) -> None:
    columns = [
        "method",
        "config",
        "accuracy",
        "bytes_per_step",
        "dense_bytes_per_step",
        "compression_ratio",
        "steps",
        "seconds",
        "error",
    ]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for r in results:
            writer.writerow(asdict(r))


def write_curves_csv(results: list[MethodResult], path: Path) -> None:
    """Every method's validations during training, one row each (the points the plot draws)."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["method", "epoch", "step", "accuracy", "bytes_sent"])
        for r in results:
            for point in r.curve:
                writer.writerow([r.method, point.epoch, point.step, point.accuracy, point.bytes_sent])


def spread_labels(heights: list[float], gap: float, low: float = 0.0, high: float = 1.0) -> list[float]:
    """Label heights as close as possible to ``heights``, each at least ``gap`` from the next.

    The order of the labels is the order of the heights, so a leader line from each label to its
    point never crosses another.  Heights and result are in the same units (axes fraction).
    """
    if gap * (len(heights) - 1) > high - low:
        raise ValueError(f"gap: {len(heights)} labels {gap:g} apart do not fit between {low:g} and {high:g}")
    order = sorted(range(len(heights)), key=lambda i: heights[i])
    placed = [min(max(heights[i], low), high) for i in order]
    for j in range(1, len(placed)):  # push up what sits too close above the one below
        placed[j] = max(placed[j], placed[j - 1] + gap)
    if placed and placed[-1] > high:  # then down from the top, if the column ran over it
        placed[-1] = high
        for j in range(len(placed) - 2, -1, -1):
            placed[j] = min(placed[j], placed[j + 1] - gap)
    out = [0.0] * len(heights)
    for j, i in enumerate(order):
        out[i] = placed[j]
    return out


def figure(results: list[MethodResult], title: str = ""):
    """The comparison figure (a matplotlib ``Figure``): see :func:`plot`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in results if not r.error]
    fig, (left, right) = plt.subplots(1, 2, figsize=(14, 6))
    colors = plt.get_cmap("tab20")
    points = []  # (method, color, marker, bytes per step, accuracy) of the right panel
    for i, r in enumerate(ok):
        color = colors((2 * i) % 20 + (2 * i) // 20)
        marker = "os^vDP*Xhp<>"[i % 12]
        if r.curve:
            sent, acc = zip(*[(max(p.bytes_sent, 1.0), p.accuracy) for p in r.curve])
            left.plot(sent, acc, marker=marker, color=color, label=r.method, markersize=4)
        if r.bytes_per_step > 0 and math.isfinite(r.bytes_per_step) and math.isfinite(r.accuracy):
            right.scatter([r.bytes_per_step], [r.accuracy], color=color, marker=marker, zorder=3)
            points.append((r.method, color, marker, r.bytes_per_step, r.accuracy))
    left.set_xscale("log")
    left.set_xlabel("bytes sent per worker so far")
    left.set_ylabel("validation accuracy")
    left.set_title("accuracy during training")
    left.grid(True, which="both", alpha=0.3)
    left.legend(fontsize=8)
    right.set_xscale("log")
    right.set_xlabel("bytes sent per worker per step")
    right.set_ylabel("final validation accuracy")
    right.set_title("final accuracy")
    right.grid(True, which="both", alpha=0.3)
    if points:
        # Methods of similar bytes and accuracy sit on top of each other: their names go in a column
        # beside the panel, in the order of their accuracy, each joined to its point by a line.
        right.margins(y=0.08)
        fig.canvas.draw()  # fixes the limits, so that points can be placed in axes fractions
        to_axes = right.transData + right.transAxes.inverted()
        heights = [float(to_axes.transform((x, y))[1]) for _, _, _, x, y in points]
        gap = min(0.05, 1.0 / max(len(points) - 1, 1))
        for (method, color, marker, x, y), height in zip(points, spread_labels(heights, gap)):
            right.annotate(
                "",
                xy=(x, y),
                xycoords="data",
                xytext=(1.04, height),
                textcoords="axes fraction",
                arrowprops={
                    "arrowstyle": "-",
                    "color": color,
                    "lw": 0.7,
                    "alpha": 0.6,
                    "shrinkA": 0,
                    "shrinkB": 4,
                },
            )
            right.scatter(
                [1.04],
                [height],
                transform=right.transAxes,
                color=color,
                marker=marker,
                s=22,
                clip_on=False,
                zorder=3,
            )
            right.annotate(method, xy=(1.07, height), xycoords="axes fraction", va="center", fontsize=8.5)
    if title:
        fig.suptitle(title)
    return fig


def plot(results: list[MethodResult], path: Path, title: str = "") -> None:
    """Accuracy against bytes sent: curves over the run (left), final points (right), as a PNG."""
    import matplotlib.pyplot as plt

    fig = figure(results, title)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def main(
    methods: list[str] | None = None,
    dataset: str = "digits",
    devices: int = 4,
    accelerator: str = "cpu",
    max_epochs: int | None = None,
    overrides: list[str] | None = None,
    out_dir: str = "runs/compare",
    method_timeout: float = 900.0,
    config_dir: str = str(CONFIG_DIR),
) -> list[MethodResult]:
    """Run the comparison, print the table, write it (Markdown, CSV) and the plot into ``out_dir``.

    Args:
        methods: config names without the data set prefix (default: every method in DEFAULT_METHODS).
        dataset: config prefix: ``digits`` (offline, 8x8 digits) or ``resnet20_cifar10``.
        devices: worker processes (CPU) or GPUs.
        accelerator: ``cpu`` (gloo) or ``gpu`` (NCCL).
        max_epochs: override every config's ``trainer.max_epochs``.
        overrides: more LightningCLI arguments for every method, e.g. ``["--trainer.max_steps", "20"]``.
        out_dir: output folder.
        method_timeout: seconds one method may take; a method that takes longer (or whose worker
            process dies) gets a failed row, and fresh workers train the methods after it.
        config_dir: the folder of the ``<dataset>_<method>.yaml`` configs.
    """
    started = time.perf_counter()
    results = compare(
        methods or DEFAULT_METHODS,
        dataset,
        devices,
        accelerator,
        max_epochs,
        overrides,
        config_dir=config_dir,
        method_timeout=method_timeout,
        out_dir=out_dir,
    )
    total = time.perf_counter() - started
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = format_table(results)
    header = f"{dataset}, {devices} {accelerator} workers; total wall time {total:.0f} s"
    with open(out / "results.md", "w") as f:
        f.write(f"{header}\n\n{table}\n")
    write_csv(results, out / "results.csv")
    write_curves_csv(results, out / "curves.csv")
    plot(results, out / "accuracy_vs_bytes.png", title=header)
    print(
        f"\n{header}\n\n{table}\n\nwritten: {out / 'results.md'}, {out / 'results.csv'}, "
        f"{out / 'curves.csv'}, {out / 'accuracy_vs_bytes.png'}",
        flush=True,
    )
    return results


if __name__ == "__main__":
    from jsonargparse import CLI

    CLI(main, as_positional=False)
