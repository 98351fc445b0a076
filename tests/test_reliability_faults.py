"""Rank failure: a worker SIGKILLed mid-training, the survivors' errors, and the exact relaunch.

The training loop here is the raw-PyTorch one of the README (Mem-SGD as a DDP hook; DeepSqueeze
after ``optimizer.step()``), with per-rank checkpoints written atomically every few steps.

* One rank kills itself with SIGKILL mid-step; every survivor must leave its collective with an
  error (never hang) well within ``init_process_group(timeout=...)``, and the test bounds its own
  time through the queue timeout.
* Relaunching every rank from the last checkpoint ends with bit-identical parameters and
  communication state as a run that was never interrupted (same seed, CPU).
* The same relaunch under ``torchrun --max-restarts 1``: this module is also the training script
  (``python -m torch.distributed.run ... -m tests.test_reliability_faults``).
"""

from __future__ import annotations

import argparse
import datetime
import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import ec_hooks
from tests.distributed import context, free_port

ALGORITHMS = ("memsgd", "deepsqueeze")
STEPS = 12
CHECKPOINT_EVERY = 3
KILL_STEP = 7  # the last checkpoint before it is step 6
KILLED_RANK = 2
WORLD_SIZE = 3
PG_TIMEOUT_S = 30
ROOT = Path(__file__).resolve().parents[1]


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))


def _batch(rank: int, step: int):
    g = torch.Generator().manual_seed(1000 * rank + step)
    return torch.randn(6, 8, generator=g), torch.randint(0, 3, (6,), generator=g)


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def train(
    algorithm: str, rank: int, checkpoint_dir: Path | None, steps: int = STEPS, kill_at: int | None = None
):
    """Train ``steps`` steps (resuming from ``checkpoint_dir`` when it holds this rank's checkpoint).

    Returns this rank's parameters and communication state.  With ``kill_at``, rank
    ``KILLED_RANK`` SIGKILLs itself in the middle of that step (after the forward pass).
    """
    model = _model()
    if algorithm == "memsgd":
        net = torch.nn.parallel.DistributedDataParallel(model)
        comm = ec_hooks.ErrorFeedbackState(compressor=ec_hooks.TopK(0.1), module=net)
        net.register_comm_hook(comm, ec_hooks.error_feedback_hook)
    else:
        net = model
        comm = ec_hooks.DeepSqueeze(
            model.parameters(),
            topology="ring",
            compressor=ec_hooks.TopK(0.1),
            consensus_step=0.2,
            watch_every=0,
        )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    start = 0
    path = None if checkpoint_dir is None else checkpoint_dir / f"{algorithm}-rank{rank}.pt"
    if path is not None and path.exists():
        saved = torch.load(path, weights_only=False)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        comm.load_state_dict(saved["comm"])
        start = saved["step"]
    for step in range(start + 1, steps + 1):
        x, y = _batch(rank, step)
        loss = torch.nn.functional.cross_entropy(net(x), y)
        if kill_at == step and rank == KILLED_RANK:
            if checkpoint_dir is not None:
                (checkpoint_dir / "killed_at").write_text(repr(time.monotonic()))
            os.kill(os.getpid(), signal.SIGKILL)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if algorithm == "deepsqueeze":
            comm.step()
        if path is not None and step % CHECKPOINT_EVERY == 0:
            _atomic_save(
                {
                    "step": step,
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "comm": comm.state_dict(),
                },
                path,
            )
    state = comm.state_dict()
    buffers = state["memories"] if algorithm == "memsgd" else state["buffers"]
    return {
        "params": [p.detach().clone() for p in model.parameters()],
        "buffers": buffers,
        "iteration": state["iteration"],
    }


# ------------------------------------------------------------------ launching real processes


def _worker(rank, world_size, port, algorithms, checkpoint_dir, kill_at, queue):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=PG_TIMEOUT_S)
    )
    results = {}
    try:
        for algorithm in algorithms:
            results[algorithm] = train(algorithm, rank, checkpoint_dir, kill_at=kill_at)
        buffer = io.BytesIO()  # serialized: no tensor may share memory with an exiting process
        torch.save(results, buffer)
        queue.put((rank, "ok", buffer.getvalue(), None))
    except Exception as exc:  # noqa: BLE001 - the survivor's error is what the test checks
        queue.put((rank, "error", f"{type(exc).__name__}: {exc}", time.monotonic()))
    finally:
        # After a peer died, tearing the group down may itself fail: the process exits anyway.
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001
            pass


def launch(algorithms, checkpoint_dir=None, kill_at=None, timeout=120.0):
    """Run ``train`` on ``WORLD_SIZE`` gloo ranks; per-rank (status, value, time) and exit codes."""
    ctx = context()
    queue = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_worker, args=(r, WORLD_SIZE, port, algorithms, checkpoint_dir, kill_at, queue))
        for r in range(WORLD_SIZE)
    ]
    for p in procs:
        p.start()
    expected = WORLD_SIZE - (kill_at is not None)
    reports = {}
    try:
        for _ in range(expected):
            rank, status, value, when = queue.get(timeout=timeout)  # bounds the test: never hangs
            if status == "ok":
                value = torch.load(io.BytesIO(value), weights_only=False)
            reports[rank] = (status, value, when)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
                p.join()
    return reports, [p.exitcode for p in procs]


