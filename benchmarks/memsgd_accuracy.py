"""Mem-SGD accuracy with SGD momentum: plain error feedback against momentum correction (DGC).

Two parts:

1. **Digits** (the main job's recipe: the 38k-parameter CNN, 4 gloo ranks, 12 epochs = 132
   steps, SGD lr 0.05 momentum 0.9 weight decay 5e-4, cosine schedule).  Every row trains once
   per seed through :func:`recipes.compare.compare`; the table gives the final validation
   accuracy's mean, standard deviation and minimum over the seeds, the mean accuracy after
   epochs 3, 6 and 9 (33, 66, 99 steps), and the bytes one worker sends per step (the
   strategies' own count, warm-up included).  Row names: ``<compressor>_<variant>`` with the
   variants ``ef`` (plain error feedback, SGD keeps its momentum: ``momentum_correction=False``),
   ``mc`` (momentum correction, the default), ``mc_masking`` (plus DGC's momentum factor
   masking, top-1% only), ``mc_warmup`` (plus DGC's density warm-up from 25% over 33 steps),
   ``mc_ramp`` / ``mc_ramp_run`` (a ramp from 6.25% over 66 / 132 steps), ``mc_ramp16`` and
   ``ef_ramp16`` (from 1.5625% over 66 steps, with and without momentum correction).  The
   decisions' rows: ``topk1_mc_wd_in_optimizer`` (weight decay left in the optimizer),
   ``ddp_nesterov`` / ``topk1_mc_nesterov`` and ``ddp_adam`` / ``topk1_adam`` (Adam, lr 0.003:
   plain error feedback).  Raw results per seed: ``<out_dir>/runs.json``.
2. **Logistic regression** (``--logreg``): the dense problem of ``recipes.memsgd_paper``
   (epsilon-like, 2,000 features) trained through the DDP hook on 4 gloo ranks, batch 8 per
   rank, constant step size (``--logreg_lrs``, default 2.0): SGD through DDP's allreduce, top-k
   1% with plain error feedback (the hook's momentum-free path, unchanged by momentum
   correction), and momentum 0.9 in the optimizer (allreduce) against momentum 0.9 in the hook
   (top-k 1%, with the L2 term in the hook as ``MemSGDStrategy`` puts it, and left in the
   optimizer for contrast).  Printed: ``f - f*`` per step size (with ``--logreg_seeds``, the
   mean and standard deviation over the seeds of the workers' sampling).

    python benchmarks/memsgd_accuracy.py                                   # every row, 3 seeds
    python benchmarks/memsgd_accuracy.py --rows ddp topk1_ef topk1_mc --seeds 0 1
    python benchmarks/memsgd_accuracy.py --rows none --logreg             # the regression check only
    python benchmarks/memsgd_accuracy.py --rows none --logreg --logreg_lrs 0.5 1 2
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch
import yaml

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

ROOT = Path(__file__).resolve().parents[1]
BASE_CONFIG = ROOT / "recipes" / "configs" / "digits_memsgd_topk1.yaml"
DDP_STRATEGY = {"class_path": "recipes.baselines.TorchHookDDPStrategy", "init_args": {"hook": "allreduce"}}
MEMSGD = "lightning_plugin.MemSGDStrategy"
COMPRESSORS = {
    "topk1": {"compressor": "topk", "density": 0.01},
    "topk01": {"compressor": "topk", "density": 0.001},
    "randk1": {"compressor": "randk", "density": 0.01},
    "sign": {"compressor": "sign"},
}
# DGC warms up over 4 of 164 epochs; a 132-step run ramps over its first 3 epochs (33 steps)
WARMUP_STEPS = 33
VARIANTS = {
    "ef": {"momentum_correction": False},
    "mc": {},
    "mc_masking": {"momentum_masking": True},
    "mc_warmup": {"density_warmup_steps": WARMUP_STEPS},
    # ramps that start lower and last longer: from 6.25% over the first half of the run (66
    # steps) and over the whole run; from 1.5625% over the first half (the digits recipe's
    # memsgd_topk1), also without momentum correction
    "mc_ramp": {"density_warmup_steps": 66, "density_warmup_start": 0.0625},
    "mc_ramp_run": {"density_warmup_steps": 132, "density_warmup_start": 0.0625},
    "mc_ramp16": {"density_warmup_steps": 66, "density_warmup_start": 0.015625},
    "ef_ramp16": {"momentum_correction": False, "density_warmup_steps": 66, "density_warmup_start": 0.015625},
    # each sent entry also carries its velocity's tail (masking that keeps the mass)
    "mc_tail": {"send_momentum_tail": True},
    "mc_ramp16_tail": {
        "send_momentum_tail": True,
        "density_warmup_steps": 66,
        "density_warmup_start": 0.015625,
    },
    "mc_ramp_tail": {"send_momentum_tail": True, "density_warmup_steps": 66, "density_warmup_start": 0.0625},
}
# the decisions' measurements: name -> (strategy, model overrides)
ADAM = {"optimizer": "adam", "lr": 0.003}
NESTEROV = {"nesterov": True}
# measurement of the weight-decay decision: the same strategy, weight decay left in the optimizer
WEIGHT_DECAY_IN_OPTIMIZER = "memsgd_accuracy.WeightDecayInOptimizer"
EPOCHS_SHOWN = (3, 6, 9)


def rows() -> dict[str, tuple[dict, dict]]:
    """Row name -> (the ``trainer.strategy`` of its config, overrides of its ``model``)."""
    out = {"ddp": (DDP_STRATEGY, {})}
    for name, compressor in COMPRESSORS.items():
        for variant, extra in VARIANTS.items():
            if (
                ("density_warmup_steps" in extra and "density" not in compressor)
                or (variant == "mc_masking" and name != "topk1")
                or ("ramp" in variant and "topk" not in name)
                or ("tail" in variant and "topk" not in name)
            ):
                continue  # the warm-up ramps a density (sign has none); masking is measured on top-1%, ramps on top-k
            out[f"{name}_{variant}"] = ({"class_path": MEMSGD, "init_args": {**compressor, **extra}}, {})
    topk1 = {"class_path": MEMSGD, "init_args": COMPRESSORS["topk1"]}
    out["topk1_mc_wd_in_optimizer"] = (
        {"class_path": WEIGHT_DECAY_IN_OPTIMIZER, "init_args": COMPRESSORS["topk1"]},
        {},
    )
    out["ddp_nesterov"] = (DDP_STRATEGY, NESTEROV)
    out["topk1_mc_nesterov"] = (topk1, NESTEROV)
    out["ddp_adam"] = (DDP_STRATEGY, ADAM)
    out["topk1_adam"] = (topk1, ADAM)  # the strategy keeps plain error feedback for Adam
    return out


def _weight_decay_in_optimizer():
    from lightning_plugin import MemSGDStrategy

    class WeightDecayInOptimizer(MemSGDStrategy):
        """Momentum correction with SGD's weight decay left in the optimizer (applied after aggregation)."""

        def setup_optimizers(self, trainer) -> None:
            super().setup_optimizers(trainer)
            if self.comm_state is not None and self.comm_state.momentum_correction is not None:
                decay = self.comm_state.momentum_correction.weight_decay
                self.comm_state.momentum_correction.weight_decay = 0.0
                for group in self.optimizers[0].param_groups:
                    group["weight_decay"] = decay

    return WeightDecayInOptimizer


