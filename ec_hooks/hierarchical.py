"""Hierarchical Mem-SGD: dense inside a node, error-compensated compression between nodes.

Inside a node, ranks talk over NVLink, PCIe or shared memory; between nodes, over a network that
is 10-100x slower.  Compressing the traffic inside a node costs accuracy and compute for nothing.
With ``ErrorFeedbackState(..., hierarchical=True)`` a bucket of ``P`` entries is reduced in three
stages over ``N`` nodes of ``L`` ranks each (:meth:`NodeHierarchy.reduce`):

1. a dense reduce-scatter inside the node: local rank ``j`` owns shard ``j`` (``ceil(P / L)``
   entries) of the node's mean gradient.  On gloo each rank sends its gradient on shard ``j``
   straight to local rank ``j`` (point to point: ``(L - 1) / L`` of the bucket per rank; gloo's
   own reduce-scatter is 2-3x slower than its allreduce, which sends twice as much), or, when
   the node's ranks share a host, writes it into a shared segment that the owner reads in place
   (:mod:`ec_hooks.shared_memory`);
2. on that shard, the flat Mem-SGD path (:func:`ec_hooks.hooks._reduce`, the same compressors,
   transports, dense fallback and overflow handling) with the local rank ``j`` of every other
   node: all ``L`` local ranks use the inter-node link at once, as rail-aligned NCCL rings do;
3. an allgather of the averaged shards inside the node.  After a sparse compressor a shard
   holds at most ``N k`` non-zeros: the owners send those (positions and values), not the
   dense shard, whenever that is smaller; the dense shards otherwise (or when an owner has
   more non-zeros than the compressor's ``entries_sent`` promised).  With shared memory every
   rank copies the owners' dense shards from their segments.

Memories belong to the shard owner: a rank's memory (fp32, laid out like the bucket) is zero
outside the shard it owns and holds, on it, what the node has not sent yet, in units of the
node's mean gradient.  Each rank adds its whole memory to its gradient before the sum in
the node, so memory left outside the owned shard by a change of bucket layout (DDP's
rebuild after the first step, a resume) moves to the new owner instead of being stranded.
Invariant, on every node ``a`` and per owner: ``sum_t mean_node_a(g_t) = sum_t C_t + m_T``
over its shard, and over the world
``sum_t mean(g_t) = sum_t out_t + (1 / N) sum_ranks m_T``.

An overflow anywhere (an inf/NaN gradient on any rank) voids the step everywhere, as in the flat
hook: no memory changes and every rank's result is NaN.  With one node nothing crosses a
network: the bucket is allreduced dense and no memory is used.

Stage 2's exchange between nodes is left in flight: a bucket's stage 3 runs when the next
bucket arrives, after that bucket's stages 1 and 2 were started (the last bucket's in
:meth:`NodeHierarchy.flush`, which the hook calls after it).  The link then works while the
backward pass and the next node sum go on, and every rank issues each group's collectives in
the same order, all from the hook's thread (a collective started from a future's callback could
reach the ranks in different orders).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from ec_hooks import flat, transport
from ec_hooks.shared_memory import NodeSharedMemory

if TYPE_CHECKING:  # hooks imports this module lazily
    from ec_hooks.hooks import ErrorFeedbackState

__all__ = ["HierarchicalGossip", "NodeHierarchy", "node_layout"]

logger = logging.getLogger(__name__)

_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def node_layout(
    nodes: Sequence[Sequence[int]] | None = None, world_size: int | None = None, env=os.environ
) -> list[list[int]]:
    """The global ranks of every node, validated.

    ``nodes`` given: a partition of ``range(world_size)`` into nodes of equal size.  Otherwise from
    the launcher's environment: ``LOCAL_WORLD_SIZE`` ranks per node, node ``r`` holding global
    ranks ``r * L ... r * L + L - 1`` (what torchrun and Lightning assign).
    """
    world_size = transport.world_size() if world_size is None else world_size
    if nodes is None:
        if "LOCAL_WORLD_SIZE" not in env:
            raise ValueError(
                "hierarchical=True needs the node layout: set LOCAL_WORLD_SIZE (torchrun does) or pass "
                "nodes=[[ranks of node 0], [ranks of node 1], ...]"
            )
        try:
            local = int(env["LOCAL_WORLD_SIZE"])
        except ValueError:
            raise ValueError(
                f"LOCAL_WORLD_SIZE must be an integer, got {env['LOCAL_WORLD_SIZE']!r}"
            ) from None
        if local < 1 or world_size % local:
            raise ValueError(
                f"LOCAL_WORLD_SIZE={local} does not divide the world size {world_size} into equal nodes"
            )
        return [list(range(start, start + local)) for start in range(0, world_size, local)]
    if isinstance(nodes, (str, bytes)) or not all(
        isinstance(node, Sequence) and not isinstance(node, (str, bytes)) for node in nodes
    ):
        raise ValueError(f"nodes must be a list of lists of global ranks, got {nodes!r}")
    layout = [[int(r) for r in node] for node in nodes]
    if not layout or any(not node for node in layout):
        raise ValueError(f"nodes must list at least one node of at least one rank, got {nodes!r}")
    if sorted(r for node in layout for r in node) != list(range(world_size)):
        raise ValueError(f"nodes must list every rank 0..{world_size - 1} exactly once, got {nodes!r}")
    if len({len(node) for node in layout}) != 1:
        raise ValueError(
            f"nodes must all have the same number of ranks, got sizes {[len(n) for n in layout]}"
        )
    return layout


class _ShardMemory:
    """The owner's shard memory as the flat path sees it: one scratch buffer, set before each call."""

    def __init__(self) -> None:
        self.buffer: torch.Tensor | None = None

    def buffer_for(self, keys, numels, device, dtype=torch.float32) -> torch.Tensor:
        assert self.buffer is not None  # set by NodeHierarchy.reduce before the flat path runs
        return self.buffer

    def layouts(self) -> set:
        return set()


