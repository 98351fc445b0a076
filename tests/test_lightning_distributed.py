"""Multi-process Lightning runs of the strategies, on CPU (gloo), in real processes.

This file is also the training script.  Each test session runs it a few times as
``python tests/test_lightning_distributed.py OUT DEVICES SCENARIO...``; Lightning's launcher
re-executes it on the other ranks (``devices=2`` or ``3``), exactly as a user's script would be,
and every rank runs the scenarios one after another in the same process group.  Rank 0 writes
each scenario's results (per-rank figures gathered with ``all_gather_object``) to
``OUT/SCENARIO.pt``; the tests read them.  Scenarios are grouped so that few processes are
started (each start imports Lightning, which dominates the wall time).
"""

from __future__ import annotations

import atexit
import glob
import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

# Every test here trains with Lightning in launched processes.
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the script is run by path, from any directory
    sys.path.insert(0, str(ROOT))

SAMPLES, FEATURES, CLASSES, BATCH = 192, 16, 4, 16


# ---------------------------------------------------------------------------------------------
# The training side (runs inside the launched processes)
# ---------------------------------------------------------------------------------------------


def make_data():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(SAMPLES, FEATURES, generator=generator)
    teacher = torch.randn(FEATURES, CLASSES, generator=generator)
    y = (x @ teacher).argmax(dim=1)
    return x, y


def build_module(seed: int = 0, lr: float = 0.1, optimizer: str = "sgd"):
    import lightning as L

    class TinyClassifier(L.LightningModule):
        """16 -> 64 -> BatchNorm -> 64 -> 4, about 5.5k parameters; SGD with momentum."""

        def __init__(self, seed: int = 0, lr: float = 0.1, optimizer: str = "sgd") -> None:
            super().__init__()
            self.save_hyperparameters()
            generator_state = torch.random.get_rng_state()
            torch.manual_seed(seed)
            self.net = nn.Sequential(
                nn.Linear(FEATURES, 64),
                nn.BatchNorm1d(64),
                nn.ReLU(),
                nn.Linear(64, 64),
                nn.ReLU(),
                nn.Linear(64, CLASSES),
            )
            torch.random.set_rng_state(generator_state)
            self.lr = lr
            self.records: dict[str, list] = {
                "train_start": [],
                "val": [],
                "local_before_val": [],
                "local_after_val": [],
            }
            self._after_val = False

        def forward(self, x):
            return self.net(x)

        def flat(self):
            return torch.cat([p.detach().reshape(-1).cpu() for p in self.parameters()])

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = F.cross_entropy(self(x), y)
            self.log("train_loss", loss, on_step=True, on_epoch=False)
            return loss

        def validation_step(self, batch, batch_idx):
            x, y = batch
            if batch_idx == 0:
                self.records["val"].append(self.flat())
            self.log("val_loss", F.cross_entropy(self(x), y), sync_dist=True)

        def on_train_start(self):
            self.records["train_start"].append(self.flat())

        # Module hooks run before the strategy's: here the local model is still in place.
        def on_validation_start(self):
            if self.trainer.training or self.trainer.state.fn == "fit":
                self.records["local_before_val"].append(self.flat())
                self._after_val = True

        def on_train_batch_start(self, batch, batch_idx):
            if self._after_val:
                self.records["local_after_val"].append(self.flat())
            self._after_val = False

        def configure_optimizers(self):
            if self.hparams.optimizer == "adam":
                return torch.optim.Adam(self.parameters(), lr=self.lr / 10)
            return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9, weight_decay=1e-4)

    return TinyClassifier(seed=seed, lr=lr, optimizer=optimizer)


def loaders(val: bool = True):
    from torch.utils.data import DataLoader, TensorDataset

    x, y = make_data()
    train = DataLoader(TensorDataset(x, y), batch_size=BATCH, shuffle=True)
    if not val:
        return train, None
    return train, DataLoader(TensorDataset(x[:64], y[:64]), batch_size=32)


def full_loss(module) -> float:
    x, y = make_data()
    module.eval()
    with torch.no_grad():
        return float(F.cross_entropy(module(x), y))


def rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_initialized() else 0


def gather(obj):
    import torch.distributed as dist

    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def trainer_for(out: Path, name: str, devices: int, strategy, max_epochs: int, **kwargs):
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger

    callbacks = kwargs.pop("callbacks", [])
    if kwargs.pop("checkpoints", False):
        callbacks.append(ModelCheckpoint(dirpath=out / name / "ckpt", filename="{epoch}", save_top_k=-1))
    loggers = kwargs.pop("loggers", None)
    if loggers is None:
        loggers = [CSVLogger(out / name, name="csv", version=0)]
    return L.Trainer(
        accelerator=kwargs.pop("accelerator", "cpu"),
        devices=devices,
        strategy=strategy,
        max_epochs=max_epochs,
        logger=loggers,
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=kwargs.pop("num_sanity_val_steps", 0),
        deterministic=True,
        **kwargs,
    )