if __name__ != "__main__":  # imported by the training workers, for the class_path above
    WeightDecayInOptimizer = _weight_decay_in_optimizer()


def write_configs(names: list[str], directory: Path) -> None:
    base = yaml.safe_load(BASE_CONFIG.read_text())
    for name in names:
        strategy, model = rows()[name]
        config = {
            **base,
            "trainer": {**base["trainer"], "strategy": strategy},
            "model": {**base["model"], **model},
        }
        (directory / f"digits_{name}.yaml").write_text(yaml.safe_dump(config))


def run_digits(
    names: list[str], seeds: list[int], devices: int, out_dir: Path, configs_writer=None
) -> dict[str, list]:
    """Train each row on each seed through ``recipes.compare``; ``configs_writer(names, folder)``
    writes the rows' configs (this module's :func:`write_configs` by default)."""
    from recipes.compare import compare

    results: dict[str, list] = {name: [] for name in names}
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        (configs_writer or write_configs)(names, Path(tmp))
        for seed in seeds:
            for r in compare(
                names,
                "digits",
                devices,
                overrides=["--seed_everything", str(seed)],
                config_dir=tmp,
                out_dir=out_dir / f"seed{seed}",
            ):
                if r.error:
                    raise RuntimeError(f"{r.method} (seed {seed}) failed: {r.error}")
                results[r.method].append(r)
            with open(out_dir / "runs.json", "w") as f:
                json.dump({name: [asdict(r) for r in runs] for name, runs in results.items()}, f)
    return results


