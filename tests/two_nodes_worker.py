"""Training script of the multi-node tests, started by torchrun (one launcher per node).

    torchrun ... tests/two_nodes_worker.py hooks --out OUT --steps 12 --methods flat hier deepsqueeze
    torchrun ... tests/two_nodes_worker.py lightning --out OUT --num-nodes 2 --devices 2

``hooks``: raw DDP with the Mem-SGD hook and DeepSqueeze (flat and hierarchical), one method after
the other in the launched process group, on data that depends only on the global rank and the
step (so 2 nodes x 2 ranks and 1 node x 4 ranks see the same batches).  With ``--ckpt`` every
rank saves its model, optimizer and communication state every ``--ckpt-every`` steps, and
``latest`` names the last step all ranks saved; a launch (or a restart by ``torchrun
--max-restarts``) resumes from it.  ``--kill-rank R --kill-at T`` makes rank R kill itself with
SIGKILL at step T of the first attempt (``TORCHELASTIC_RESTART_COUNT`` 0) of ``--kill-method``.

``lightning``: ``Trainer(num_nodes=N, devices=L)`` with the Mem-SGD and DeepSqueeze strategies
(flat and hierarchical); ``--ckpt-path`` resumes each from its checkpoint of another launch.

Rank 0 writes ``OUT/<method>.pt``: every rank's final parameters and figures.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import ec_hooks  # noqa: E402
from ec_hooks import DeepSqueeze, ErrorFeedbackState, error_feedback_hook, local_hook  # noqa: E402

DENSITY = 0.05


def make_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(10, 64),
        torch.nn.Tanh(),
        torch.nn.Linear(64, 64),
        torch.nn.Tanh(),
        torch.nn.Linear(64, 3),
    )


def batch(rank: int, step: int):
    g = torch.Generator().manual_seed(1000 * rank + step)
    return torch.randn(8, 10, generator=g), torch.randint(0, 3, (8,), generator=g)


def gather(obj):
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _save_atomic(obj, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _build(method: str, nodes):
    model = DDP(make_model(), bucket_cap_mb=0.005)  # several buckets
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    comm = None
    if method in ("flat", "hier"):
        comm = ErrorFeedbackState(
            compressor=ec_hooks.TopK(DENSITY),
            module=model,
            hierarchical=method == "hier",
            nodes=nodes if method == "hier" else None,
        )
        model.register_comm_hook(comm, error_feedback_hook)
    elif method in ("deepsqueeze", "deepsqueeze_hier"):
        model.register_comm_hook(None, local_hook)
        options = {"hierarchical": True, "nodes": nodes} if method == "deepsqueeze_hier" else {}
        comm = DeepSqueeze(model.parameters(), topology="ring", compressor=ec_hooks.TopK(DENSITY), **options)
    else:
        raise ValueError(f"method must be one of flat, hier, deepsqueeze, deepsqueeze_hier, got {method!r}")
    return model, optimizer, comm


def run_method(method: str, args) -> None:
    rank = dist.get_rank()
    model, optimizer, comm = _build(method, args.nodes)
    start = 0
    ckpt = Path(args.ckpt) / method if args.ckpt else None
    if ckpt is not None:
        ckpt.mkdir(parents=True, exist_ok=True)
        latest = ckpt / "latest"
        if latest.exists():
            start = int(latest.read_text())
            saved = torch.load(ckpt / f"step{start}-rank{rank}.pt", weights_only=False)
            model.load_state_dict(saved["model"])
            optimizer.load_state_dict(saved["optimizer"])
            comm.load_state_dict(saved["comm"])
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    stop = args.stop_at if args.stop_at is not None else args.steps
    for step in range(start, stop):
        if rank == args.kill_rank and step == args.kill_at and attempt == 0 and method == args.kill_method:
            os.kill(os.getpid(), signal.SIGKILL)
        x, y = batch(rank, step)
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        if method.startswith("deepsqueeze"):
            comm.step()
        if ckpt is not None and (step + 1) % args.ckpt_every == 0:
            _save_atomic(
                {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "comm": comm.state_dict()},
                ckpt / f"step{step + 1}-rank{rank}.pt",
            )
            dist.barrier()  # every rank has saved this step
            if rank == 0:
                tmp = ckpt / "latest.tmp"
                tmp.write_text(str(step + 1))
                os.replace(tmp, ckpt / "latest")
    params = [p.detach() for p in model.parameters()]
    figures = {
        "final": torch.cat([p.reshape(-1) for p in params]).clone(),
        "start": start,
        "restart_count": attempt,
    }
    if method.startswith("deepsqueeze"):
        figures["average"] = torch.cat([p.reshape(-1) for p in comm.average_parameters()])
        figures["bytes_sent"] = comm.stats.bytes_sent
    else:
        figures["memory_norm"] = comm.memory.norm()
        figures["bytes_sent"] = comm.stats.bytes_sent
    per_rank = gather(figures)
    if rank == 0:
        _save_atomic(
            {
                "ranks": per_rank,
                "world_size": dist.get_world_size(),
                "local_world_size": int(os.environ.get("LOCAL_WORLD_SIZE", "0")),
            },
            Path(args.out) / f"{method}.pt",
        )


def main_hooks(args) -> None:
    dist.init_process_group("gloo")
    try:
        for method in args.methods:
            run_method(method, args)
    finally:
        dist.destroy_process_group()


def main_lightning(args) -> None:
    from lightning.pytorch.callbacks import ModelCheckpoint

    import lightning_plugin
    from tests.test_lightning_distributed import build_module, loaders, trainer_for

    out = Path(args.out)
    strategies = {
        "memsgd": lambda: lightning_plugin.MemSGDStrategy(density=DENSITY),
        "memsgd_hier": lambda: lightning_plugin.MemSGDStrategy(
            density=DENSITY, hierarchical=True, nodes=args.nodes
        ),
        "deepsqueeze": lambda: lightning_plugin.DeepSqueezeStrategy(),
        "deepsqueeze_hier": lambda: lightning_plugin.DeepSqueezeStrategy(hierarchical=True, nodes=args.nodes),
    }
    for name in args.methods:
        module = build_module(seed=1000)
        ckpt_dir = out / name / "ckpt"
        trainer = trainer_for(
            out,
            name,
            args.devices,
            strategies[name](),
            args.epochs,
            num_nodes=args.num_nodes,
            callbacks=[ModelCheckpoint(dirpath=ckpt_dir, filename="{epoch}", save_top_k=-1)],
        )
        train, _ = loaders(val=False)
        ckpt_path = None
        if args.resume_from:
            ckpt_path = str(Path(args.resume_from) / name / "ckpt" / f"epoch={args.resume_epoch}.ckpt")
        trainer.fit(module, train, ckpt_path=ckpt_path)
        per_rank = gather(
            {
                "final": module.flat(),
                "global_step": trainer.global_step,
                "num_nodes": trainer.num_nodes,
                "world_size": trainer.world_size,
            }
        )
        if dist.get_rank() == 0:
            _save_atomic({"ranks": per_rank}, out / f"{name}.pt")
    # Lightning leaves the process group up; a gloo group still alive at interpreter exit can
    # abort a rank ("terminate called without an active exception") after its work is done.
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["hooks", "lightning"])
    parser.add_argument("--out", required=True)
    parser.add_argument("--methods", nargs="+", default=None)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument(
        "--stop-at", type=int, default=None, help="stop after this step (a launch that is resumed)"
    )
    parser.add_argument("--ckpt", default=None)
    parser.add_argument("--ckpt-every", type=int, default=2)
    parser.add_argument("--kill-rank", type=int, default=-1)
    parser.add_argument("--kill-at", type=int, default=-1)
    parser.add_argument("--kill-method", default="hier")
    parser.add_argument(
        "--nodes", type=json.loads, default=None, help="explicit node layout (JSON list of lists)"
    )
    parser.add_argument("--num-nodes", type=int, default=2)
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--resume-from", default=None)
    parser.add_argument("--resume-epoch", type=int, default=0)
    args = parser.parse_args(argv)
    if args.methods is None:
        args.methods = (
            ["flat", "hier", "deepsqueeze", "deepsqueeze_hier"]
            if args.mode == "hooks"
            else ["memsgd", "memsgd_hier", "deepsqueeze", "deepsqueeze_hier"]
        )
    return args


if __name__ == "__main__":
    torch.set_num_threads(1)
    arguments = parse_args()
    Path(arguments.out).mkdir(parents=True, exist_ok=True)
    (main_hooks if arguments.mode == "hooks" else main_lightning)(arguments)