def strategy_state(trainer) -> dict:
    """Per-rank figures of a finished fit."""
    strategy = trainer.strategy
    out = {"global_step": trainer.global_step}
    if getattr(strategy, "comm_state", None) is not None:
        out["hook_iteration"] = strategy.comm_state.iteration
        correction = strategy.comm_state.momentum_correction
        out["momentum_correction"] = None if correction is None else correction.config()
        warmup = strategy.comm_state.density_warmup
        out["density_warmup"] = [warmup.steps, warmup.start]
        out["stats"] = strategy.comm_state.stats.as_dict()
        out["memory_norm"] = strategy.comm_state.memory.norm()
    gossips = getattr(strategy, "gossips", None)
    if gossips:
        out["gossip_iteration"] = gossips[0].iteration
        out["stats"] = gossips[0].stats.as_dict()
    return out


def save(out: Path, name: str, result) -> None:
    if rank() == 0:
        torch.save(result, out / f"{name}.pt")


def fit_record(out, name, devices, strategy, max_epochs, ckpt_path=None, val=True, optimizer="sgd", **kwargs):
    # different on every rank: the strategy must broadcast
    module = build_module(seed=1000 + rank(), optimizer=optimizer)
    trainer = trainer_for(out, name, devices, strategy, max_epochs, **kwargs)
    train, valid = loaders(val)
    started = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, train, valid, ckpt_path=ckpt_path)
    seconds = time.perf_counter() - started
    from lightning_plugin import CompressionMonitor

    # What the monitor would log now, on every rank (a collective, like the logging itself).
    monitor = (
        CompressionMonitor().collect(trainer.strategy, module.device)
        if hasattr(trainer.strategy, "comm_stats")
        else None
    )
    per_rank = gather(
        {
            "final": module.flat(),
            "monitor": monitor,
            "records": module.records,
            "strategy": strategy_state(trainer),
            "warnings": [str(w.message) for w in caught],
            "optimizer_groups": [
                {k: v for k, v in g.items() if k != "params"} for g in trainer.optimizers[0].param_groups
            ],
            "gradient_clip_val": trainer.gradient_clip_val,
        }
    )
    return {"ranks": per_rank, "loss": full_loss(module), "seconds": seconds, "trainer": trainer}


def scenario_baseline(out: Path, devices: int) -> None:
    import lightning_plugin

    result = fit_record(
        out, "ddp", devices, "ddp", 4, checkpoints=True, callbacks=[lightning_plugin.CompressionMonitor()]
    )
    result.pop("trainer")
    save(out, "ddp", result)


def _fit_and_resume(
    out: Path, devices: int, name: str, make_strategy, loggers=None, epochs=4, **kwargs
) -> None:
    from lightning.pytorch.loggers import WandbLogger

    import lightning_plugin

    full = fit_record(
        out,
        f"{name}_full",
        devices,
        make_strategy(),
        epochs,
        checkpoints=True,
        loggers=loggers,
        callbacks=[lightning_plugin.CompressionMonitor()],
        log_every_n_steps=2,
        **kwargs,
    )
    trainer = full.pop("trainer")
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger) and rank() == 0:
            logger.experiment.finish()  # writes the run summary now rather than at exit
    save(out, f"{name}_full", full)
    ckpt = out / f"{name}_full" / "ckpt" / f"epoch={epochs // 2 - 1}.ckpt"
    resumed = fit_record(
        out,
        f"{name}_resume",
        devices,
        make_strategy(),
        epochs,
        ckpt_path=str(ckpt),
        checkpoints=True,
        **kwargs,
    )
    resumed.pop("trainer")
    save(out, f"{name}_resume", resumed)


def scenario_memsgd(out: Path, devices: int) -> None:
    _fit_and_resume(out, devices, "memsgd", lambda: "memsgd")


def scenario_deepsqueeze(out: Path, devices: int) -> None:
    from lightning.pytorch.loggers import CSVLogger, WandbLogger

    loggers = [CSVLogger(out / "deepsqueeze_full", name="csv", version=0)]
    if os.environ.get("EC_HOOKS_TEST_WANDB") == "1":
        loggers.append(
            WandbLogger(
                offline=True, save_dir=str(out / "wandb"), project="ec-hooks-tests", name="deepsqueeze"
            )
        )
    _fit_and_resume(out, devices, "deepsqueeze", lambda: "deepsqueeze", loggers=loggers)


class StepRecorder:
    """Records the global steps at which ``optimizer.step()`` really ran (a GradScaler may skip it)."""

    def __new__(cls):
        import lightning as L

        class _StepRecorder(L.Callback):
            def __init__(self):
                self.stepped: list[int] = []

            def on_train_start(self, trainer, pl_module):
                trainer.optimizers[0].register_step_post_hook(
                    lambda *_: self.stepped.append(trainer.global_step)
                )

        return _StepRecorder()


