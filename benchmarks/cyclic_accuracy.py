"""Shared-index (cyclic) top-k against allgathered top-k on the main job's recipe, over seeds.

The digits recipe of ``python -m recipes.compare`` (38k-parameter CNN, 4 gloo ranks, 132 steps,
SGD lr 0.05 momentum 0.9 weight decay 5e-4, cosine).  Each row is a ``MemSGDStrategy`` setting;
every row trains once per seed through :func:`recipes.compare.compare`, and the table (the one of
``benchmarks/memsgd_accuracy.py``) gives the final validation accuracy's mean, standard deviation
and minimum over the seeds, the mean accuracy after epochs 3, 6 and 9, and the bytes one worker
hands to the collectives per step.  Raw results: ``<out_dir>/runs.json``.

    python benchmarks/cyclic_accuracy.py                                  # every row, seeds 0 1 2
    python benchmarks/cyclic_accuracy.py --rows topk1 cyclic1 --seeds 0
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from memsgd_accuracy import BASE_CONFIG, MEMSGD, digits_table, run_digits  # noqa: E402


def _cyclic(class_path: str = "ec_hooks.CyclicTopK", **init_args) -> dict:
    return {"class_path": class_path, "init_args": {"density": 0.01, **init_args}}


def _oracle_class():
    import torch.distributed as dist

    from ec_hooks import CyclicTopK

    class GlobalIndexOracle(CyclicTopK):
        """A diagnosis, not a method: the leader selects from the mean of every worker's
        compensated buffer (a dense allreduce, uncounted), i.e. the best ``k`` indices any
        shared-index scheme could pick.  It separates what the leader's local view costs from
        what applying ``k`` entries per step (against the allgather's up to ``n k``) costs."""

        def compress_error_feedback_(self, memory, grad, **kwargs):
            out = super().compress_error_feedback_(memory, grad, **kwargs)
            self._global = memory.clone()
            dist.all_reduce(self._global)
            return out

        def select(self, x):
            return super().select(self._global.view_as(x))

    return GlobalIndexOracle


def _history_class():
    import torch
    import torch.distributed as dist

    from ec_hooks import CyclicTopK

    class HistoryInformedCyclicTopK(CyclicTopK):
        """Prototype: the leader scores coordinate j by its own compensated value plus the other
        workers' expected memories, ``(n - 1) r_j (t - s_j)``, where ``s_j`` is the step j was
        last sent (every worker's memory was cleared there) and ``r_j`` the global mean rate
        seen then (the aggregate over the steps it waited).  No extra bytes: every rank sees
        the aggregates.  One bucket per model assumed (prototype)."""

        def compress_error_feedback_(self, memory, grad, *, step=0, key=0, **kwargs):
            self._step = step
            if not hasattr(self, "_rate"):
                self._rate = torch.zeros(memory.numel(), dtype=torch.float32)
                self._last = torch.full((memory.numel(),), -1.0)
            return super().compress_error_feedback_(memory, grad, step=step, key=key, **kwargs)

        def select(self, x):
            n = dist.get_world_size()
            others = self._rate * (self._step - self._last) * (n - 1)
            return super().select(x.reshape(-1) + others)

        def decompress(self, payload):
            out = super().decompress(payload)
            if hasattr(self, "_rate") and payload.numel == self._rate.numel():
                idx = payload.indices.unique()
                self._rate[idx] = out.reshape(-1)[idx] / (self._step - self._last[idx])
                self._last[idx] = float(self._step)
            return out

    return HistoryInformedCyclicTopK


def _sparse_strategy():
    from ec_hooks.transport import SparseAllreduce
    from lightning_plugin import MemSGDStrategy

    class WithSparseAllreduce(MemSGDStrategy):
        """Top-k with the opt-in sparse allreduce among the transports (chosen by bytes)."""

        def _register_ddp_hooks(self) -> None:
            super()._register_ddp_hooks()
            if self.comm_state is not None:
                self.comm_state.transports += (SparseAllreduce(),)

    return WithSparseAllreduce


def _first_phase_strategy():
    import copy

    import ec_hooks
    from lightning_plugin import MemSGDStrategy

    class FirstPhase(MemSGDStrategy):
        """Prototype of a warm start: for the first ``first_steps`` steps another compressor,
        then the configured one; the memories carry over.  ``first_private``: ordinary
        (allgathered) top-k; ``first_density``: that density (default: the compressor's)."""

        def __init__(
            self,
            first_steps: int = 33,
            first_density: float | None = None,
            first_private: bool = False,
            **kwargs,
        ):
            super().__init__(**kwargs)
            self.first_steps, self.first_density, self.first_private = (
                first_steps,
                first_density,
                first_private,
            )

        def _register_ddp_hooks(self) -> None:
            super()._register_ddp_hooks()
            state = self.comm_state
            if state is None:
                return
            density = self.first_density or state.compressor.density
            if self.first_private:
                first = ec_hooks.TopK(density)
            else:
                first = copy.copy(state.compressor)
                first.density = density
            later = state._compressor_now
            state._compressor_now = lambda: first if state.iteration < self.first_steps else later()

    return FirstPhase


if __name__ != "__main__":  # imported by the training workers, for the class_paths below
    GlobalIndexOracle = _oracle_class()
    WithSparseAllreduce = _sparse_strategy()
    HistoryInformedCyclicTopK = _history_class()
    FirstPhase = _first_phase_strategy()


RAMP16 = {"density_warmup_steps": 66, "density_warmup_start": 0.015625}
MC_TAIL = {"momentum_correction": True, "send_momentum_tail": True}

#: row name -> init_args of MemSGDStrategy, or (strategy class_path, init_args)
ROWS: dict[str, dict] = {
    "topk1": {"compressor": "topk", "density": 0.01},
    "topk1_ef": {"compressor": "topk", "density": 0.01, "momentum_correction": False},
    "cyclic1": {"compressor": "cyclic_topk", "density": 0.01},  # the strategy's default
    "cyclic1_mc": {"compressor": "cyclic_topk", "density": 0.01, "momentum_correction": True},
    "cyclic1_ef": {"compressor": "cyclic_topk", "density": 0.01, "momentum_correction": False},
    "cyclic1_mc_masking": {
        "compressor": "cyclic_topk",
        "density": 0.01,
        "momentum_correction": True,
        "momentum_masking": True,
    },
    "cyclic1_mc_filter0.9": {"compressor": _cyclic(memory_filter=0.9), "momentum_correction": True},
    "cyclic1_ef_filter0.9": {"compressor": _cyclic(memory_filter=0.9), "momentum_correction": False},
    "cyclic2_mc": {"compressor": "cyclic_topk", "density": 0.02, "momentum_correction": True},
    "cyclic2_ef": {"compressor": "cyclic_topk", "density": 0.02, "momentum_correction": False},
    "cyclic2_bf16": {"compressor": _cyclic(density=0.02, value_dtype="bf16")},
    "cyclic1_history_mc": {
        "compressor": _cyclic("cyclic_accuracy.HistoryInformedCyclicTopK"),
        "momentum_correction": True,
    },
    "cyclic1_history_ef": {
        "compressor": _cyclic("cyclic_accuracy.HistoryInformedCyclicTopK"),
        "momentum_correction": False,
    },
    "cyclic1_global_oracle_mc": {
        "compressor": _cyclic("cyclic_accuracy.GlobalIndexOracle"),
        "momentum_correction": True,
    },
    "cyclic1_global_oracle_ef": {
        "compressor": _cyclic("cyclic_accuracy.GlobalIndexOracle"),
        "momentum_correction": False,
    },
    "cyclic1_ef_private33": (
        "cyclic_accuracy.FirstPhase",
        {"first_private": True, "compressor": "cyclic_topk", "density": 0.01, "momentum_correction": False},
    ),
    "cyclic1_mc_private33": (
        "cyclic_accuracy.FirstPhase",
        {"first_private": True, "compressor": "cyclic_topk", "density": 0.01, "momentum_correction": True},
    ),
    # the density warm-up of the topk1 recipe (1.5625% for the first half of the run, then 1%)
    "topk1_ramp66": (
        "cyclic_accuracy.FirstPhase",
        {"first_steps": 66, "first_density": 0.015625, "compressor": "topk", "density": 0.01},
    ),
    "cyclic1_ef_ramp66": (
        "cyclic_accuracy.FirstPhase",
        {"first_steps": 66, "first_density": 0.015625, "compressor": "cyclic_topk", "density": 0.01},
    ),
    # the recipes' density warm-up (MemSGDStrategy's density_warmup_*: 1.5625% for 66 steps, then 1%)
    "topk1_ramp16": {"compressor": "topk", "density": 0.01, **RAMP16},
    "cyclic1_ramp16": {"compressor": "cyclic_topk", "density": 0.01, **RAMP16},
    # shared-index variants with the same ramp shape (1.5625 x the density for 66 steps); "candidates":
    # indices chosen from the summed values of every worker's nominations (selection="candidates")
    "cyclic2_ramp16": {
        "compressor": "cyclic_topk",
        "density": 0.02,
        "density_warmup_steps": 66,
        "density_warmup_start": 0.03125,
    },
    "cyclic1_candidates_ramp16": {"compressor": _cyclic(selection="candidates"), **RAMP16},
    "cyclic1_candidates_ramp16_mc": {
        "compressor": _cyclic(selection="candidates"),
        **RAMP16,
        "momentum_correction": True,
    },
    "cyclic1_candidates3_ramp16": {"compressor": _cyclic(selection="candidates", candidates=3.0), **RAMP16},
    "cyclic1_candidates_bf16_ramp16": {
        "compressor": _cyclic(selection="candidates", value_dtype="bf16"),
        **RAMP16,
    },
    "cyclic1_candidates3_bf16_ramp16": {
        "compressor": _cyclic(selection="candidates", candidates=3.0, value_dtype="bf16"),
        **RAMP16,
    },
    "cyclic15_candidates_bf16_ramp": {
        "compressor": _cyclic(density=0.015, selection="candidates", value_dtype="bf16"),
        "density_warmup_steps": 66,
        "density_warmup_start": 0.0234375,
    },
    "cyclic15_candidates_bf16_ramp_mc": {
        "compressor": _cyclic(density=0.015, selection="candidates", value_dtype="bf16"),
        "density_warmup_steps": 66,
        "density_warmup_start": 0.0234375,
        "momentum_correction": True,
    },
    "cyclic2_candidates1.5_bf16_ramp": {
        "compressor": _cyclic(density=0.02, selection="candidates", candidates=1.5, value_dtype="bf16"),
        "density_warmup_steps": 66,
        "density_warmup_start": 0.03125,
    },
    "cyclic2_candidates_bf16_ramp": {
        "compressor": _cyclic(density=0.02, selection="candidates", value_dtype="bf16"),
        "density_warmup_steps": 66,
        "density_warmup_start": 0.03125,
    },
    "cyclic1_global_oracle_ramp16": {"compressor": _cyclic("cyclic_accuracy.GlobalIndexOracle"), **RAMP16},
    "cyclic2_bf16_ramp": {
        "compressor": _cyclic(density=0.02, value_dtype="bf16"),
        "density_warmup_steps": 66,
        "density_warmup_start": 0.03125,
    },
    "cyclic3_bf16_ramp": {
        "compressor": _cyclic(density=0.03, value_dtype="bf16"),
        "density_warmup_steps": 66,
        "density_warmup_start": 0.046875,
    },
    # momentum correction with the tails sent (send_momentum_tail): each shared entry also carries
    # mu / (1 - mu) u, and the velocity is cleared there, so it no longer refills the memories
    "cyclic2_bf16_ramp_mc_tail": {
        "compressor": _cyclic(density=0.02, value_dtype="bf16"),
        "density_warmup_steps": 66,
        "density_warmup_start": 0.03125,
        **MC_TAIL,
    },
    "cyclic2_bf16_ramp_mc": {
        "compressor": _cyclic(density=0.02, value_dtype="bf16"),
        "density_warmup_steps": 66,
        "density_warmup_start": 0.03125,
        "momentum_correction": True,
    },
    "cyclic1_ramp_mc": {"compressor": "cyclic_topk", "density": 0.01, **RAMP16, "momentum_correction": True},
    "cyclic1_ramp_mc_tail": {"compressor": "cyclic_topk", "density": 0.01, **RAMP16, **MC_TAIL},
    "cyclic1_candidates_ramp16_mc_tail": {"compressor": _cyclic(selection="candidates"), **RAMP16, **MC_TAIL},
    "cyclic15_candidates_bf16_ramp_mc_tail": {
        "compressor": _cyclic(density=0.015, selection="candidates", value_dtype="bf16"),
        "density_warmup_steps": 66,
        "density_warmup_start": 0.0234375,
        **MC_TAIL,
    },
    "topk1_sparse_allreduce": (
        "cyclic_accuracy.WithSparseAllreduce",
        {"compressor": "topk", "density": 0.01},
    ),
}


def write_configs(names: list[str], directory: Path) -> None:
    base = yaml.safe_load(BASE_CONFIG.read_text())
    for name in names:
        class_path, init_args = ROWS[name] if isinstance(ROWS[name], tuple) else (MEMSGD, ROWS[name])
        strategy = {"class_path": class_path, "init_args": init_args}
        config = {**base, "trainer": {**base["trainer"], "strategy": strategy}}
        (directory / f"digits_{name}.yaml").write_text(yaml.safe_dump(config))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", nargs="+", default=list(ROWS), help=f"rows; default: all of {list(ROWS)}")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--devices", type=int, default=4)
    parser.add_argument("--out_dir", default="runs/cyclic_accuracy")
    args = parser.parse_args()
    unknown = sorted(set(args.rows) - set(ROWS))
    if unknown:
        parser.error(f"--rows: unknown {unknown}; rows: {list(ROWS)}")
    started = time.perf_counter()
    table = digits_table(run_digits(args.rows, args.seeds, args.devices, Path(args.out_dir), write_configs))
    print(
        f"\ndigits, {args.devices} gloo ranks, seeds {args.seeds}, 132 steps "
        f"({time.perf_counter() - started:.0f} s)\n\n{table}\n",
        flush=True,
    )


if __name__ == "__main__":
    main()
