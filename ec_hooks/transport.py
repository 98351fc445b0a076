"""Transports: how payloads cross the network, with ``torch.distributed`` collectives only.

Each way of moving one bucket's compressed message is an object with one job
(:class:`Transport`): it says how many bytes it puts on the wire per worker for a compressor,
a bucket size and a world size (:meth:`Transport.wire_bytes`), starts the collectives
(:meth:`Transport.start`, a future) and hands back a :class:`Delivery`: the mean over the
workers, whether every worker's gradient was finite, and how this worker takes what it sent out
of its memory.  The hook asks :func:`choose` for the cheapest transport that accepts its
compressor, per bucket:

* :class:`AllreduceMean` -- summable payloads (identity, casts, rand-k values on shared indices).
* :class:`AllgatherSum` -- byte payloads that cannot be summed (top-k, sign, QSGD): one buffer
  per worker, gathered once, summed by the compressor.
* :class:`DenseAllreduce` -- the densified ``C(acc)`` of any private-index compressor,
  allreduced: cheaper than the allgather once ``n`` payloads outweigh two dense buffers.
* :class:`SharedIndexAllreduce` -- compressors whose indices one worker chooses
  (:class:`~ec_hooks.cyclic.CyclicTopK`): the leader's index message is broadcast, every worker
  takes its values there, one allreduce sums them.
* :class:`CandidateAllreduce` -- shared-index compressors that choose the indices from the sum
  (``CyclicTopK(selection="candidates")``): every worker's nominations are allgathered, one
  allreduce sums the values at their union, the ``k`` largest sums are applied.
* :class:`SparseAllreduce` -- private top-k payloads summed by region (Ok-Topk): all-to-all to
  the region owners, re-selection, allgather of the kept entries.  Opt-in.

Bytes are those of gloo's (and NCCL's) algorithms, per worker: a ring allreduce sends
``2 (n - 1) / n`` buffers, a ring allgather ``n - 1`` buffers, a broadcast ``(n - 1) / n`` of
the buffer on average (``n - 1`` copies in all).

Gossip moves messages with :class:`NeighbourExchange` (point-to-point with a few neighbours,
``batch_isend_irecv``) or, for ``n`` workers simulated in one process, :class:`InMemoryExchange`.
gloo's point-to-point ``Work`` objects have no future, so these block; the gossip algorithms
call them after the optimizer step, outside any future chain.

The functions :func:`allreduce_mean`, :func:`allgather` and :func:`exchange` are the bare
collectives underneath.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ec_hooks.compressors.base import Payload

__all__ = [
    "AllgatherSum",
    "AllreduceMean",
    "CandidateAllreduce",
    "Delivery",
    "DenseAllreduce",
    "InMemoryExchange",
    "NeighbourExchange",
    "Outgoing",
    "SharedIndexAllreduce",
    "SparseAllreduce",
    "Transport",
    "allgather",
    "allreduce_mean",
    "choose",
    "exchange",
    "rank_in",
    "ring_allreduce_bytes",
    "world_size",
]

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
        fut: torch.futures.Future = torch.futures.Future()
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
        fut: torch.futures.Future = torch.futures.Future()
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
        raise ValueError(
            f"exchange: rank {me} lists itself as a peer; keep the local term out of the exchange"
        )
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


# ---------------------------------------------------------------------- transports of one bucket


def ring_allreduce_bytes(nbytes: float, n: int) -> float:
    """Bytes one worker sends in a ring allreduce of ``nbytes`` (reduce-scatter + allgather)."""
    return 2.0 * (n - 1) / n * nbytes


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


@dataclass
class Outgoing:
    """One bucket, compensated and (unless the transport selects) compressed, ready to move.

    Attributes:
        compressor: the compressor in use.
        source: the error-compensated buffer ``acc = m + g`` (flat fp32, the memory itself).
        payload: ``C(acc)``; ``None`` for compressors whose indices the transport has one worker
            choose (``shares_indices``).
        finite: 0-dim bool, this worker's gradient was finite.
        grad: the bucket's gradient (for memory filters that look at it).
        wire_dtype: the gradient's dtype, in which values travel unless the compressor says.
        step, key, rank: the step, the bucket's randomness key, this worker's rank in the group.
        add_tails: with ``send_momentum_tail`` and a compressor that :attr:`shares_indices`:
            adds the momentum tails of the given entries to ``source``; a transport calls it
            once the shared entries are known and before it reads their values, so that each
            sent entry carries its tail (``None``: no tails).
    """

    compressor: object
    source: torch.Tensor
    payload: object | None
    finite: torch.Tensor
    grad: torch.Tensor
    wire_dtype: torch.dtype
    step: int
    key: int
    rank: int
    add_tails: Callable[[torch.Tensor], None] | None = None


@dataclass
class Delivery:
    """What a transport hands back: the mean ``(1/n) sum_i C_i`` (flat fp32), whether every
    worker's gradient was finite (0-dim bool), ``update_memory(memory, scale=None)``, which
    takes what this worker sent out of ``memory`` (``scale``: a 0-dim 0/1 tensor that voids it),
    and ``sent_indices()``, the entries this worker sent whole (the compressor's
    ``sent_indices`` of what actually went out; for momentum factor masking)."""

    mean: torch.Tensor
    all_finite: torch.Tensor
    update_memory: Callable[..., None]
    sent_indices: Callable[[], torch.Tensor | None]


class Transport:
    """One way of moving a bucket's compressed message; see the module docstring."""

    name = "transport"

    def accepts(self, compressor) -> bool:
        """Whether this transport can move ``compressor``'s payloads."""
        raise NotImplementedError

    def wire_bytes(self, compressor, numel: int, dtype: torch.dtype, n: int) -> float:
        """Bytes one worker puts on the wire (on average over the workers) for one bucket of
        ``numel`` entries of ``dtype``, status word included."""
        raise NotImplementedError

    def start(self, out: Outgoing, group=None) -> tuple[torch.futures.Future, int]:
        """Start the collectives; returns a future of a :class:`Delivery` and the bytes this
        worker put into them."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def choose(transports: Sequence[Transport], compressor, numel: int, dtype: torch.dtype, n: int) -> Transport:
    """The transport of ``transports`` that accepts ``compressor`` and puts the fewest bytes on
    the wire (the first one on a tie)."""
    candidates = [t for t in transports if t.accepts(compressor)]
    if not candidates:
        raise ValueError(f"no transport among {list(transports)} moves the payloads of {compressor!r}")
    return min(candidates, key=lambda t: t.wire_bytes(compressor, numel, dtype, n))


def _status(finite: torch.Tensor) -> torch.Tensor:
    """This worker's status word: 1.0 when its gradient was not finite."""
    return (~finite).float().reshape(1)