class MemoryRecorder:
    """Records, per batch, the Mem-SGD memories and the loss scale before and after the batch."""

    def __new__(cls):
        import lightning as L

        class _MemoryRecorder(L.Callback):
            def __init__(self):
                self.batches: list[dict] = []

            @staticmethod
            def _memory(trainer):
                memories = trainer.strategy.comm_state.memory.state_dict()
                velocities = trainer.strategy.comm_state.momentum_correction.velocity.state_dict()
                # velocities are in loss-scaled units too (the optimizer's momentum moved into the hook)
                memories.update({f"velocity.{k}": v for k, v in velocities.items()})
                return torch.cat([memories[k].reshape(-1) for k in sorted(memories)]) if memories else None

            def on_train_start(self, trainer, pl_module):
                trainer.optimizers[0].register_step_post_hook(
                    lambda *_: self.batches[-1].update(stepped=True)
                )

            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                scale = trainer.precision_plugin.scaler.get_scale()
                self.batches.append(
                    {"memory_before": self._memory(trainer), "scale_before": scale, "stepped": False}
                )

            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                self.batches[-1].update(
                    memory_after=self._memory(trainer),
                    scale_after=trainer.precision_plugin.scaler.get_scale(),
                )

        return _MemoryRecorder()


def scenario_variants(out: Path, devices: int) -> None:
    """bf16-mixed, gradient accumulation, fp16 with a GradScaler that skips steps; one epoch each."""
    from lightning.pytorch.plugins.precision import MixedPrecision

    for strategy in ("memsgd", "deepsqueeze"):
        for name, kwargs in (
            ("bf16", {"precision": "bf16-mixed"}),
            ("accumulate", {"accumulate_grad_batches": 2}),
        ):
            result = fit_record(out, f"{strategy}_{name}", devices, strategy, 1, val=False, **kwargs)
            result.pop("trainer")
            save(out, f"{strategy}_{name}", result)
    # Momentum correction: moved with clipping, turned off, and left alone for Adam.
    from lightning_plugin import MemSGDStrategy

    for name, make, kwargs in (
        # the momentum tails option reaches the hook with the moved settings
        ("memsgd_clip", lambda: MemSGDStrategy(send_momentum_tail=True), {"gradient_clip_val": 0.5}),
        (
            "memsgd_nocorr",
            lambda: MemSGDStrategy(
                momentum_correction=False, density_warmup_steps=2, density_warmup_start=0.0625
            ),
            {"gradient_clip_val": 0.5},
        ),
        ("memsgd_adam", MemSGDStrategy, {"optimizer": "adam"}),
    ):
        result = fit_record(out, name, devices, make(), 1, val=False, **kwargs)
        result.pop("trainer")
        save(out, name, result)
    # A huge initial scale: the first steps overflow in fp16 and the GradScaler skips them.
    recorder = StepRecorder()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**22)
    result = fit_record(
        out,
        "deepsqueeze_fp16",
        devices,
        "deepsqueeze",
        1,
        val=False,
        callbacks=[recorder],
        plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)],
    )
    result.pop("trainer")
    result["stepped"] = gather(recorder.stepped)
    save(out, "deepsqueeze_fp16", result)
    # The scale doubles after every good step until fp16 overflows, then halves: the memories
    # must follow it.
    recorder = MemoryRecorder()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1)
    result = fit_record(
        out,
        "memsgd_fp16",
        devices,
        "memsgd",
        2,
        val=False,
        callbacks=[recorder],
        plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)],
    )
    result.pop("trainer")
    result["batches"] = gather(recorder.batches)
    save(out, "memsgd_fp16", result)


EXTRA_GRAD = (1e-3, 2e-3, 3e-3, 4e-3)