class _NodeGroups:
    """The node layout and this rank's two process groups: its node, and the ranks of the same
    local rank on every node.  Creating them is collective: every rank creates every group, in
    the same order."""

    def __init__(self, nodes: Sequence[Sequence[int]]) -> None:
        self.nodes = [list(node) for node in nodes]
        self.num_nodes = len(self.nodes)
        self.local_world_size = len(self.nodes[0])
        me = dist.get_rank()
        self.node_rank = next(a for a, node in enumerate(self.nodes) if me in node)
        self.local_rank = self.nodes[self.node_rank].index(me)
        self.intra_group = None
        self.inter_group = None
        for node in self.nodes:
            group = dist.new_group(node)
            if me in node:
                self.intra_group = group
        for j in range(self.local_world_size):
            group = dist.new_group([node[j] for node in self.nodes])
            if j == self.local_rank:
                self.inter_group = group
        assert self.intra_group is not None and self.inter_group is not None  # each rank is in a node
        # The rank in the node's group of each local rank (groups number their ranks in the
        # order of the global ranks, a node may list its ranks in another order).
        self._group_rank = [dist.get_group_rank(self.intra_group, r) for r in self.nodes[self.node_rank]]
        # On gloo the node's collectives are point-to-point exchanges: each rank sends exactly
        # what the others need, (L - 1) / L of a bucket.  gloo's reduce_scatter and allgather took
        # 0.19 s and 0.18 s on 11M fp32 entries over 2 ranks, its allreduce (which sends a whole
        # bucket per rank) 0.08 s.
        self._point_to_point = dist.get_backend(self.intra_group) == dist.Backend.GLOO
        # Buffers of the node stages, reused across steps: fresh megabyte buffers cost page faults
        # on every step on the host.
        self._buffers: dict[tuple, torch.Tensor] = {}

    def describe(self) -> dict:
        return {"num_nodes": self.num_nodes, "local_world_size": self.local_world_size}

    def shard_size(self, numel: int) -> int:
        return -(-numel // self.local_world_size)

    def owned_slice(self, numel: int) -> slice:
        """The entries of a ``numel``-entry buffer this rank owns."""
        return self.slice_of(self.local_rank, numel)

    def slice_of(self, local_rank: int, numel: int) -> slice:
        """The entries of a ``numel``-entry buffer local rank ``local_rank`` owns."""
        shard = self.shard_size(numel)
        start = min(numel, local_rank * shard)
        return slice(start, min(numel, start + shard))

    def buffer(self, name: str, owner, shape: tuple, dtype: torch.dtype, device) -> torch.Tensor:
        """A reusable buffer (uninitialised), one per name, owner (a bucket's keys: the buffers
        of a bucket still in flight are not those of the next one), shape, dtype and device."""
        key = (name, owner, tuple(shape), dtype, torch.device(device))
        out = self._buffers.get(key)
        if out is None:
            out = self._buffers[key] = torch.empty(shape, dtype=dtype, device=device)
        return out

    def keep_buffers_of(self, owners) -> None:
        """Drop the buffers of the buckets not in ``owners`` (layouts DDP no longer uses)."""
        for key in [k for k in self._buffers if k[1] is not None and k[1] not in owners]:
            del self._buffers[key]

    def _exchange(self, sends: dict[int, torch.Tensor], recvs: dict[int, torch.Tensor]) -> None:
        """Point-to-point with the other local ranks (keys: local ranks); blocks until done."""
        transport.exchange(
            {self._group_rank[j]: t for j, t in sends.items()},
            {self._group_rank[j]: t for j, t in recvs.items()},
            self.intra_group,
        )

    def sum_to_owner(self, rows: torch.Tensor, owner=None) -> torch.Tensor:
        """Sum ``rows`` (``(L, width)``, row ``j`` for local rank ``j``) over the node; return this
        rank's row of the sum, added in the order of the local ranks (a reduce-scatter; on gloo an
        exchange of the rows, summed here).  May overwrite ``rows``."""
        L, me, width = self.local_world_size, self.local_rank, rows.shape[1]
        if L == 1:
            return rows[0]
        if not self._point_to_point:
            out = torch.empty(width, dtype=rows.dtype, device=rows.device)
            by_group_rank = sorted(range(L), key=self._group_rank.__getitem__)
            _reduce_scatter(out, rows[by_group_rank].reshape(-1), group=self.intra_group)
            return out
        others = [j for j in range(L) if j != me]
        received = self.buffer("received", owner, (L - 1, width), rows.dtype, rows.device)
        self._exchange({j: rows[j] for j in others}, {j: received[i] for i, j in enumerate(others)})
        total = None
        for j in range(L):  # in place: the rows and the received buffer are scratch
            term = rows[me] if j == me else received[others.index(j)]
            total = term if total is None else total.add_(term)
        assert total is not None  # L >= 2 terms
        return total

    def gather_rows(self, row: torch.Tensor) -> torch.Tensor:
        """Every local rank's ``row``, as ``(L, width)`` in the order of the local ranks (an
        allgather; on gloo an exchange).  Blocks until done."""
        L, me = self.local_world_size, self.local_rank
        if L > 1 and not self._point_to_point:
            return transport.allgather(row, self.intra_group).wait()[self._group_rank]
        out = torch.empty((L, row.numel()), dtype=row.dtype, device=row.device)
        out[me].copy_(row)
        if L == 1:
            return out
        others = [j for j in range(L) if j != me]
        self._exchange({j: row for j in others}, {j: out[j] for j in others})
        return out

    def node_mean_shard(self, values: torch.Tensor, out: torch.Tensor) -> None:
        """``out`` = this rank's shard of the node's mean of the flat fp32 ``values``."""
        L, numel, shard = self.local_world_size, values.numel(), out.numel()
        rows = self.buffer("rows", None, (L, shard), torch.float32, values.device)
        torch.mul(values, 1 / L, out=rows.view(-1)[:numel])
        rows.view(-1)[numel:].zero_()
        out.copy_(self.sum_to_owner(rows))


@dataclass
class _InFlight:
    """A bucket between steps 2 and 3 of :meth:`NodeHierarchy.reduce`."""

    state: ErrorFeedbackState
    keys: tuple
    grad: torch.Tensor
    memory: torch.Tensor
    scratch: torch.Tensor
    exchange: torch.futures.Future
    result: torch.futures.Future
    cleared: bool


class NodeHierarchy(_NodeGroups):
    """Process groups and the three-stage reduction of hierarchical Mem-SGD.

    Created by :class:`~ec_hooks.ErrorFeedbackState` with ``hierarchical=True`` (a collective
    call: every rank creates every node group and every inter-node group, in the same order).

    Args:
        state: the owning :class:`~ec_hooks.ErrorFeedbackState` (its compressor and options).
        nodes: the global ranks of every node (:func:`node_layout`).
    """

    def __init__(self, state, nodes: Sequence[Sequence[int]]) -> None:
        from ec_hooks.hooks import ErrorFeedbackState  # hooks imports this module lazily

        _NodeGroups.__init__(self, nodes)
        # The flat path over the inter-node group of this rank's shard; its memory is the shard
        # scratch, its statistics are the owning state's (they count what crosses between nodes).
        self._shard_state = ErrorFeedbackState(
            process_group=self.inter_group, compressor=state.compressor, dense_fallback=state.dense_fallback
        )
        self._shard_memory = _ShardMemory()
        self._shard_state.memory = self._shard_memory  # type: ignore[assignment]  # buffer_for and layouts suffice
        self._shard_state.stats = state.stats
        # The bucket whose exchange between nodes is in flight, finished by the next bucket's
        # reduce or by :meth:`flush`.
        self._in_flight: _InFlight | None = None
        # Per bucket, the memory as step 3 left it: zero outside the owned shard.  While it is
        # untouched since (its version counter), step 1 need not read it there, nor step 3
        # clear it.
        self._cleared: dict[tuple, tuple] = {}
        # On gloo, the node's ranks share a host: steps 1 and 3 go through shared memory instead
        # of loopback TCP (one copy instead of two, and no socket work).  Decided by all ranks of
        # the node together; None when they cannot (or EC_HOOKS_SHM_DISABLE=1).
        self._shared: NodeSharedMemory | None = None
        if self._point_to_point and self.local_world_size > 1 and self.num_nodes > 1:
            shared = NodeSharedMemory(self.intra_group, self._group_rank, self.local_rank)
            self._shared = shared if shared.usable else None

    def reduce(
        self, state, keys: tuple, numels: Sequence[int], grad: torch.Tensor
    ) -> torch.futures.Future[torch.Tensor]:
        """The mean of ``grad`` over the world, dense in the node and compressed between nodes.

        Steps 1 and 2 start here; the bucket's step 3 runs when the next bucket comes (after
        that bucket's steps 1 and 2), or in :meth:`flush` after the last bucket of the step: the
        exchange between nodes overlaps with the rest of the backward pass and the next
        bucket's node sum, and every rank still issues the collectives of each group in the same
        order, all from the hook's thread."""
        from ec_hooks.hooks import _reduce

        if getattr(state, "momentum_correction", None) is not None:
            raise ValueError(
                "hierarchical Mem-SGD is not combined with momentum correction yet: the velocity "
                "would be ignored; leave momentum, weight_decay and clip_norm at their defaults"
            )
        bytes_dense = grad.numel() * grad.element_size()
        memory = state.memory.buffer_for(keys, numels, grad.device)
        if self.num_nodes == 1 or state.iteration < state.start_iter:
            self.flush()
            state.stats.record(
                bytes_sent=bytes_dense if self.num_nodes > 1 else 0,
                bytes_dense=bytes_dense,
                entries_sent=grad.numel(),
                entries=grad.numel(),
            )
            return transport.allreduce_mean(grad, state.process_group)

        L, numel = self.local_world_size, grad.numel()
        shard = self.shard_size(numel)
        # 1. sum over the node of (gradient / L + memory): each owner learns the node's mean
        #    gradient on its shard plus every memory entry left there.  An inf/NaN gradient entry
        #    stays non-finite in its owner's sum, so the flat path of step 2 voids that owner's
        #    exchange on every node, and step 3 the step on every rank.
        cleared = self._cleared.get(keys) == self._fingerprint(memory)
        acc = self._node_sum(keys, grad, memory, cleared)

        # 2. the flat Mem-SGD step on the shard, left in flight.  The wire keeps the gradient's
        #    dtype; the rounding remainder starts the scratch memory: memory + gradient == acc.
        shard_grad = acc.to(grad.dtype)
        if shard_grad is acc:
            scratch = self.buffer("scratch", keys, (shard,), torch.float32, grad.device).zero_()
        else:
            scratch = acc - shard_grad.float()
        sub = self._shard_state
        self._shard_memory.buffer = scratch
        sub.iteration = state.iteration
        shard_keys = (("node_shard", self.local_rank, L), *keys)
        exchange = _reduce(sub, shard_keys, [shard], shard_grad)

        previous = self._in_flight
        result: torch.futures.Future[torch.Tensor] = torch.futures.Future()
        self._in_flight = _InFlight(state, keys, grad, memory, scratch, exchange, result, cleared)
        if previous is not None:
            try:
                self._finish(previous)
            except BaseException:
                self._in_flight = None  # the step failed: nothing of it is carried into the next one
                raise
        return result

    def _node_sum(self, keys: tuple, grad: torch.Tensor, memory: torch.Tensor, cleared: bool) -> torch.Tensor:
        """Step 1: this rank's shard of ``sum_i (g_i / L + m_i)`` over the node, fp32, padded to
        the shard size with zeros.  ``cleared``: this rank's memory is zero outside its shard."""
        L, me, numel = self.local_world_size, self.local_rank, grad.numel()
        shard = self.shard_size(numel)
        if not self._point_to_point:
            rows = self.buffer("rows", keys, (L, shard), torch.float32, grad.device)
            for j in range(L):
                part = self.slice_of(j, numel)
                torch.add(memory[part], grad[part], alpha=1 / L, out=rows[j, : part.stop - part.start])
            rows.view(-1)[numel:].zero_()
            return self.sum_to_owner(rows, keys)
        if self._shared is not None and grad.device.type == "cpu":
            acc = self._node_sum_shared(keys, grad, memory, cleared)
            if acc is not None:
                return acc
        # Each rank sends the owner its gradient there (the bucket's own slice when it is fp32 and
        # the memory there is clear: no copy), plus L times the memory left there; the owner adds
        # them in the order of the local ranks and scales the sum once.
        sends = {}
        for j in range(L):
            part = self.slice_of(j, numel)
            if j == me or part.stop == part.start:
                continue
            if cleared and grad.dtype == torch.float32:
                sends[j] = grad[part]
            else:
                out = self.buffer(f"to{j}", keys, (part.stop - part.start,), torch.float32, grad.device)
                sends[j] = (
                    out.copy_(grad[part])
                    if cleared
                    else torch.add(grad[part], memory[part], alpha=L, out=out)
                )
        owned = self.owned_slice(numel)
        length = owned.stop - owned.start
        others = [j for j in range(L) if j != me]
        received = self.buffer("received", keys, (L - 1, length), torch.float32, grad.device)
        self._exchange(sends, {j: received[i] for i, j in enumerate(others)} if length else {})
        acc = self.buffer("acc", keys, (shard,), torch.float32, grad.device)
        acc[length:].zero_()
        total = acc[:length]
        _sum_in_order(total, [grad[owned] if j == me else received[others.index(j)] for j in range(L)])
        torch.add(memory[owned], total, alpha=1 / L, out=total)
        return acc

    def _node_sum_shared(
        self, keys: tuple, grad: torch.Tensor, memory: torch.Tensor, cleared: bool
    ) -> torch.Tensor | None:
        """Step 1 through shared memory: each rank writes what the others own of ``g + L m`` into
        its segment, says so, and each owner adds the peers' segments in place, in the order of
        the local ranks: the same terms and the same additions as the exchange.  ``None`` (on
        every rank of the node) when a rank could not create its segment: then shared memory is
        off for good and the caller exchanges through gloo."""
        L, me, numel = self.local_world_size, self.local_rank, grad.numel()
        shared = self._shared
        assert shared is not None  # called while shared memory is on
        ready = _READY
        try:
            outbox = shared.own("sum", numel * 4, owner=keys).view(torch.float32)
            for j in range(L):
                part = self.slice_of(j, numel)
                if j == me or part.stop == part.start:
                    continue
                if cleared:
                    outbox[part].copy_(grad[part])
                else:
                    torch.add(grad[part], memory[part], alpha=L, out=outbox[part])
        except OSError as exc:
            logger.warning("shared memory for the node sum failed (%s): the node stages go through gloo", exc)
            ready = _FAILED
        peers = self._signal_shared(ready, "sum", numel * 4, keys)
        if peers is None:
            return None
        segments = peers[1]
        owned = self.owned_slice(numel)
        length = owned.stop - owned.start
        acc = self.buffer("acc", keys, (self.shard_size(numel),), torch.float32, grad.device)
        acc[length:].zero_()
        total = acc[:length]
        _sum_in_order(
            total, [grad[owned] if j == me else segments[j].view(torch.float32)[owned] for j in range(L)]
        )
        torch.add(memory[owned], total, alpha=1 / L, out=total)
        return acc

    def _signal_shared(self, status: int, name, nbytes: int, keys: tuple) -> tuple[list[int], dict] | None:
        """After writing this rank's segment ``name``: tell the other local ranks ``status``
        (:data:`_READY`, :data:`_VOID` or :data:`_FAILED`) and map theirs.  Returns every local
        rank's status and the peers' segments (by local rank), or ``None`` on every rank when one
        failed: shared memory is then off for good.  When a rank created a segment in this call,
        a second message says that every peer has mapped it, and its file is unlinked."""
        shared = self._shared
        assert shared is not None  # called while shared memory is on
        values = self._signal(status | (_CREATED if shared.created else 0))
        statuses = [v & ~_CREATED for v in values]
        if _FAILED in statuses:
            self._shared_memory_off(shared)
            return None
        try:
            segments = {
                j: shared.peer(j, name, nbytes, owner=keys)
                for j in range(self.local_world_size)
                if j != self.local_rank
            }
            mapped = _READY
        except (OSError, RuntimeError) as exc:
            logger.warning("mapping a shared segment of the node failed (%s)", exc)
            segments, mapped = {}, _FAILED
        # A peer's segment is mapped in the call where it was created, which always has this
        # second message: a rank that could not map one says so here, and the node agrees.
        if any(v & _CREATED for v in values):
            if _FAILED in self._signal(mapped):
                self._shared_memory_off(shared)
                return None
            shared.settle()
        elif mapped == _FAILED:
            raise RuntimeError("a shared segment that was mapped before could not be read again")
        return statuses, segments

    def _shared_memory_off(self, shared: NodeSharedMemory) -> None:
        logger.warning("shared memory inside the node is off from now on: the node stages go through gloo")
        self._shared = None
        shared.close()

    def _signal(self, value: int) -> list[int]:
        """Send ``value`` to every other local rank and receive theirs: a small message that
        also says "my shared segment is written"; the values of all local ranks, in order."""
        L, me = self.local_world_size, self.local_rank
        others = [j for j in range(L) if j != me]
        mine = torch.tensor([value], dtype=torch.int32)
        received = torch.empty((L - 1, 1), dtype=torch.int32)
        self._exchange({j: mine for j in others}, {j: received[i] for i, j in enumerate(others)})
        theirs = received.view(-1).tolist()
        return [value if j == me else theirs[others.index(j)] for j in range(L)]

    @staticmethod
    def _fingerprint(memory: torch.Tensor) -> tuple:
        return id(memory), memory.data_ptr(), memory._version

    def flush(self) -> None:
        """Finish the bucket in flight (step 3), if any: the hook calls it after a step's last bucket."""
        previous, self._in_flight = self._in_flight, None
        if previous is not None:
            self._finish(previous)
            live = previous.state.memory.layouts()
            self.keep_buffers_of(live)
            if self._shared is not None:
                self._shared.keep(live)
            self._cleared = {keys: mark for keys, mark in self._cleared.items() if keys in live}

    def _finish(self, bucket: _InFlight) -> None:
        try:
            mean = bucket.exchange.wait()
            # 3. every owner's averaged shard to every rank of the node, and whether a step was void.
            void = self._gather_means(mean, bucket.grad, self._shard_state.compressor, bucket.keys)
            # What this rank owns is what the node has not sent; elsewhere its memory is now
            # empty (it went into this step's sum).  A void step changes nothing.
            memory, owned = bucket.memory, self.owned_slice(bucket.grad.numel())
            if not void:
                if not bucket.cleared:
                    memory[: owned.start].zero_()
                    memory[owned.stop :].zero_()
                memory[owned].copy_(bucket.scratch[: owned.stop - owned.start])
                self._cleared[bucket.keys] = self._fingerprint(memory)
            state = bucket.state
            state.stats.set_residual(bucket.keys, memory, live_keys=state.memory.layouts())
        except BaseException as exc:
            bucket.result.set_exception(exc)
            raise
        bucket.result.set_result(bucket.grad.fill_(float("nan")) if void else bucket.grad)

    def _gather_means(self, mean: torch.Tensor, grad: torch.Tensor, compressor, keys: tuple) -> bool:
        """Write every owner's shard of the mean into ``grad``; whether some owner's step was void.

        After a sparse compressor the averaged shard holds at most ``N`` payloads' entries: the
        owners then send their non-zeros (int32 positions and values) when that is smaller than
        the dense shard, in one message of fixed size each.  An owner with more non-zeros than
        the message holds says so, and the node then gathers the dense shards.  Every rank,
        the owner included, writes the shards from the gathered messages, so the replicas stay
        bit-identical.  With shared memory, every rank copies the owners' dense shards from their
        segments instead (``keys``: the bucket's, which name its segments)."""
        if self._shared is not None and grad.device.type == "cpu":
            shared_void = self._gather_shared(mean, grad, keys)
            if shared_void is not None:
                return shared_void
        shard, numel = mean.numel(), grad.numel()
        capacity = min(shard, self.num_nodes * compressor.entries_sent(shard))
        value_bytes = mean.element_size()
        if capacity * (4 + value_bytes) < shard * value_bytes and shard < 2**31:
            gathered, headers = self._gather_nonzeros(mean, capacity)
            if any(void for _, void in headers):
                return True
            if all(count >= 0 for count, _ in headers):
                grad.zero_()
                values_at = 8 + capacity * 4
                for j, (count, _) in enumerate(headers):
                    row = gathered[j]
                    where = row[8 : 8 + count * 4].view(torch.int32).long()
                    values = row[values_at : values_at + count * value_bytes].view(mean.dtype)
                    grad[self.slice_of(j, numel)].index_copy_(0, where, values.to(grad.dtype))
                return False
        # dense: the shards themselves, each with its owner's void word
        void = (~torch.isfinite(mean).all()).to(mean.dtype).reshape(1)
        gathered = self.gather_rows(torch.cat([mean, void]))
        if bool(gathered[:, shard].sum() > 0):
            return True
        for j in range(self.local_world_size):
            part = self.slice_of(j, numel)
            grad[part].copy_(gathered[j, : part.stop - part.start])
        return False

    def _gather_shared(self, mean: torch.Tensor, grad: torch.Tensor, keys: tuple) -> bool | None:
        """Step 3 through shared memory: each owner writes its shard of the mean into its
        segment and says whether its step was void; every rank, the owner included, copies every
        shard from the segments.  ``None`` (on every rank) when a rank could not create its
        segment: shared memory is then off and the caller gathers through gloo."""
        L, me, numel = self.local_world_size, self.local_rank, grad.numel()
        shared, name, nbytes = self._shared, ("mean", str(mean.dtype)), mean.numel() * mean.element_size()
        assert shared is not None  # called while shared memory is on
        status = _VOID if _non_finite(mean) else _READY
        try:
            shared.own(name, nbytes, owner=keys).view(mean.dtype).copy_(mean)
        except OSError as exc:
            logger.warning(
                "shared memory for the node gather failed (%s): the node stages go through gloo", exc
            )
            status = _FAILED
        peers = self._signal_shared(status, name, nbytes, keys)
        if peers is None:
            return None
        statuses, segments = peers
        if _VOID in statuses:
            return True
        for j in range(L):
            part = self.slice_of(j, numel)
            source = mean if j == me else segments[j].view(mean.dtype)
            grad[part].copy_(source[: part.stop - part.start])
        return False

    def _gather_nonzeros(self, mean: torch.Tensor, capacity: int) -> tuple[torch.Tensor, list]:
        """Every owner's message: an int32 header (its count of non-zeros, ``-1`` when they do
        not fit; whether its step was void), ``capacity`` int32 positions, ``capacity`` values."""
        where = mean.nonzero().view(-1)
        values = mean[where]
        count, void = where.numel(), not bool(torch.isfinite(values).all())
        fits = count <= capacity and not void
        value_bytes = mean.element_size()
        size = 8 + capacity * 4 + capacity * value_bytes
        message = torch.zeros(-(-size // 8) * 8, dtype=torch.uint8, device=mean.device)
        message[:8] = torch.tensor([count if fits else -1, int(void)], dtype=torch.int32).view(torch.uint8)
        if fits:
            message[8 : 8 + count * 4] = where.to(torch.int32).view(torch.uint8)
            values_at = 8 + capacity * 4
            message[values_at : values_at + count * value_bytes] = values.view(torch.uint8)
        gathered = self.gather_rows(message)
        return gathered, gathered[:, :8].contiguous().view(torch.int32).tolist()

    def __getstate__(self):
        raise TypeError(
            "a hierarchical ErrorFeedbackState holds process groups and cannot be copied or pickled: save "
            "state.state_dict() and load it into a state created in the new process"
        )


# what a rank tells the others of its node after writing its shared segment (_CREATED: a bit flag)
_FAILED, _READY, _VOID, _CREATED = 0, 1, 2, 4


def _sum_in_order(total: torch.Tensor, terms: list[torch.Tensor]) -> None:
    """``total = terms[0] + terms[1] + ...``, added left to right in fp32 (the same bits on every
    rank), the first two in one pass."""
    if len(terms) == 1:
        total.copy_(terms[0])
        return
    torch.add(terms[0], terms[1], out=total)
    for term in terms[2:]:
        total.add_(term)


def _non_finite(values: torch.Tensor) -> bool:
    """Whether some entry is inf or NaN.  A finite sum means finite entries, and a sum reads
    the tensor many times faster than ``isfinite`` on CPU; an overflowing sum of finite entries
    takes the exact check."""
    if bool(torch.isfinite(values.sum(dtype=torch.float32))):
        return False
    return not bool(torch.isfinite(values).all())


class HierarchicalGossip:
    """Gossip over a topology of nodes: exact averaging inside each node, compressed gossip between.

    Built by ``DeepSqueeze(..., hierarchical=True)`` (and ``ChocoSGD``, ``DPSGD``); takes the
    algorithm's arguments, with the ``topology`` over the ``N`` nodes.  :meth:`step`, called after
    ``optimizer.step()`` on every rank:

    1. a sum of the model inside the node (a reduce-scatter, an allreduce on gloo): local rank
       ``j`` takes shard ``j`` (``ceil(d / L)`` entries) of the node's mean model;
    2. the algorithm's own step on that shard (``inner``, the same class with a process group of
       the local rank ``j`` of every node): compression with the owner's error buffers, exchange
       with the neighbouring nodes, mixing;
    3. a gather of the shards inside the node, written back to the parameters.

    Every rank of a node then holds the same model; the mean over all ranks moves as the mean of
    the local optimizer steps (the node mean is exact, and the gossip between nodes keeps the mean
    of the nodes).  Error buffers (DeepSqueeze's ``delta``, CHOCO's public copies) belong to the
    shard owner.  ``stats`` count the bytes sent between nodes.  :meth:`average_parameters` and
    :meth:`consensus_distance` are over all ranks, as for the flat algorithms.
    """

    def __init__(
        self,
        algorithm_class,
        params,
        topology="ring",
        compressor=None,
        consensus_step=None,
        process_group=None,
        *,
        nodes: Sequence[Sequence[int]] | None = None,
        watch_every: int = 100,
        watch_patience: int = 3,
        watch_growth: float = 1.5,
    ) -> None:
        from ec_hooks.gossip import _collect_params  # gossip imports this module lazily

        if process_group is not None:
            raise ValueError(
                "hierarchical=True gossips over the default process group: leave process_group=None"
            )
        self.groups = _NodeGroups(node_layout(nodes))
        self.params = _collect_params(params)
        self.numel = sum(p.numel() for p in self.params)
        self.world_size = transport.world_size()
        self.rank = transport.rank_in()
        self.process_group = None  # the world: what the mean model is averaged over
        self._shard = torch.zeros(
            self.groups.shard_size(self.numel), dtype=torch.float32, device=self.params[0].device
        )
        self.inner = algorithm_class(
            [self._shard],
            topology=topology,
            compressor=compressor,
            consensus_step=consensus_step,
            process_group=self.groups.inter_group,
            watch_every=0,
            watch_patience=watch_patience,
            watch_growth=watch_growth,
        )
        self.watch_every = watch_every
        self.last_consensus_distance: float | None = None

    # what the strategies and callbacks read
    @property
    def stats(self):
        return self.inner.stats

    @property
    def iteration(self) -> int:
        return self.inner.iteration

    @property
    def compressor(self):
        return self.inner.compressor

    @property
    def topology(self):
        return self.inner.topology

    @property
    def consensus_step(self) -> float:
        return self.inner.consensus_step

    def _flatten(self) -> torch.Tensor:
        return flat.flatten(self.params)

    def step(self) -> None:
        """Average inside the node, gossip the owned shard between nodes, gather the node's model."""
        with torch.no_grad():
            self.groups.node_mean_shard(self._flatten(), self._shard)
            self.inner.step()
            gathered = self.groups.gather_rows(self._shard).view(-1)
            for p, part in zip(self.params, flat.split(gathered, self.params)):
                p.copy_(part)
        if self.watch_every and self.iteration % self.watch_every == 0:
            self.inner._watch(self.consensus_distance())

    def average_parameters(self) -> list[torch.Tensor]:
        """The mean model over all ranks (one allreduce), as new tensors.  Collective."""
        with torch.no_grad():
            x = self._flatten()
            transport.allreduce_mean(x).wait()
            return [part.to(p.dtype).clone() for p, part in zip(self.params, flat.split(x, self.params))]

    def average_into(self, module: torch.nn.Module) -> None:
        """Load the mean model into ``module`` (the model this gossip mixes, or a copy), floating
        buffers averaged, integer ones kept: :meth:`ec_hooks.gossip.GossipAlgorithm.average_into`.
        Collective."""
        from ec_hooks.gossip import GossipAlgorithm

        GossipAlgorithm.average_into(self, module)  # type: ignore[arg-type]  # it has what the mean model needs

    def consensus_distance(self) -> float:
        """``sqrt((1/n) sum_i ||x_i - x_bar||^2)`` over all ranks, fp64.  Collective."""
        with torch.no_grad():
            x = torch.cat([p.detach().reshape(-1).to(torch.float64) for p in self.params])
            mean = x.clone()
            dist.all_reduce(mean)
            mean.div_(self.world_size)
            spread = (x - mean).pow(2).sum().reshape(1)
            dist.all_reduce(spread)
            self.inner._mean_norm = float(mean.norm())
        self.last_consensus_distance = float(spread.item() / self.world_size) ** 0.5
        return self.last_consensus_distance

    def state_dict(self) -> dict:
        """The shard owner's algorithm state (its buffers hold this rank's shard) and the node layout."""
        return {
            "hierarchy": self.groups.describe(),
            "rank": self.rank,
            "numel": self.numel,
            "inner": self.inner.state_dict(),
        }

    def check_state_dict(self, state_dict: dict) -> None:
        if not isinstance(state_dict, dict) or "hierarchy" not in state_dict:
            raise ValueError(
                "state_dict is not a hierarchical gossip state dict (no 'hierarchy' entry): it was "
                "saved by a flat gossip algorithm"
            )
        if state_dict["hierarchy"] != self.groups.describe():
            raise ValueError(
                f"state_dict was saved with hierarchy={state_dict['hierarchy']}, this one has "
                f"{self.groups.describe()}"
            )
        if state_dict.get("rank") != self.rank or state_dict.get("numel") != self.numel:
            raise ValueError(
                f"state_dict belongs to rank {state_dict.get('rank')} of a model of "
                f"{state_dict.get('numel')} entries; this is rank {self.rank} of {self.numel}"
            )
        self.inner.check_state_dict(state_dict["inner"])

    def load_state_dict(self, state_dict: dict) -> None:
        self.check_state_dict(state_dict)
        self.inner.load_state_dict(state_dict["inner"])

    def __repr__(self) -> str:
        return (
            f"Hierarchical{type(self.inner).__name__}(numel={self.numel}, nodes={self.groups.num_nodes}x"
            f"{self.groups.local_world_size}, topology={self.topology.name!r}, compressor={self.compressor!r}, "
            f"consensus_step={self.consensus_step:g})"
        )