def _summed(
    compressor, payload, status: torch.Tensor, group, update_memory
) -> tuple[torch.futures.Future, int]:
    """Allreduce-mean of a summable payload with the status word appended."""
    wire = torch.cat([payload.data, status.to(payload.data.dtype)])
    fut = allreduce_mean(wire, group)

    def deliver(fut: torch.futures.Future) -> Delivery:
        wire = fut.value()
        mean = compressor.decompress(payload.with_data(wire[:-1])).reshape(-1)
        return Delivery(mean, wire[-1] == 0, update_memory, lambda: compressor.sent_indices(payload))

    return fut.then(deliver), wire.numel() * wire.element_size()


class AllreduceMean(Transport):
    """Summable payloads (rand-k values, casts, identity): one allreduce of payload + status."""

    name = "allreduce"

    def accepts(self, compressor):
        return compressor.summable and not compressor.shares_indices

    def wire_bytes(self, compressor, numel, dtype, n):
        return ring_allreduce_bytes(compressor.wire_bytes(numel, dtype) + compressor.wire_bytes(1, dtype), n)

    def start(self, out, group=None):
        compressor, payload = out.compressor, out.payload

        def update_memory(memory, scale=None):
            compressor.subtract_sent_(memory, payload, scale)

        return _summed(compressor, payload, _status(out.finite), group, update_memory)