def scenario_unused(out: Path, devices: int) -> None:
    """Mem-SGD with find_unused_parameters=True: a parameter used at the first step only keeps
    the memory of what it did not send (DDP drops the hook's output for it afterwards)."""
    from lightning_plugin import MemSGDStrategy

    module = build_module(seed=0, lr=1.0)
    module.extra = nn.Parameter(torch.zeros(4))

    def training_step(batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(module(x), y)
        if module.trainer.global_step == 0:
            loss = loss + (module.extra * torch.tensor(EXTRA_GRAD)).sum()
        return loss

    module.training_step = training_step
    module.configure_optimizers = lambda: torch.optim.SGD(module.parameters(), lr=1.0)
    strategy = MemSGDStrategy(compressor="topk", density=0.25, find_unused_parameters=True)
    trainer = trainer_for(out, "memsgd_unused", devices, strategy, 1, limit_train_batches=4)
    trainer.fit(module, loaders(val=False)[0])
    memory = trainer.strategy.comm_state.memory.state_dict()["extra"]
    save(
        out,
        "memsgd_unused",
        {
            "ranks": gather(
                {
                    "extra": module.extra.detach().clone(),
                    "memory": memory,
                    "steps": trainer.global_step,
                    "tracks_unused": trainer.strategy.comm_state._usage is not None,
                }
            )
        },
    )


def scenario_single(out: Path, devices: int) -> None:
    """One device: Mem-SGD does not compress, gossip does nothing; both equal plain training.

    Also: a checkpoint of a 2-worker run (``EC_HOOKS_TWO_WORKER_CKPT``) does not resume on one.
    """
    for strategy in ("ddp", "memsgd", "deepsqueeze"):
        result = fit_record(out, f"single_{strategy}", devices, strategy, 2, val=False)
        result.pop("trainer")
        save(out, f"single_{strategy}", result)
    ckpt = os.environ.get("EC_HOOKS_TWO_WORKER_CKPT")
    if ckpt:
        try:
            fit_record(out, "single_resume_two", devices, "deepsqueeze", 4, val=False, ckpt_path=ckpt)
            error = None
        except ValueError as exc:
            error = str(exc)
        save(out, "single_resume_two", {"error": error})


def scenario_gpu(out: Path, devices: int) -> None:
    """On CUDA (NCCL): both strategies with 16-mixed (a real GradScaler), checkpoint and resume."""
    for strategy in ("memsgd", "deepsqueeze"):
        _fit_and_resume(
            out,
            devices,
            f"gpu_{strategy}",
            lambda s=strategy: s,
            epochs=2,
            precision="16-mixed",
            accelerator="gpu",
        )


def scenario_gpu_gloo(out: Path, devices: int) -> None:
    """Mem-SGD with workers sharing one GPU (started by hand as ``num_nodes`` nodes), over gloo.

    (gloo has no point-to-point transfer of CUDA tensors, so gossip cannot run this way.)
    """
    from lightning_plugin import MemSGDStrategy

    nodes = int(os.environ["EC_HOOKS_TEST_NODES"])
    _fit_and_resume(
        out,
        devices,
        "gloo_memsgd",
        lambda: MemSGDStrategy(process_group_backend="gloo"),
        epochs=2,
        precision="16-mixed",
        accelerator="gpu",
        num_nodes=nodes,
    )


SCENARIOS = {
    "baseline": scenario_baseline,
    "memsgd": scenario_memsgd,
    "deepsqueeze": scenario_deepsqueeze,
    "variants": scenario_variants,
    "unused": scenario_unused,
    "single": scenario_single,
    "gpu": scenario_gpu,
    "gpu_gloo": scenario_gpu_gloo,
}


def summary(out: Path) -> dict:
    """The figures of a 2-process run: final loss, compression ratio, checkpoint size, resume gap."""
    table = {}
    names = ["ddp"] + sorted(p.name[: -len("_full.pt")] for p in out.glob("*_full.pt"))
    for name in names:
        path = out / (f"{name}.pt" if name == "ddp" else f"{name}_full.pt")
        if not path.exists():
            continue
        full = torch.load(path, weights_only=False)
        row = {"final_loss": round(full["loss"], 4), "fit_seconds": round(full["seconds"], 2)}
        stats = full["ranks"][0]["strategy"].get("stats")
        if stats:
            row["compression_ratio"] = round(stats["compression_ratio"], 2)
            row["bytes_sent_per_worker"] = stats["bytes_sent"]
        ckpts = sorted((out / (name if name == "ddp" else f"{name}_full") / "ckpt").glob("*.ckpt"))
        if ckpts:
            row["checkpoint_bytes"] = ckpts[-1].stat().st_size
        resumed_path = out / f"{name}_resume.pt"
        if resumed_path.exists():
            resumed = torch.load(resumed_path, weights_only=False)
            row["resume_max_abs_diff"] = max(
                float((a["final"] - b["final"]).abs().max()) for a, b in zip(full["ranks"], resumed["ranks"])
            )
        table[name] = row
    return table


def record_process_group_at_exit(out: Path, exit_rank: list[int]) -> None:
    import torch.distributed as dist

    if exit_rank:
        (out / f"exit-{exit_rank[0]}.json").write_text(json.dumps({"initialized": dist.is_initialized()}))


def main(argv: list[str]) -> None:
    import lightning_plugin  # noqa: F401 - registers the strategy names

    out, devices, names = Path(argv[0]), int(argv[1]), argv[2:]
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    # Registered before any strategy's exit handler, so it runs after them (atexit is LIFO).
    exit_rank: list[int] = []
    atexit.register(record_process_group_at_exit, out, exit_rank)
    timings = {}
    for name in names:
        started = time.perf_counter()
        SCENARIOS[name](out, devices)
        timings[name] = time.perf_counter() - started
    exit_rank.append(rank())
    if rank() == 0:
        (out / f"timings-{'-'.join(names)}.json").write_text(json.dumps(timings))
        print(json.dumps({"workers": devices, "summary": summary(out)}, indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])


# ---------------------------------------------------------------------------------------------
# The tests (run the script above in fresh processes, then check what it wrote)
# ---------------------------------------------------------------------------------------------

_LAUNCH_ENV = (
    "LOCAL_RANK",
    "NODE_RANK",
    "RANK",
    "WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "GROUP_RANK",
    "LOCAL_WORLD_SIZE",
    "TORCHELASTIC_RUN_ID",
    "PL_GLOBAL_SEED",
    "SLURM_NTASKS",
    "SLURM_JOB_NAME",
)


def launch(out: Path, devices: int, *scenarios: str, timeout: float = 420.0, **env_extra) -> Path:
    """Run the scenarios in ``devices`` processes (Lightning's own launcher); fail with their output."""
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCH_ENV}
    env.update(
        WANDB_MODE="offline",
        WANDB_SILENT="true",
        WANDB_DIR=str(out),
        PYTHONWARNINGS="ignore",
        PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]),
        **env_extra,
    )
    log = out / f"log-{devices}.txt"
    out.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as handle:
        proc = subprocess.Popen(
            [sys.executable, __file__, str(out), str(devices), *scenarios],
            stdout=handle,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=str(out),
            start_new_session=True,
        )
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)  # the launched ranks share the session of the process we started
            proc.wait()
            code = "timeout"
    if code != 0:
        raise AssertionError(f"{devices}-process run {scenarios} failed ({code}):\n{log.read_text()[-6000:]}")
    return out


