"""The gossip strategies under faults, in real Lightning processes on CPU (gloo): a NaN in one
worker's model stops every strategy with GossipRefusedError before anything is mixed, and a
bf16 model resumes exactly (its fp32 master copy travels in the checkpoint).

Like ``tests/test_lightning_distributed.py`` (whose model, data and launch functions it uses), this file
is also the training script: ``python tests/test_lightning_gossip_faults.py OUT DEVICES SCENARIO...``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the script is run by path, from any directory
    sys.path.insert(0, str(ROOT))

from tests.test_lightning_distributed import (  # noqa: E402
    _LAUNCH_ENV,
    BATCH,
    SAMPLES,
    _assert_same,
    build_module,
    gather,
    load,
    loaders,
    rank,
    save,
    strategy_state,
    trainer_for,
)

# Every test here trains with Lightning in launched processes.
pytestmark = pytest.mark.slow

POISONED_RANK, POISONED_STEP = 1, 3


class PoisonGradient:
    """A NaN gradient entry on one rank at one step, with no GradScaler to catch it: the
    optimizer step then writes NaN into that worker's model."""

    def __new__(cls):
        import lightning as L

        class _Poison(L.Callback):
            def on_before_optimizer_step(self, trainer, pl_module, optimizer):
                if rank() == POISONED_RANK and trainer.global_step == POISONED_STEP:
                    next(pl_module.parameters()).grad[0, 0] = float("nan")

        return _Poison()


def scenario_nonfinite(out: Path, devices: int) -> None:
    from ec_hooks.gossip import GossipRefusedError

    results = {}
    for strategy in ("deepsqueeze", "choco", "dpsgd"):
        module = build_module(seed=1000 + rank())
        trainer = trainer_for(
            out, f"nonfinite_{strategy}", devices, strategy, 2, callbacks=[PoisonGradient()]
        )
        train, _ = loaders(val=False)
        record = {"error": None}
        try:
            trainer.fit(module, train)
        except GossipRefusedError as error:
            record = {
                "error": type(error).__name__,
                "message": str(error),
                "step": error.step,
                "workers": sorted(error.workers),
            }
        except Exception as error:  # noqa: BLE001 - reported to the test
            record = {"error": type(error).__name__, "message": str(error)[:500]}
        gossip = trainer.strategy.gossips[0]
        record.update(iteration=gossip.iteration, finite=bool(torch.isfinite(module.flat()).all()))
        results[strategy] = gather(record)
    save(out, "nonfinite", results)


def _fit_bf16(out: Path, devices: int, name: str, ckpt_path: str | None = None) -> None:
    module = build_module(seed=1000 + rank())
    trainer = trainer_for(out, name, devices, "choco", 4, checkpoints=True, precision="bf16-true")
    train, valid = loaders()
    trainer.fit(module, train, valid, ckpt_path=ckpt_path)
    save(out, name, {"ranks": gather({"final": module.flat(), "strategy": strategy_state(trainer)})})


def scenario_bf16_resume(out: Path, devices: int) -> None:
    _fit_bf16(out, devices, "choco_bf16_full")
    _fit_bf16(
        out, devices, "choco_bf16_resume", ckpt_path=str(out / "choco_bf16_full" / "ckpt" / "epoch=1.ckpt")
    )


SCENARIOS = {"nonfinite": scenario_nonfinite, "bf16_resume": scenario_bf16_resume}


def main(argv: list[str]) -> None:
    import lightning_plugin  # noqa: F401 - registers the strategy names

    out, devices, names = Path(argv[0]), int(argv[1]), argv[2:]
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    for name in names:
        SCENARIOS[name](out, devices)


if __name__ == "__main__":
    main(sys.argv[1:])


# ---------------------------------------------------------------------------------------------
# The tests
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gossip_faults")
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCH_ENV}
    env.update(PYTHONWARNINGS="ignore", PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]))
    log = out / "log.txt"
    with open(log, "w") as handle:
        proc = subprocess.Popen(
            [sys.executable, __file__, str(out), "2", "nonfinite", "bf16_resume"],
            stdout=handle,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=str(out),
            start_new_session=True,
        )
        try:
            code = proc.wait(timeout=420)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)  # the launched ranks share the session of the process we started
            proc.wait()
            code = "timeout"
    if code != 0:
        raise AssertionError(f"2-process run failed ({code}):\n{log.read_text()[-6000:]}")
    return out


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["deepsqueeze", "choco", "dpsgd"])
def test_a_nan_in_one_workers_model_stops_every_worker_before_mixing(two, strategy):
    for worker, record in enumerate(load(two, "nonfinite")[strategy]):
        # without the refusal: no error, and both models end NaN
        assert record["error"] == "GossipRefusedError", record
        assert record["step"] == POISONED_STEP and record["workers"] == [POISONED_RANK]
        assert record["iteration"] == POISONED_STEP  # the refused step did not count
        assert f"worker {POISONED_RANK}: its model has inf/NaN" in record["message"]
        assert record["finite"] == (worker != POISONED_RANK)


@pytest.mark.slow
def test_bf16_true_gossip_resumes_exactly_with_its_master_copy(two):
    full, resumed = load(two, "choco_bf16_full"), load(two, "choco_bf16_resume")
    steps = 4 * SAMPLES // (2 * BATCH)
    for a, b in zip(full["ranks"], resumed["ranks"]):
        assert a["strategy"]["global_step"] == b["strategy"]["global_step"] == steps
        assert torch.equal(a["final"], b["final"]) and a["final"].dtype == torch.bfloat16
    last = "epoch=3.ckpt"
    a = torch.load(two / "choco_bf16_full" / "ckpt" / last, weights_only=False)
    b = torch.load(two / "choco_bf16_resume" / "ckpt" / last, weights_only=False)
    for worker in a["ec_hooks"]["workers"]:
        master = worker["gossip"][0]["master"]
        assert master is not None and master.dtype == torch.float32
        # the bf16 parameters are the master copy, rounded
        local = torch.cat(
            [
                t.reshape(-1)
                for n, t in worker["model"].items()
                if not n.endswith(("running_mean", "running_var", "num_batches_tracked"))
            ]
        )
        assert torch.equal(local, master.to(torch.bfloat16))
    _assert_same(
        a["ec_hooks"],
        b["ec_hooks"],
        ignore=("watch", "compress_time_s", "last_compress_time_s", "residual_norm", "residual_sq"),
    )