def _fmt(values: list[float]) -> tuple[str, str, str]:
    mean = statistics.fmean(values)
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.4f}", f"{spread:.4f}", f"{min(values):.4f}"


def digits_table(results: dict[str, list]) -> str:
    lines = [
        "| row | final acc. mean | std | min | "
        + " | ".join(f"acc. epoch {e}" for e in EPOCHS_SHOWN)
        + " | bytes / step / worker |",
        "|---|---:|---:|---:|" + "---:|" * len(EPOCHS_SHOWN) + "---:|",
    ]
    for name, runs in results.items():
        mean, spread, low = _fmt([r.accuracy for r in runs])
        at = []
        for epoch in EPOCHS_SHOWN:
            accs = [r.curve[epoch - 1][1] for r in runs if len(r.curve) >= epoch]
            at.append(f"{statistics.fmean(accs):.4f}" if accs else "")
        per_step = statistics.fmean(r.bytes_per_step for r in runs)
        lines.append(f"| {name} | {mean} | {spread} | {low} | " + " | ".join(at) + f" | {per_step:,.0f} |")
    return "\n".join(lines)


# ------------------------------------------------------------------ logistic regression through the hook

LOGREG_METHODS = {
    # name: (compressor or None for allreduce, optimizer momentum, hook momentum, where the
    # L2 term goes: "optimizer", "hook", or "hook+tail": the hook, which also sends the momentum tails)
    "SGD, allreduce": (None, 0.0, 0.0, "optimizer"),
    "top-k 1%, error feedback": ("topk", 0.0, 0.0, "optimizer"),
    "SGD momentum 0.9, allreduce": (None, 0.9, 0.0, "optimizer"),
    # what MemSGDStrategy does with SGD(momentum=0.9, weight_decay=lam)
    "top-k 1%, momentum 0.9 and weight decay in the hook": ("topk", 0.0, 0.9, "hook"),
    # the same with send_momentum_tail=True (the digits recipe's memsgd_topk1)
    "top-k 1%, momentum 0.9 and weight decay in the hook, tails sent": ("topk", 0.0, 0.9, "hook+tail"),
    # the L2 term left in the optimizer: not amplified by 1 / (1 - mu) like the gradient, so the
    # run heads for the optimum of a 10 times weaker regularizer
    "top-k 1%, momentum 0.9 in the hook, weight decay in SGD": ("topk", 0.0, 0.9, "optimizer"),
    "top-k 1%, error feedback, momentum 0.9 in SGD": ("topk", 0.9, 0.0, "optimizer"),
}