class AllgatherSum(Transport):
    """Payloads that cannot be summed: one byte buffer per worker (payload + status), gathered
    once, summed by the compressor (top-k: a scatter-add of every worker's values)."""

    name = "allgather"
    status_bytes = 4

    def accepts(self, compressor):
        return not compressor.summable

    def wire_bytes(self, compressor, numel, dtype, n):
        return (n - 1) * (compressor.wire_bytes(numel, dtype) + self.status_bytes)

    def start(self, out, group=None):
        compressor, payload, n = out.compressor, out.payload, world_size(group)
        wire = torch.cat([payload.data, _status(out.finite).view(torch.uint8)])
        fut = allgather(wire, group)

        def deliver(fut: torch.futures.Future) -> Delivery:
            rows = fut.value()
            payloads = [payload.with_data(row[: -self.status_bytes]) for row in rows]
            status_all = rows[:, -self.status_bytes :].contiguous().view(torch.float32)
            mean = compressor.sum_payloads(payloads).reshape(-1) / n
            return Delivery(
                mean, status_all.sum() == 0, update_memory, lambda: compressor.sent_indices(payload)
            )

        def update_memory(memory, scale=None):
            compressor.subtract_sent_(memory, payload, scale)

        return fut.then(deliver), wire.numel() * wire.element_size()


class DenseAllreduce(Transport):
    """The densified ``C(acc)`` in the gradient's dtype, allreduced: for private-index payloads
    when ``n`` of them outweigh two dense buffers."""

    name = "dense"

    def accepts(self, compressor):
        return not compressor.shares_indices

    def wire_bytes(self, compressor, numel, dtype, n):
        return ring_allreduce_bytes((numel + 1) * _element_size(dtype), n)

    def start(self, out, group=None):
        sent = out.compressor.decompress(out.payload).reshape(-1).to(out.wire_dtype)
        wire = torch.cat([sent, _status(out.finite).to(out.wire_dtype)])
        fut = allreduce_mean(wire, group)

        def deliver(fut: torch.futures.Future) -> Delivery:
            wire = fut.value()
            # fp32, or fp64 for fp64 gradients (fp64 memories)
            return Delivery(
                wire[:-1].to(torch.promote_types(wire.dtype, torch.float32)),
                wire[-1] == 0,
                update_memory,
                lambda: out.compressor.sent_indices(out.payload),
            )

        def update_memory(memory, scale=None):
            memory.view(-1).sub_(sent.to(memory.dtype) if scale is None else sent.to(memory.dtype) * scale)

        return fut.then(deliver), wire.numel() * wire.element_size()