def load(out: Path, name: str) -> dict:
    return torch.load(out / f"{name}.pt", weights_only=False)


@pytest.fixture(scope="module")
def two(tmp_path_factory) -> Path:
    return launch(
        tmp_path_factory.mktemp("two"),
        2,
        "baseline",
        "memsgd",
        "deepsqueeze",
        "variants",
        "unused",
        EC_HOOKS_TEST_WANDB="1",
    )


@pytest.fixture(scope="module")
def three(tmp_path_factory) -> Path:
    return launch(tmp_path_factory.mktemp("three"), 3, "memsgd", "deepsqueeze")


@pytest.fixture(scope="module")
def one(tmp_path_factory, two) -> Path:
    ckpt = two / "deepsqueeze_full" / "ckpt" / "epoch=1.ckpt"
    return launch(tmp_path_factory.mktemp("one"), 1, "single", EC_HOOKS_TWO_WORKER_CKPT=str(ckpt))


def _flat_state(state_dict: dict, module) -> torch.Tensor:
    return torch.cat([state_dict[name].reshape(-1) for name, _ in module.named_parameters()])


INITIAL_LOSS = 1.3  # about ln(4) for the untrained 4-class model


@pytest.mark.parametrize("workers", [2, 3])
def test_the_strategies_destroy_the_gloo_process_group_before_the_interpreter_exits(request, workers):
    # Lightning does it for NCCL only; a gloo group left to the interpreter's shutdown can abort a
    # finished run with "terminate called without an active exception" (exit -6).
    out = request.getfixturevalue({2: "two", 3: "three"}[workers])
    for r in range(workers):
        assert json.loads((out / f"exit-{r}.json").read_text()) == {"initialized": False}, r


@pytest.mark.parametrize("strategy", ["memsgd", "deepsqueeze"])
def test_two_process_fit_trains_from_identical_initial_weights(two, strategy):
    full = load(two, f"{strategy}_full")
    ranks = full["ranks"]
    # Built from different seeds on each rank; the strategy starts everyone from rank 0's weights.
    assert not torch.equal(build_module(seed=1000).flat(), build_module(seed=1001).flat())
    assert torch.equal(ranks[0]["records"]["train_start"][0], build_module(seed=1000).flat())
    assert all(
        torch.equal(r["records"]["train_start"][0], ranks[0]["records"]["train_start"][0]) for r in ranks
    )
    steps = 4 * SAMPLES // (2 * BATCH)
    for r in ranks:
        assert r["strategy"]["global_step"] == steps
        assert r["strategy"].get("hook_iteration", r["strategy"].get("gossip_iteration")) == steps
        assert r["strategy"]["stats"]["compression_ratio"] > 20  # top-1% of 5.6k entries
    # Every worker ends with the same (average) model, which learned something.
    assert all(torch.equal(r["final"], ranks[0]["final"]) for r in ranks)
    assert full["loss"] < 0.8 * INITIAL_LOSS


@pytest.mark.parametrize("strategy", ["memsgd", "deepsqueeze"])
@pytest.mark.parametrize("workers", [2, 3])
def test_resume_from_checkpoint_equals_uninterrupted_run(request, strategy, workers):
    out = request.getfixturevalue({2: "two", 3: "three"}[workers])
    full, resumed = load(out, f"{strategy}_full"), load(out, f"{strategy}_resume")
    for a, b in zip(full["ranks"], resumed["ranks"]):
        assert torch.equal(a["final"], b["final"])
        assert a["strategy"]["global_step"] == b["strategy"]["global_step"]
        assert a["strategy"]["stats"]["bytes_sent"] == b["strategy"]["stats"]["bytes_sent"]
    if strategy == "memsgd":
        assert [r["strategy"]["memory_norm"] for r in full["ranks"]] == [
            r["strategy"]["memory_norm"] for r in resumed["ranks"]
        ]
    # The last checkpoints of both runs hold the same per-worker state, bit for bit.
    last = "epoch=3.ckpt"
    a = torch.load(out / f"{strategy}_full" / "ckpt" / last, weights_only=False)
    b = torch.load(out / f"{strategy}_resume" / "ckpt" / last, weights_only=False)
    _assert_same(a["state_dict"], b["state_dict"])
    _assert_same(a["optimizer_states"], b["optimizer_states"])
    # Ignored: timings; the divergence watch's record of the last consensus distance measured
    # (the monitor measured in the first run only); and the statistics' residual norm, which
    # still counts the DDP bucket layout of the first step after each (re)start (the memories
    # themselves are compared exactly).
    _assert_same(
        a["ec_hooks"],
        b["ec_hooks"],
        ignore=("watch", "compress_time_s", "last_compress_time_s", "residual_norm", "residual_sq"),
    )