def _logreg_worker(rank, world_size, port, steps, lr, batch, seed, queue):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    import ec_hooks
    from recipes.memsgd_paper import dense_problem

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        problem = dense_problem(n=4000, d=2000, seed=0)
        lam = 1.0 / problem.n
        features, labels = problem.features.float(), problem.labels.float()
        out = {}
        for name, (compressor, optimizer_momentum, hook_momentum, decay_in) in LOGREG_METHODS.items():
            model = torch.nn.Linear(problem.d, 1, bias=False)
            torch.nn.init.zeros_(model.weight)
            ddp = DDP(model)
            if compressor is not None:
                state = ec_hooks.ErrorFeedbackState(
                    compressor=ec_hooks.TopK(0.01),
                    module=ddp,
                    momentum=hook_momentum,
                    weight_decay=lam if decay_in.startswith("hook") else 0.0,
                    send_momentum_tail=decay_in == "hook+tail",
                )
                ddp.register_comm_hook(state, ec_hooks.error_feedback_hook)
            opt = torch.optim.SGD(
                ddp.parameters(),
                lr=lr,
                momentum=optimizer_momentum,
                weight_decay=0.0 if decay_in.startswith("hook") else lam,
            )
            g = torch.Generator().manual_seed(seed * world_size + rank)
            for _ in range(steps):
                idx = torch.randint(problem.n, (batch,), generator=g)
                margins = labels[idx] * ddp(features[idx]).squeeze(1)
                opt.zero_grad()
                torch.nn.functional.softplus(-margins).mean().backward()
                opt.step()
            w = model.weight.detach().double()
            out[name] = float(problem.loss(w, lam))
        if rank == 0:
            from recipes.memsgd_paper import optimum

            out["f*"] = optimum(problem, lam)
            queue.put(out)
    finally:
        dist.destroy_process_group()


def run_logreg(
    world_size: int = 4, steps: int = 600, lr: float = 2.0, batch: int = 8, seed: int = 0
) -> dict[str, float]:
    import torch.multiprocessing as mp

    from recipes.compare import _free_port

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [
        ctx.Process(target=_logreg_worker, args=(r, world_size, port, steps, lr, batch, seed, queue))
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    try:
        return queue.get(timeout=900)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--rows",
        nargs="+",
        default=list(rows()),
        help=f"digits rows ('none' for no digits run); default: all of {list(rows())}",
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--devices", type=int, default=4)
    parser.add_argument("--logreg", action="store_true", help="also run the logistic-regression check")
    parser.add_argument(
        "--logreg_lrs",
        nargs="+",
        type=float,
        default=[2.0],
        help="step sizes of the logistic-regression check (one column each; default 2.0)",
    )
    parser.add_argument(
        "--logreg_seeds",
        nargs="+",
        type=int,
        default=[0],
        help="seeds of the workers' sampling in the logistic-regression check (default 0)",
    )
    parser.add_argument("--out_dir", default="runs/memsgd_accuracy")
    args = parser.parse_args()
    names = [] if args.rows == ["none"] else args.rows
    unknown = sorted(set(names) - set(rows()))
    if unknown:
        parser.error(f"--rows: unknown {unknown}; rows: {list(rows())}")
    started = time.perf_counter()
    if names:
        table = digits_table(run_digits(names, args.seeds, args.devices, Path(args.out_dir)))
        print(
            f"\ndigits, {args.devices} gloo ranks, seeds {args.seeds}, 132 steps "
            f"({time.perf_counter() - started:.0f} s)\n\n{table}\n",
            flush=True,
        )
    if args.logreg:
        # by_lr[i][name]: f per seed at args.logreg_lrs[i]
        by_lr = [[run_logreg(lr=lr, seed=seed) for seed in args.logreg_seeds] for lr in args.logreg_lrs]
        f_star = by_lr[0][0]["f*"]
        print(
            "logistic regression (dense, n=4,000, d=2,000), 4 gloo ranks, batch 8 per rank, 600 steps; "
            f"f* = {f_star:.5f}; f - f* at each step size, seeds {args.logreg_seeds}\n\n| method | "
            + " | ".join(f"lr {lr:g}" for lr in args.logreg_lrs)
            + " |\n|---|"
            + "---:|" * len(args.logreg_lrs)
        )
        for name in LOGREG_METHODS:
            print(
                f"| {name} | "
                + " | ".join(_logreg_cell([r[name] - f_star for r in runs]) for runs in by_lr)
                + " |"
            )


def _logreg_cell(gaps: list[float]) -> str:
    if not all(math.isfinite(g) for g in gaps):
        return "diverged"
    if len(gaps) == 1:
        return f"{gaps[0]:.5f}"
    return f"{statistics.fmean(gaps):.5f} ± {statistics.stdev(gaps):.5f}"


if __name__ == "__main__":
    main()