class SharedIndexAllreduce(Transport):
    """Indices chosen by one worker, values summed by all (ScaleCom's cyclic local top-k).

    1. The leader (``compressor.leader(step, key, n)``) encodes the positions it selects from
       its own compensated buffer (``compressor.select``); the others prepare an empty message.
    2. The message is broadcast from the leader.  This collective is waited for here, in the
       hook's thread: the allreduce of step 3 must be issued in the same order on every rank
       (gloo and NCCL match collectives by issue order), and a collective issued from a future
       callback would race the next bucket's.  The message is small (2 bytes per entry).
    3. Every worker takes its values at those positions (``compressor.compress_at``), with
       their momentum tails added first when the hook sends them (``out.add_tails``), and one
       allreduce-mean sums them, status word appended.

    The memory update is the compressor's ``update_memory_`` (which may filter the memory).
    """

    name = "shared_index"

    def accepts(self, compressor):
        return compressor.shares_indices and not compressor.selects_from_candidates

    def wire_bytes(self, compressor, numel, dtype, n):
        index = (n - 1) / n * compressor.index_bytes(numel)
        return index + ring_allreduce_bytes(
            compressor.wire_bytes(numel, dtype) + compressor.wire_bytes(1, dtype), n
        )

    def start(self, out, group=None):
        compressor, source, n = out.compressor, out.source, world_size(group)
        leader = compressor.leader(out.step, out.key, n)
        if out.rank == leader:
            message = compressor.select(source)
        else:
            message = compressor.empty_index_message(source.numel(), source.device)
        if n > 1:
            dist.broadcast(message, src=_global_rank(leader, group), group=group, async_op=True).wait()
        if out.add_tails is not None:
            indices, used = compressor.decode_indices(message, source.numel())
            out.add_tails(indices[used])
        payload = compressor.compress_at(source, message, out.wire_dtype)

        def update_memory(memory, scale=None):
            compressor.update_memory_(memory, payload, out.grad, scale)

        fut, nbytes = _summed(compressor, payload, _status(out.finite), group, update_memory)
        return fut, nbytes + (message.numel() if out.rank == leader and n > 1 else 0)


class CandidateAllreduce(Transport):
    """Shared indices chosen from the sum: every worker nominates candidates, the ``k`` largest
    sums among them are applied (``CyclicTopK(selection="candidates")``).

    1. Every worker encodes its nominations (``compressor.nominate``: its top
       ``m = compressor.candidates_for(d, n)`` positions, a fixed-size message).
    2. The messages are allgathered and waited for in the hook's thread (the allreduce of step 3
       must be issued in the same order on every rank, see :class:`SharedIndexAllreduce`); every
       worker decodes the same sorted union ``U`` (``compressor.union_of``).
    3. Every worker takes its values at ``U``; one allreduce-mean sums them, status word
       appended.  This is the future.
    4. On delivery, the ``k`` entries of ``U`` with the largest summed magnitude
       (``compressor.keep``) make the mean; this worker takes out of its memory only its own
       values there (``compressor.update_memory_``): what it sent at the rest of ``U`` stays in
       its memory, so the conservation invariant holds per worker.

    :meth:`wire_bytes` counts the union at its largest, ``min(n m, d)`` values; overlapping
    nominations make it smaller (the bytes handed in count the actual union).
    """

    name = "candidates"

    def accepts(self, compressor):
        return compressor.shares_indices and compressor.selects_from_candidates

    def wire_bytes(self, compressor, numel, dtype, n):
        m = compressor.candidates_for(numel, n)
        index = (n - 1) * compressor.index_bytes(numel, m)
        value_size = compressor.wire_bytes(1, dtype)
        return index + ring_allreduce_bytes((min(n * m, numel) + 1) * value_size, n)

    def start(self, out, group=None):
        compressor, source, n = out.compressor, out.source, world_size(group)
        numel = source.numel()
        message = compressor.nominate(source, n)
        messages = allgather(message, group).wait()
        union = compressor.union_of(messages, numel, n)
        if out.add_tails is not None:
            # at all of U: an entry of U that is not kept keeps its tail in memory (its velocity
            # is cleared with the rest of U), so no tail is counted twice
            out.add_tails(union)
        offered = compressor.values_at(source, union, out.wire_dtype)
        wire = torch.cat([offered.data, _status(out.finite).to(offered.data.dtype)])
        fut = allreduce_mean(wire, group)

        def deliver(fut: torch.futures.Future) -> Delivery:
            wire = fut.value()
            kept = compressor.keep(wire[:-1], numel)
            # Only the kept entries leave this worker's memory: the rest of what it offered stays.
            mine = Payload(offered.data[kept], offered.shape, union[kept], offered.value_dtype)
            mean = compressor.decompress(mine.with_data(wire[:-1][kept])).reshape(-1)

            def update_memory(memory, scale=None):
                compressor.update_memory_(memory, mine, out.grad, scale)

            return Delivery(mean, wire[-1] == 0, update_memory, lambda: mine.indices)

        return fut.then(deliver), wire.numel() * wire.element_size() + (message.numel() if n > 1 else 0)