def _assert_same(a, b, ignore=(), path="checkpoint"):
    if isinstance(a, dict):
        assert set(a) == set(b), path
        for key in a:
            if key not in ignore:
                _assert_same(a[key], b[key], ignore, f"{path}/{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, ignore, f"{path}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), path
    else:
        assert a == b, path


def test_memsgd_checkpoint_carries_every_workers_memories(two):
    ckpt = torch.load(two / "memsgd_full" / "ckpt" / "epoch=3.ckpt", weights_only=False)
    entry = ckpt["ec_hooks"]
    assert entry["world_size"] == 2 and entry["strategy"] == "MemSGDStrategy"
    memories = [w["error_feedback"]["memories"] for w in entry["workers"]]
    assert [w["error_feedback"]["rank"] for w in entry["workers"]] == [0, 1]
    module = build_module()
    assert set(memories[0]) == {name for name, _ in module.named_parameters()}
    # Workers see different data: their memories differ, and none is empty.
    assert any(not torch.equal(memories[0][k], memories[1][k]) for k in memories[0])
    assert all(sum(float(t.norm()) for t in m.values()) > 0 for m in memories)
    module.load_state_dict(ckpt["state_dict"], strict=True)
    full = load(two, "memsgd_full")
    assert torch.equal(module.flat(), full["ranks"][0]["final"])


