"""Transports: how payloads cross the network, with ``torch.distributed`` collectives only.

* :func:`allreduce_mean` -- summable payloads (identity, casts, rand-k values on shared indices).
* :func:`allgather` -- byte payloads that cannot be summed (top-k, sign, QSGD): one buffer per
  worker, gathered once.
* :func:`exchange` -- point-to-point with a few neighbours (gossip), ``batch_isend_irecv``.

The first two return ``torch.futures.Future`` objects so that DDP comm hooks can chain on them.
gloo's point-to-point ``Work`` objects have no future, so :func:`exchange` blocks; the gossip
algorithms call it after the optimizer step, outside any future chain.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch
import torch.distributed as dist

__all__ = ["allreduce_mean", "allgather", "exchange", "world_size", "rank_in"]

logger = logging.getLogger(__name__)


def world_size(group=None) -> int:
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


def rank_in(group=None) -> int:
    return dist.get_rank(group) if dist.is_available() and dist.is_initialized() else 0


def allreduce_mean(tensor: torch.Tensor, group=None) -> torch.futures.Future:
    """Average ``tensor`` in place across the group; the future's value is ``tensor``.

    Divides before summing, as DDP's default hook does, so that fp16 sums do not overflow and
    the result matches DDP's bit for bit.
    """
    n = world_size(group)
    tensor.div_(n)
    if n == 1:
        fut = torch.futures.Future()
        fut.set_result(tensor)
        return fut
    work = dist.all_reduce(tensor, group=group, async_op=True)
    return _resolve_to(work, tensor)


def allgather(buffer: torch.Tensor, group=None) -> torch.futures.Future:
    """Gather one equally sized flat buffer per worker; the future's value is ``(n, numel)``."""
    n = world_size(group)
    out = torch.empty((n, buffer.numel()), dtype=buffer.dtype, device=buffer.device)
    if n == 1:
        out[0].copy_(buffer)
        fut = torch.futures.Future()
        fut.set_result(out)
        return fut
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    work = gather(out.view(-1), buffer.contiguous(), group=group, async_op=True)
    return _resolve_to(work, out)


def _resolve_to(work, result: torch.Tensor) -> torch.futures.Future:
    """A future of ``result`` once ``work`` is done; a failed collective (a peer died, a timeout)
    fails the future instead of handing on a buffer that was never filled."""

    def done(fut: torch.futures.Future) -> torch.Tensor:
        fut.value()  # re-raises the collective's error
        return result

    return work.get_future().then(done)


def exchange(
    sends: Mapping[int, torch.Tensor], recvs: Mapping[int, torch.Tensor], group=None
) -> Mapping[int, torch.Tensor]:
    """Send ``sends[peer]`` to each peer and receive into ``recvs[peer]``; blocks until done.

    Peers are ranks in ``group``.  All operations are posted in one ``batch_isend_irecv`` so
    that rings of odd size and time-varying peers cannot deadlock on send ordering; the send and
    receive peers may differ (directed graphs such as the one-peer exponential graph).  Only the
    peers take part: there is no barrier.
    """
    me = rank_in(group)
    if me in sends or me in recvs:
        raise ValueError(f"exchange: rank {me} lists itself as a peer; keep the local term out of the exchange")
    # gloo's point-to-point ops take host tensors only: stage device tensors through host memory.
    staged = any(t.device.type != "cpu" for t in [*sends.values(), *recvs.values()]) and (
        dist.get_backend(group) == dist.Backend.GLOO
    )
    host_recvs = {peer: t.cpu() if staged else t for peer, t in recvs.items()}
    ops = []
    for peer, tensor in host_recvs.items():
        ops.append(dist.P2POp(dist.irecv, tensor, _global_rank(peer, group), group))
    for peer, tensor in sends.items():
        tensor = tensor.cpu() if staged else tensor
        ops.append(dist.P2POp(dist.isend, tensor.contiguous(), _global_rank(peer, group), group))
    if ops:
        for work in dist.batch_isend_irecv(ops):
            work.wait()
    if staged:
        for peer, tensor in recvs.items():
            tensor.copy_(host_recvs[peer])
    return recvs


def _global_rank(rank: int, group) -> int:
    if group is None or group is dist.group.WORLD:
        return rank
    return dist.get_global_rank(group, rank)