class SparseAllreduce(Transport):
    """A sparse allreduce of private top-k payloads, after Ok-Topk (Li and Hoefler, PPoPP 2022).

    Every worker sends about ``2 k (n - 1) / n`` entries instead of the allgather's ``k (n - 1)``.
    With ``d`` entries, ``k`` per worker, ``m = ceil(k / n)``:

    1. The index space is cut into ``n`` regions; region ``j`` is ``[floor(j d / n),
       floor((j + 1) d / n))`` and worker ``j`` owns it.
    2. Each worker sends its (index, value) pairs to the owners of their regions: an all-to-all
       of the counts, then an all-to-all with those split sizes (int32 index, fp32 value).
    3. Re-selection: the owner sums what arrived (in rank order) and keeps the ``m`` entries of
       largest ``|sum|`` of its region, so that the step sends about ``k`` entries in all, as
       one worker's top-k.
    4. An allgather of the kept (index, sum) pairs, ``m`` per worker (padded), and the status
       words; the mean is the kept sums divided by ``n``.
    5. Each worker takes out of its memory only its own values at the kept indices: what the
       re-selection dropped stays in the memory of the worker that sent it.

    The collectives of step 2 are waited for in the hook's thread (collectives must be issued in
    the same order on every rank, see :class:`SharedIndexAllreduce`); step 4 is the future.  The
    bytes of step 2 depend on where the entries fall; :meth:`wire_bytes` assumes an even spread.
    Values travel in fp32 whatever the payload's value dtype.

    Not in the default transports of :class:`~ec_hooks.ErrorFeedbackState` (it aggregates ``k``
    entries per step where the allgather aggregates up to ``n k``): add it with
    ``state.transports += (SparseAllreduce(),)``; it is then chosen by bytes like the others.
    """

    name = "sparse_allreduce"
    status_bytes = 4

    def accepts(self, compressor):
        return not compressor.summable and compressor.index_value_pairs

    @staticmethod
    def kept_per_worker(k: int, n: int) -> int:
        return -(-k // n)

    def wire_bytes(self, compressor, numel, dtype, n):
        k = compressor.entries_sent(numel)
        counts = (n - 1) * 8
        spread = (n - 1) / n * k * 8
        return counts + spread + (n - 1) * (self.kept_per_worker(k, n) * 8 + self.status_bytes)

    def start(self, out, group=None):
        compressor, payload, n, me = out.compressor, out.payload, world_size(group), out.rank
        numel = payload.numel
        indices, values = compressor.decode(payload)
        # Fillers and tail slots of the compact format carry 0: nothing to send.
        nonzero = values != 0
        indices, values = indices[nonzero], values[nonzero]
        device = indices.device
        bounds = torch.tensor([j * numel // n for j in range(n + 1)], device=device)
        owner = torch.bucketize(indices, bounds[1:-1], right=True)
        send_counts = torch.bincount(owner, minlength=n)
        pairs = torch.stack([indices.to(torch.int32), values.float().view(torch.int32)], dim=1).reshape(-1)
        if n > 1:
            recv_counts = torch.empty_like(send_counts)
            dist.all_to_all_single(recv_counts, send_counts, group=group, async_op=True).wait()
            received = torch.empty(2 * int(recv_counts.sum()), dtype=torch.int32, device=device)
            dist.all_to_all_single(
                received,
                pairs,
                output_split_sizes=(2 * recv_counts).tolist(),
                input_split_sizes=(2 * send_counts).tolist(),
                group=group,
                async_op=True,
            ).wait()
        else:
            received = pairs
        received = received.view(-1, 2)
        start, stop = int(bounds[me]), int(bounds[me + 1])
        region = torch.zeros(stop - start, dtype=torch.float32, device=device)
        local = received[:, 0].long() - start
        region.index_add_(0, local, received[:, 1].view(torch.float32))
        candidates = torch.unique(local)
        m = self.kept_per_worker(compressor.entries_sent(numel), n)
        take = min(m, candidates.numel())
        best = torch.topk(region[candidates].abs(), take, sorted=False).indices
        kept = candidates[best].sort().values
        # Padding: index -1, value 0 (never matches an index, adds nothing).
        kept_index = torch.full((m,), -1, dtype=torch.int32, device=device)
        kept_value = torch.zeros(m, dtype=torch.float32, device=device)
        kept_index[:take] = (kept + start).to(torch.int32)
        kept_value[:take] = region[kept]
        wire = torch.cat([kept_index, kept_value.view(torch.int32), _status(out.finite).view(torch.int32)])
        fut = allgather(wire, group)
        off_self = int(send_counts.sum() - send_counts[me])

        def deliver(fut: torch.futures.Future) -> Delivery:
            rows = fut.value()
            all_index = rows[:, :m].reshape(-1).long()
            all_value = rows[:, m : 2 * m].contiguous().view(torch.float32).reshape(-1)
            status_all = rows[:, 2 * m :].contiguous().view(torch.float32)
            valid = all_index >= 0
            all_index, all_value = all_index[valid], all_value[valid]
            mean = torch.zeros(numel, dtype=torch.float32, device=device)
            mean.index_add_(0, all_index, all_value / n)
            mine = torch.isin(indices, all_index)
            sent_index, sent_value = indices[mine], values[mine].float()

            def update_memory(memory, scale=None):
                memory.view(-1).index_add_(
                    0, sent_index, sent_value if scale is None else sent_value * scale, alpha=-1
                )

            # only the kept entries left this worker's memory
            return Delivery(mean, status_all.sum() == 0, update_memory, lambda: sent_index)

        bytes_sent = 0 if n == 1 else (n - 1) * 8 + 8 * off_self + wire.numel() * 4
        return fut.then(deliver), bytes_sent


# ---------------------------------------------------------------------- neighbour messages (gossip)


class NeighbourExchange:
    """Gossip messages to and from this step's neighbours, over ``torch.distributed``.

    :meth:`post` keeps what to send; :meth:`collect` sends it and receives (one
    ``batch_isend_irecv``, blocking; see :func:`exchange`).
    """

    def __init__(self, group=None) -> None:
        self.group = group
        self._sends: dict[int, dict[int, torch.Tensor]] = {}

    @staticmethod
    def wire_bytes(payload_bytes: int, n_sends: int) -> int:
        return payload_bytes * n_sends

    def post(self, sender: int, sends: Mapping[int, torch.Tensor]) -> None:
        self._sends[sender] = dict(sends)

    def collect(self, receiver: int, recvs: Mapping[int, torch.Tensor]) -> Mapping[int, torch.Tensor]:
        return exchange(self._sends.pop(receiver, {}), recvs, self.group)


class InMemoryExchange(NeighbourExchange):
    """The same messages for ``n`` workers simulated in one process: every worker posts (a
    copy: a payload may alias its sender's model, which mixing changes), then every worker
    collects what was posted to it."""

    def __init__(self) -> None:
        super().__init__(None)
        self._mailbox: dict[tuple[int, int], torch.Tensor] = {}

    def post(self, sender, sends):
        for peer, tensor in sends.items():
            self._mailbox[(sender, peer)] = tensor.clone()

    def collect(self, receiver, recvs):
        for peer, tensor in recvs.items():
            message = self._mailbox.pop((peer, receiver), None)
            if message is None:
                raise RuntimeError(
                    f"simulated worker {receiver} expects a message from {peer}, none was posted: "
                    "step every worker together (simulate_step)"
                )
            tensor.copy_(message)
        return recvs