def test_memsgd_with_unused_parameters_keeps_their_memory(two):
    ranks = load(two, "memsgd_unused")["ranks"]
    assert all(r["steps"] == 4 and r["tracks_unused"] for r in ranks)
    applied = -ranks[0]["extra"]  # SGD with lr 1 from zero; the same model on every rank
    mean_memory = sum(r["memory"] for r in ranks) / len(ranks)
    torch.testing.assert_close(applied + mean_memory, torch.tensor(EXTRA_GRAD), atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("name", ["memsgd_full", "deepsqueeze_full"])
def test_lightning_checkpoints_load_with_weights_only(two, name):
    checkpoint = torch.load(two / name / "ckpt" / "epoch=3.ckpt", weights_only=True)
    assert checkpoint["ec_hooks"]["world_size"] == 2 and len(checkpoint["ec_hooks"]["workers"]) == 2


def test_deepsqueeze_checkpoint_is_the_average_model_and_loads_strictly(two):
    ckpt = torch.load(two / "deepsqueeze_full" / "ckpt" / "epoch=3.ckpt", weights_only=False)
    workers = ckpt["ec_hooks"]["workers"]
    assert ckpt["ec_hooks"]["world_size"] == 2 and len(workers) == 2
    module = build_module()
    module.load_state_dict(ckpt["state_dict"], strict=True)
    average = {
        k: (workers[0]["model"][k].float() + workers[1]["model"][k].float()) / 2 for k in workers[0]["model"]
    }
    for name, tensor in ckpt["state_dict"].items():
        if tensor.is_floating_point():  # BatchNorm running statistics are averaged too
            torch.testing.assert_close(tensor, average[name], rtol=0, atol=1e-6)
        else:
            assert torch.equal(tensor, workers[0]["model"][name])
    locals_ = [_flat_state(w["model"], module) for w in workers]
    assert (locals_[0] - locals_[1]).abs().max() > 1e-3  # decentralized: the local models differ
    bn = "net.1.running_mean"
    assert not torch.equal(workers[0]["model"][bn], workers[1]["model"][bn])  # each keeps its own statistics
    for w in workers:
        assert w["gossip"][0]["algorithm"] == "DeepSqueeze"
        assert w["gossip"][0]["buffers"]["delta"].numel() == sum(p.numel() for p in module.parameters())
        assert len(w["optimizer_states"]) == 1 and w["optimizer_states"][0]["state"]  # momentum buffers
    assert not torch.equal(
        workers[0]["gossip"][0]["buffers"]["delta"], workers[1]["gossip"][0]["buffers"]["delta"]
    )
    # After fit, every worker's module holds the average model, the one saved last.
    full = load(two, "deepsqueeze_full")
    assert torch.equal(full["ranks"][0]["final"], module.flat())


@pytest.mark.parametrize("workers", [2, 3])
def test_deepsqueeze_validates_the_average_model_then_trains_on_the_local_ones(request, workers):
    out = request.getfixturevalue({2: "two", 3: "three"}[workers])
    records = [r["records"] for r in load(out, "deepsqueeze_full")["ranks"]]
    assert len(records) == workers
    assert len(records[0]["val"]) == 4 and len(records[0]["local_after_val"]) == 3
    for i in range(4):
        before = [r["local_before_val"][i] for r in records]
        assert not torch.equal(before[0], before[1])
        for r in records:
            torch.testing.assert_close(r["val"][i], sum(before) / workers, rtol=0, atol=1e-6)
            assert torch.equal(r["val"][i], records[0]["val"][i])
            if i < 3:  # training resumes on the local model, bit for bit
                assert torch.equal(r["local_after_val"][i], r["local_before_val"][i])


@pytest.mark.parametrize("strategy", ["memsgd", "deepsqueeze"])
def test_bf16_mixed_precision(two, strategy):
    result = load(two, f"{strategy}_bf16")
    for r in result["ranks"]:
        steps = SAMPLES // (2 * BATCH)
        assert r["strategy"]["global_step"] == steps
        assert r["strategy"].get("hook_iteration", r["strategy"].get("gossip_iteration")) == steps
        assert r["final"].dtype == torch.float32 and torch.isfinite(r["final"]).all()
    assert result["loss"] < INITIAL_LOSS * 1.05


@pytest.mark.parametrize("strategy", ["memsgd", "deepsqueeze"])
def test_gradient_accumulation_communicates_once_per_optimizer_step(two, strategy):
    for r in load(two, f"{strategy}_accumulate")["ranks"]:
        steps = SAMPLES // (2 * BATCH * 2)
        assert r["strategy"]["global_step"] == steps
        assert r["strategy"].get("hook_iteration", r["strategy"].get("gossip_iteration")) == steps


def test_gossip_skips_steps_a_grad_scaler_skipped_on_any_worker(two):
    result = load(two, "deepsqueeze_fp16")
    stepped = [set(s) for s in result["stepped"]]
    batches = SAMPLES // (2 * BATCH)
    assert all(0 < len(s) < batches for s in stepped)  # some steps really were skipped
    everywhere = set.intersection(*stepped)
    for r in result["ranks"]:
        assert r["strategy"]["gossip_iteration"] == len(everywhere)
    assert all(torch.isfinite(r["final"]).all() for r in result["ranks"])


def test_memsgd_memories_follow_the_grad_scaler_loss_scale(two):
    result = load(two, "memsgd_fp16")
    checked = 0
    for batches in result["batches"]:
        for b in batches:
            if b["stepped"] or b["memory_before"] is None:
                continue
            # Skipped (overflow) step: the memory is untouched by the hook, then follows the backoff.
            assert b["scale_after"] == b["scale_before"] / 2
            expected = b["memory_before"] * (b["scale_after"] / b["scale_before"])
            scale = float(expected.abs().max())
            torch.testing.assert_close(b["memory_after"], expected, rtol=1e-5, atol=1e-6 * scale)
            checked += 1
    assert checked >= 2  # at least one skipped step after the memories filled, on each rank
    assert all(torch.isfinite(r["final"]).all() for r in result["ranks"])


def test_single_device_is_plain_training(one):
    reference = load(one, "single_ddp")["ranks"][0]
    for strategy in ("memsgd", "deepsqueeze"):
        r = load(one, f"single_{strategy}")["ranks"][0]
        assert torch.equal(r["final"], reference["final"]), strategy
    assert "hook_iteration" not in load(one, "single_memsgd")["ranks"][0]["strategy"]  # no hook registered
    gossip = load(one, "single_deepsqueeze")["ranks"][0]["strategy"]
    assert (
        gossip["gossip_iteration"] == reference["strategy"]["global_step"]
        and gossip["stats"]["bytes_sent"] == 0
    )


def test_two_worker_checkpoint_refuses_to_resume_on_one(one):
    error = load(one, "single_resume_two")["error"]
    assert error is not None and "2 workers" in error and "1" in error


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("devices", [1, 2])
def test_gpu_fp16_fit_and_resume(tmp_path, devices):
    if torch.cuda.device_count() < devices:
        pytest.skip(f"needs {devices} CUDA devices")
    out = launch(tmp_path, devices, "gpu")
    for strategy in ("memsgd", "deepsqueeze"):
        full, resumed = load(out, f"gpu_{strategy}_full"), load(out, f"gpu_{strategy}_resume")
        assert len(full["ranks"]) == devices
        for a, b in zip(full["ranks"], resumed["ranks"]):
            assert torch.isfinite(a["final"]).all()
            assert torch.equal(a["final"], b["final"]), strategy
        assert all(torch.equal(r["final"], full["ranks"][0]["final"]) for r in full["ranks"])
        assert not any("carries no per-worker state" in w for r in resumed["ranks"] for w in r["warnings"])
        if devices > 1:
            assert full["ranks"][0]["strategy"]["stats"]["compression_ratio"] > 20
        assert full["loss"] < INITIAL_LOSS


def _csv_rows(path: Path) -> list[dict]:
    import csv

    with open(path) as handle:
        return list(csv.DictReader(handle))


@pytest.mark.parametrize("strategy", ["memsgd", "deepsqueeze"])
def test_compression_monitor_writes_the_keys_to_csv_every_n_steps(two, strategy):
    rows = _csv_rows(two / f"{strategy}_full" / "csv" / "version_0" / "metrics.csv")
    keys = ["comm/compression_ratio", "comm/bytes_sent", "comm/bytes_dense", "comm/residual_norm"]
    if strategy == "deepsqueeze":
        keys.append("gossip/consensus_distance")
    logged = [row for row in rows if row.get("comm/bytes_sent")]
    steps = 4 * SAMPLES // (2 * BATCH)
    # log_every_n_steps=2: after optimizer steps 2, 4, ..., in the rows of train_loss (step index = step - 1)
    assert [int(row["step"]) for row in logged] == list(range(1, steps, 2))
    assert all(row["train_loss"] for row in logged)
    for key in keys:
        assert all(row[key] != "" for row in logged), key
    sent = [float(row["comm/bytes_sent"]) for row in logged]
    assert all(b > a for a, b in zip(sent, sent[1:]))
    final = load(two, f"{strategy}_full")["ranks"]
    assert sent[-1] == pytest.approx(sum(r["strategy"]["stats"]["bytes_sent"] for r in final) / len(final))
    ratio = float(logged[-1]["comm/compression_ratio"])
    assert ratio == pytest.approx(final[0]["strategy"]["stats"]["compression_ratio"], rel=1e-5)
    if strategy == "memsgd":
        assert "gossip/consensus_distance" not in rows[0]
    else:
        assert all(float(row["gossip/consensus_distance"]) > 0 for row in logged)


@pytest.mark.parametrize("strategy", ["memsgd", "deepsqueeze"])
@pytest.mark.parametrize("workers", [2, 3])
def test_compression_monitor_figures_are_reduced_and_equal_on_every_rank(request, strategy, workers):
    ranks = load(request.getfixturevalue({2: "two", 3: "three"}[workers]), f"{strategy}_full")["ranks"]
    figures = [r["monitor"] for r in ranks]
    assert all(f == figures[0] for f in figures)
    stats = [r["strategy"]["stats"] for r in ranks]
    assert figures[0]["comm/bytes_sent"] == pytest.approx(sum(s["bytes_sent"] for s in stats) / workers)
    assert figures[0]["comm/bytes_dense"] == pytest.approx(sum(s["bytes_dense"] for s in stats) / workers)
    assert figures[0]["comm/compression_ratio"] == pytest.approx(
        sum(s["bytes_dense"] for s in stats) / sum(s["bytes_sent"] for s in stats)
    )
    # Root mean square over the workers, whose residuals differ.
    residuals = [s["residual_norm"] for s in stats]
    assert len(set(residuals)) == workers
    rms = (sum(x * x for x in residuals) / workers) ** 0.5
    assert figures[0]["comm/residual_norm"] == pytest.approx(rms)
    assert ("gossip/consensus_distance" in figures[0]) == (strategy == "deepsqueeze")


def test_compression_monitor_writes_the_keys_to_wandb_offline_run(two):
    runs = glob.glob(str(two / "wandb" / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(runs) == 1, runs
    data = Path(runs[0]).read_bytes()
    for key in (
        "comm/compression_ratio",
        "comm/bytes_sent",
        "comm/bytes_dense",
        "comm/residual_norm",
        "gossip/consensus_distance",
        "train_loss",
    ):
        assert key.encode() in data, key


def test_compression_monitor_with_plain_ddp_warns_once_and_logs_nothing(two):
    result = load(two, "ddp")
    messages = [m for m in result["ranks"][0]["warnings"] if "CompressionMonitor" in m]
    assert len(messages) == 1 and "DDPStrategy" in messages[0]
    rows = _csv_rows(two / "ddp" / "csv" / "version_0" / "metrics.csv")
    assert rows and not any(key.startswith(("comm/", "gossip/")) for key in rows[0])


def test_memsgd_moves_sgd_momentum_weight_decay_and_clipping_into_the_hook(two):
    for r in load(two, "memsgd_clip")["ranks"]:
        assert r["strategy"]["momentum_correction"] == {
            "momentum": 0.9,
            "nesterov": False,
            "weight_decay": 1e-4,
            "clip_norm": 0.5 / 2**0.5,
            "masking": False,
            "send_tail": True,
        }
        assert [(g["momentum"], g["weight_decay"]) for g in r["optimizer_groups"]] == [(0.0, 0.0)]
        assert r["gradient_clip_val"] is None  # the aggregated step is no longer clipped by Lightning
    for r in load(two, "memsgd_nocorr")["ranks"]:
        assert r["strategy"]["momentum_correction"] is None
        assert r["strategy"]["density_warmup"] == [2, 0.0625]  # the strategy's ramp reaches the hook
        assert [(g["momentum"], g["weight_decay"]) for g in r["optimizer_groups"]] == [(0.9, 1e-4)]
        assert r["gradient_clip_val"] == 0.5
    for r in load(two, "memsgd_adam")["ranks"]:
        assert r["strategy"]["momentum_correction"] is None  # plain error feedback
    # the default scenario resumed bit for bit with its velocities (test_resume_... above)
    ckpt = torch.load(two / "memsgd_full" / "ckpt" / "epoch=3.ckpt", weights_only=False)
    velocities = [w["error_feedback"]["velocities"] for w in ckpt["ec_hooks"]["workers"]]
    assert set(velocities[0]) == {name for name, _ in build_module().named_parameters()}
    assert any(not torch.equal(velocities[0][k], velocities[1][k]) for k in velocities[0])