def _same(a: dict, b: dict) -> bool:
    return (
        all(torch.equal(x, y) for x, y in zip(a["params"], b["params"]))
        and a["buffers"].keys() == b["buffers"].keys()
        and all(torch.equal(a["buffers"][k], b["buffers"][k]) for k in a["buffers"])
        and a["iteration"] == b["iteration"]
    )


@pytest.fixture(scope="module")
def uninterrupted():
    reports, exitcodes = launch(ALGORITHMS)
    assert exitcodes == [0] * WORLD_SIZE
    return {rank: value for rank, (status, value, _) in reports.items()}


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_sigkilled_rank_stops_the_others_with_an_error_and_the_relaunch_is_exact(
    tmp_path, uninterrupted, algorithm
):
    reports, exitcodes = launch([algorithm], tmp_path, kill_at=KILL_STEP)
    killed_at = float((tmp_path / "killed_at").read_text())
    # The killed rank died of SIGKILL; every survivor left its collective with an error and exited.
    assert exitcodes[KILLED_RANK] == -signal.SIGKILL
    survivors = [r for r in range(WORLD_SIZE) if r != KILLED_RANK]
    assert sorted(reports) == survivors
    for rank in survivors:
        status, message, when = reports[rank]
        assert status == "error", f"rank {rank} finished training although rank {KILLED_RANK} died"
        assert any(
            word in message.lower() for word in ("connection", "closed", "peer", "timed out", "timeout")
        ), message
        # CLOCK_MONOTONIC is shared by the processes of one machine.
        assert 0 <= when - killed_at < PG_TIMEOUT_S, f"rank {rank} noticed after {when - killed_at:.1f} s"
        print(f"{algorithm}: rank {rank} stopped {when - killed_at:.3f} s after the kill: {message[:160]}")
        assert exitcodes[rank] == 0
    # Every rank's last complete checkpoint is the one before the kill; no temporary file is left
    # in place of a checkpoint.
    for rank in range(WORLD_SIZE):
        saved = torch.load(tmp_path / f"{algorithm}-rank{rank}.pt", weights_only=False)
        assert saved["step"] == KILL_STEP // CHECKPOINT_EVERY * CHECKPOINT_EVERY
    # Relaunch every rank from its checkpoint: the end is the uninterrupted run's, bit for bit.
    reports, exitcodes = launch([algorithm], tmp_path)
    assert exitcodes == [0] * WORLD_SIZE
    for rank in range(WORLD_SIZE):
        status, value, _ = reports[rank]
        assert status == "ok", value
        assert _same(value[algorithm], uninterrupted[rank][algorithm]), (
            f"rank {rank} differs after the relaunch"
        )


@pytest.mark.slow
def test_relaunch_under_torchrun_max_restarts_is_exact(tmp_path, uninterrupted):
    for algorithm in ALGORITHMS:
        out = tmp_path / algorithm
        out.mkdir()
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nnodes",
            "1",
            "--nproc-per-node",
            str(WORLD_SIZE),
            "--max-restarts",
            "1",
            "--monitor-interval",
            "0.2",
            "--master-addr",
            "127.0.0.1",
            "--master-port",
            str(free_port()),
            "-m",
            "tests.test_reliability_faults",
            "--algorithm",
            algorithm,
            "--dir",
            str(out),
        ]
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
        proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
        assert proc.returncode == 0, proc.stderr[-3000:]
        # The first attempt was killed (its marker is there), the second resumed from step 6.
        assert (out / "killed").exists()
        for rank in range(WORLD_SIZE):
            final = torch.load(out / f"final-rank{rank}.pt", weights_only=False)
            assert final["resumed_from"] == KILL_STEP // CHECKPOINT_EVERY * CHECKPOINT_EVERY
            assert _same(final["result"], uninterrupted[rank][algorithm]), f"{algorithm}: rank {rank} differs"


def _torchrun_main(argv=None) -> None:
    """Entry point under torchrun: kill rank 2 on the first attempt, resume on the restart."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--algorithm", choices=ALGORITHMS, required=True)
    parser.add_argument("--dir", type=Path, required=True)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    timeout = datetime.timedelta(seconds=PG_TIMEOUT_S)
    # The agent's store outlives a restart: a prefix per attempt keeps the new group from
    # reading the dead group's addresses.
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False, timeout=timeout
    )
    dist.init_process_group(
        "gloo",
        store=dist.PrefixStore(f"attempt{attempt}", store),
        rank=int(os.environ["RANK"]),
        world_size=int(os.environ["WORLD_SIZE"]),
        timeout=timeout,
    )
    rank = dist.get_rank()
    path = args.dir / f"{args.algorithm}-rank{rank}.pt"
    resumed_from = torch.load(path, weights_only=False)["step"] if path.exists() else 0
    if attempt == 0 and rank == KILLED_RANK:
        (args.dir / "killed").touch()
    result = train(args.algorithm, rank, args.dir, kill_at=KILL_STEP if attempt == 0 else None)
    torch.save({"result": result, "resumed_from": resumed_from}, args.dir / f"final-rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    _torchrun_main()
