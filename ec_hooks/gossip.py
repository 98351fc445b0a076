"""Decentralized training: DeepSqueeze, CHOCO-SGD and D-PSGD gossip over a sparse topology.

There is no allreduce: every worker keeps its own model ``x_i`` and, after each optimizer step,
mixes it with what its neighbours send::

    gossip = DeepSqueeze(model.parameters(), topology="ring", compressor=TopK(density=0.01))
    for x, y in loader:
        loss_fn(model(x), y).backward()
        optimizer.step(); optimizer.zero_grad()
        gossip.step()                      # compress, exchange with neighbours, mix (in place)
    gossip.average_into(model)             # the mean model x_bar, in place: evaluate and save it

All parameters are flattened into one fp32 buffer, so each step sends one message per neighbour
(``transport.exchange``, one ``batch_isend_irecv``; no barrier).  Messages are the compressors'
payloads (top-k index/value pairs, bit-packed signs, QSGD codes, ...), so the bytes on the wire
shrink by the compression ratio.  Compressor randomness: rand-k draws its indices from
``(seed, step)`` and every worker draws the *same* indices at a step, so only the ``k`` values
travel and a receiver rebuilds the sender's payload from its own indices; QSGD's rounding noise
is drawn per rank (independent across workers).

Gossip needs a *contraction* ``E||C(x) - x||^2 <= (1 - delta) ||x||^2``.  Top-k, rand-k (unscaled)
and scaled sign are; QSGD is unbiased instead, with variance up to ``omega ||x||^2``,
``omega = min(d / s^2, sqrt(d) / s)`` for ``s`` levels; used as is it drove the workers apart at
every consensus step tried (0.005 to 1).  Its decoded values are therefore multiplied by
``1 / (1 + omega)`` on both ends, the rescaling of Koloskova et al. (2019), which makes it a
contraction with ``delta = 1 / (1 + omega)``.
Over a whole flattened model ``omega`` is large (about ``sqrt(d) / s``), so QSGD mixes slowly.

Mixing matrices come from :class:`~ec_hooks.topology.Topology`; ``W_ij(t)`` is the weight worker
``i`` gives to ``j`` at step ``t``.  Every topology is doubly stochastic (columns sum to 1 as well
as rows), which is what keeps the mean model ``x_bar`` moving exactly as the mean of the local
optimizer steps, for every algorithm and compressor.

The consensus distance is ``sqrt((1/n) sum_i ||x_i - x_bar||^2)`` over the flattened parameters
(the root-mean-square distance of the workers' models to their mean).  A divergence watch
measures it every ``watch_every`` steps and warns when it keeps growing.

Nothing non-finite is ever mixed.  Every message ends with its sender's status word (as in the
DDP hook: one element of a numeric payload, 4 bytes after a byte payload): whether the sender's
model after its optimizer step, or the message itself (from a non-finite ``delta`` or
``x_hat``), has an inf or NaN entry, and whether its parameters were replaced.  A worker that
sees a non-zero status -- its own or a neighbour's -- raises :class:`GossipRefusedError` naming
the worker and the step, before it mixes anything or changes a buffer.  It stops rather than
voiding the step (as the DDP hook does for an overflowing gradient) because here the damage is
in the worker's model itself (the optimizer step wrote it) and gossip keeps no earlier copy: a
voided step would be voided again at every later step while the run went on without mixing.
Restore every worker from the last checkpoint.  (An AMP overflow never gets this far: the
GradScaler skips the optimizer step, and the Lightning strategies then skip the gossip on every
worker.)  Workers that did not receive the message stop at their next exchange with one that
raised (its connection closes when its process ends).

Parameters replaced behind the gossip's back (``model.load_state_dict(sd, assign=True)``, or a
new ``nn.Parameter`` assigned to a module) are noticed through torch's module parameter
registration hook: the gossip would otherwise keep mixing the old tensors.  The next
:meth:`~GossipAlgorithm.step` raises :class:`GossipRefusedError` saying what to do.

16-bit models (fp16, bf16) are mixed in fp32 and keep an fp32 master copy of the model: writing
the mixed model back in 16 bits each step would round away consensus steps smaller than half a
unit in the last place (CHOCO-SGD stalled at a consensus distance of 0.11 instead of 1.6e-6,
and the mean model moved by 0.03; ``docs/gossip-faults.md``).  The optimizer's change to the
16-bit parameters since the last write-back is added to the master copy, the master copy is
mixed, and the parameters receive it rounded.  The master copy is part of the state dict.

Everything here also runs as a single-process simulation of ``n`` workers
(:meth:`GossipAlgorithm.simulated` + :func:`simulate_step`) with the very same update code, for
experiments such as ``benchmarks/consensus_step.py``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence

import torch
import torch.distributed as dist

from ec_hooks import agreement, transport
from ec_hooks.compressors import Compressor, Identity, Payload, TopK, make_compressor
from ec_hooks.divergence import DivergenceWatch
from ec_hooks.gossip_average import ModelAverage
from ec_hooks.gossip_checkpoint import GossipCheckpoint
from ec_hooks.gossip_flat import FlatModel, collect_params
from ec_hooks.gossip_simulation import simulate_step, simulated_consensus_distance
from ec_hooks.gossip_status import GossipRefusedError, StatusChecks, watch_replacements, without_status
from ec_hooks.stats import CommStats
from ec_hooks.topology import Topology
from ec_hooks.validation import check_unit_interval

__all__ = [
    "GossipAlgorithm",
    "GossipRefusedError",
    "DeepSqueeze",
    "ChocoSGD",
    "DPSGD",
    "contraction_scale",
    "default_consensus_step",
    "simulate_step",
    "simulated_consensus_distance",
]

logger = logging.getLogger(__name__)

# The name ec_hooks.hierarchical imports.
_collect_params = collect_params


def default_consensus_step(algorithm: str, compressor: Compressor) -> float:
    """The consensus step used when ``consensus_step=None``.

    Measured with ``benchmarks/consensus_step.py`` (8 simulated workers on a ring and on the
    exponential graph) and ``benchmarks/gossip_logreg.py`` (8 gloo workers, logistic regression on
    heterogeneous shards); the figures are in ``docs/consensus-step.md``.  A step qualifies when, on both graphs,
    the steady-state consensus distance under per-step noise stays below that of no gossip at all,
    independent random models contract (final/initial < 0.5 after 1000 steps), and it is at most
    half the smallest step that diverged in any of the runs.  DeepSqueeze takes the largest
    qualifying step (training loss improves with the step up to instability); CHOCO-SGD, stable over
    a wider range, takes a step between the one with the smallest distance and the largest
    qualifying one:

    ===============  ======================================  ======================================
    compressor       DeepSqueeze ``eta``                     ChocoSGD ``gamma``
    ===============  ======================================  ======================================
    TopK(density)    density, within [0.005, 0.5]            2 * density, within [0.01, 1]
    RandK(density)   0.5 * density, within [0.002, 0.25]     0.5 * density, within [0.002, 0.5]
    ScaledSign       0.1                                     0.5
    QSGD(levels)     0.007 * levels, within [0.005, 0.1]     0.03 * levels, within [0.02, 0.5]
    Identity, casts  1                                       1
    other            0.01                                    0.1
    ===============  ======================================  ======================================

    DeepSqueeze compresses the model itself, so what it does not send (kept in ``delta``) is of
    the model's size and only small steps keep it from pushing the workers apart; CHOCO-SGD
    compresses differences that shrink as the workers agree and takes larger steps.  D-PSGD uses 1.
    Each compressor declares its rules (:attr:`~ec_hooks.compressors.Compressor.consensus_steps`).

    Args:
        algorithm: ``"deepsqueeze"``, ``"choco"`` or ``"dpsgd"``.
        compressor: the compressor in use.
    """
    if algorithm not in GOSSIP_ALGORITHMS:
        raise ValueError(f"algorithm must be one of {sorted(GOSSIP_ALGORITHMS)}, got {algorithm!r}")
    return compressor.default_consensus_step(algorithm)


#: the algorithms' keys of :func:`default_consensus_step`
GOSSIP_ALGORITHMS = ("deepsqueeze", "choco", "dpsgd")


def contraction_scale(compressor: Compressor, numel: int) -> float:
    """Factor applied to decoded payloads so that ``compressor`` is a contraction (see above)."""
    return compressor.contraction_scale(numel)


class GossipAlgorithm(FlatModel, StatusChecks, ModelAverage, GossipCheckpoint):
    """Base class: the gossip step (compress, exchange with neighbours, mix) and its statistics.

    The other jobs live in their own units: the flat model and its master copy
    (:class:`~ec_hooks.gossip_flat.FlatModel`), the status words and refusals
    (:class:`~ec_hooks.gossip_status.StatusChecks`), the mean model
    (:class:`~ec_hooks.gossip_average.ModelAverage`), state dicts
    (:class:`~ec_hooks.gossip_checkpoint.GossipCheckpoint`), the divergence watch
    (:class:`~ec_hooks.divergence.DivergenceWatch`) and the single-process simulation
    (:mod:`ec_hooks.gossip_simulation`).

    Args:
        params: the model's parameters (an iterable of tensors, or optimizer param groups).
        topology: a :class:`Topology`, a name from ``ec_hooks.topology.TOPOLOGY_NAMES``, or a
            mixing matrix; its size must be the process group's size.
        compressor: a :class:`~ec_hooks.compressors.Compressor` or a name from
            ``ec_hooks.COMPRESSOR_NAMES`` (default ``TopK(density=0.01)``).
        consensus_step: the step ``eta`` (or ``gamma``) in (0, 1] of the mixing; ``None`` picks
            :func:`default_consensus_step` for the compressor.
        process_group: the group to gossip in (default: the world).  Ranks in the topology are
            ranks in this group.
        watch_every: measure the consensus distance every this many steps (one allreduce of the
            model in fp64 and one of a scalar; 0 turns the watch off).  Every rank must use the
            same value.  This traffic is not counted in :attr:`stats`, which counts gossip only.
        watch_patience: warn when the distance grew at this many consecutive checks ...
        watch_growth: ... each time by at least this factor (> 1), and is at least
            ``watch_min_relative`` (1%) of the mean model's norm.  Geometric growth is the
            signature of a consensus step too large for the compressor; the slower, polynomial
            growth of a run that starts from identical models (or warms its learning rate up)
            does not pass this test, nor does growth far below the scale of the model.
        hierarchical: average exactly inside each node and gossip between nodes, with
            ``topology`` over the nodes (:class:`ec_hooks.hierarchical.HierarchicalGossip`).
        nodes: with ``hierarchical``, the global ranks of every node; default
            ``LOCAL_WORLD_SIZE`` consecutive ranks per node.

    Attributes:
        params, topology, compressor, consensus_step, iteration (steps taken), stats
        (:class:`~ec_hooks.stats.CommStats`: ``bytes_sent`` to neighbours vs ``bytes_dense``, the
        bytes of a dense allreduce of the model; ``residual_norm``), last_consensus_distance.
    """

    #: key of :func:`default_consensus_step`
    algorithm = "gossip"
    #: the watch ignores distances below this fraction of ``||x_bar||``
    watch_min_relative = 0.01
    #: dtype in which ``sum_j W_ij c_j`` is accumulated
    _mix_dtype = torch.float32
    #: buffers kept in another dtype than fp32
    _buffer_dtypes: dict[str, torch.dtype] = {}

    def __new__(cls, *args, hierarchical: bool = False, nodes=None, **kwargs):
        # hierarchical=True: exact averaging inside each node, this algorithm between the nodes
        # (ec_hooks.hierarchical.HierarchicalGossip; ``topology`` is then over the nodes).
        if not isinstance(hierarchical, bool):
            raise ValueError(f"hierarchical must be True or False, got {hierarchical!r}")
        if hierarchical:
            from ec_hooks.hierarchical import HierarchicalGossip

            return HierarchicalGossip(cls, *args, nodes=nodes, **kwargs)
        if nodes is not None:
            raise ValueError("nodes is only used with hierarchical=True")
        return super().__new__(cls)

    def __init__(
        self,
        params: Iterable[torch.Tensor],
        topology: Topology | str = "ring",
        compressor: Compressor | str | None = None,
        consensus_step: float | None = None,
        process_group: dist.ProcessGroup | None = None,
        *,
        watch_every: int = 100,
        watch_patience: int = 3,
        watch_growth: float = 1.5,
        hierarchical: bool = False,
        nodes=None,
    ) -> None:
        self._setup(
            params,
            topology,
            compressor,
            consensus_step,
            process_group,
            transport.rank_in(process_group),
            transport.world_size(process_group),
            watch_every,
            watch_patience,
            watch_growth,
        )
        self._simulated = False
        self._exchange = transport.NeighbourExchange(process_group)

    @classmethod
    def simulated(
        cls,
        params_per_worker: Sequence[Iterable[torch.Tensor]],
        topology: Topology | str = "ring",
        compressor: Compressor | str | None = None,
        consensus_step: float | None = None,
    ) -> list[GossipAlgorithm]:
        """``n`` workers in this process (no ``torch.distributed``), one per parameter list.

        Step them all together with :func:`simulate_step`: the same update code as
        :meth:`step`, with messages handed over in memory.  For experiments and tests.  The
        divergence watch is off (it needs collectives); see :func:`simulated_consensus_distance`.
        """
        n = len(params_per_worker)
        workers = []
        mailbox = transport.InMemoryExchange()
        for rank, params in enumerate(params_per_worker):
            worker = cls.__new__(cls)
            worker._setup(params, topology, compressor, consensus_step, None, rank, n, 0, 3, 1.5)
            worker._simulated = True
            worker._exchange = mailbox
            workers.append(worker)
        return workers

    def _setup(
        self,
        params,
        topology,
        compressor,
        consensus_step,
        process_group,
        rank,
        world_size,
        watch_every,
        watch_patience,
        watch_growth,
    ) -> None:
        self._setup_flat(params)
        self.process_group = process_group
        self.rank, self.world_size = rank, world_size
        self.topology = Topology.make(topology, world_size)
        self.compressor = self._resolve_compressor(compressor)
        if self.compressor.shares_indices:
            raise ValueError(
                f"compressor {self.compressor!r} shares one worker's indices through a broadcast to all workers; "
                "gossip talks to neighbours only, and each worker compresses its own model: use TopK"
            )
        if consensus_step is None:
            consensus_step = default_consensus_step(self.algorithm, self.compressor)
        self.consensus_step = check_unit_interval(
            "consensus_step", consensus_step, "the eta of W_eff = (1 - eta) I + eta W"
        )
        #: the divergence watch (:class:`~ec_hooks.divergence.DivergenceWatch`)
        self.watch = DivergenceWatch(watch_every, watch_patience, watch_growth, self.watch_min_relative)
        self._check_topology()
        self._decode_scale = contraction_scale(self.compressor, self.numel)
        self.iteration = 0
        self.stats = CommStats()
        self._replaced: list[str] = []
        watch_replacements(self)

    @property
    def watch_every(self) -> int:
        return self.watch.every

    @property
    def watch_patience(self) -> int:
        return self.watch.patience

    @property
    def watch_growth(self) -> float:
        return self.watch.growth

    @property
    def last_consensus_distance(self) -> float | None:
        """The consensus distance measured last (by :meth:`consensus_distance`), or ``None``."""
        return self.watch.last_distance

    @property
    def _mean_norm(self) -> float:
        return self.watch.mean_norm

    @_mean_norm.setter
    def _mean_norm(self, value: float) -> None:
        self.watch.mean_norm = value

    # ------------------------------------------------------------------ subclass interface

    def _resolve_compressor(self, compressor) -> Compressor:
        return make_compressor(TopK(0.01) if compressor is None else compressor)

    def _check_topology(self) -> None:
        """Reject topologies the algorithm cannot use (raise ValueError)."""

    def _outgoing(self, x: torch.Tensor) -> tuple[Payload, torch.Tensor]:
        """Compress what this worker sends; return the payload and its dense fp32 value."""
        raise NotImplementedError

    def _incoming(self, x: torch.Tensor, sent: torch.Tensor, mixed: torch.Tensor) -> None:
        """Update ``x`` in place given ``mixed = sum_j W_ij c_j`` (self included): the gossip step
        ``x += eta (sum_j W_ij c_j - c_i)`` of DeepSqueeze and D-PSGD."""
        x.add_(mixed.sub_(sent), alpha=self.consensus_step)

    def _buffers(self) -> dict[str, torch.Tensor | None]:
        """The per-worker buffers that a state dict carries."""
        return {}

    def _residual(self) -> torch.Tensor | None:
        return None

    def _divergence_advice(self) -> str:
        return "lower consensus_step or use ChocoSGD"

    # ------------------------------------------------------------------ the step

    def step(self) -> None:
        """Compress, exchange with this step's neighbours, mix; updates ``params`` in place.

        Call after ``optimizer.step()`` on every worker.  With one worker it does nothing (but
        counts the step).  Raises :class:`GossipRefusedError`, having changed nothing, when this
        worker's or a neighbour's model or message is not finite, or its parameters were replaced.
        """
        if self._simulated:
            raise RuntimeError("a simulated worker steps with ec_hooks.gossip.simulate_step(workers)")
        if self.world_size == 1:
            self._raise_if_replaced()
            self.iteration += 1
            return
        agreement.check_gossip(self)  # at the first step and after a load: do the ranks agree?
        with torch.no_grad():
            self._complete(*self._post())
        if self.watch.due(self.iteration):
            self._watch(self.consensus_distance())

    def _post(self) -> tuple[torch.Tensor, Payload, torch.Tensor]:
        """Flatten, compress, and post the payload to this step's out-neighbours."""
        x = self._flatten(out=self._scratch("flat", torch.float32))
        payload, sent = self._compress(x)
        self._exchange.post(
            self.rank, {peer: payload.data for peer in self.topology.out_peers(self.rank, self.iteration)}
        )
        return x, payload, sent

    def _complete(self, x: torch.Tensor, payload: Payload, sent: torch.Tensor) -> None:
        """Receive from this step's in-neighbours and mix."""
        recvs = {
            peer: torch.empty_like(payload.data) for peer in self.topology.in_peers(self.rank, self.iteration)
        }
        self._exchange.collect(self.rank, recvs)
        self._finish(x, payload, sent, recvs, len(self.topology.out_peers(self.rank, self.iteration)))

    def _compress(self, x: torch.Tensor) -> tuple[Payload, torch.Tensor]:
        """The message (the payload with the status word appended) and its dense fp32 value."""
        started = time.perf_counter()
        payload, sent = self._outgoing(x)
        self._compress_seconds = time.perf_counter() - started
        return self._with_status(payload, x, sent), sent

    def _finish(
        self, x, payload: Payload, sent: torch.Tensor, recvs: dict[int, torch.Tensor], n_sends: int
    ) -> None:
        self._refuse(payload, recvs)
        weights = self.topology.weights(self.rank, self.iteration)
        # Own term first, then peers in rank order: a fixed order keeps runs bit-reproducible.
        # Products and sums are taken in the mixing dtype, on buffers reused from step to step.
        sent = sent.reshape(-1)
        mixed = self._scratch("mixed", self._mix_dtype)
        if sent.dtype == self._mix_dtype:
            torch.mul(sent, weights.get(self.rank, 0.0), out=mixed)
        else:
            mixed.copy_(sent).mul_(weights.get(self.rank, 0.0))
        for peer in sorted(recvs):
            received = self._decode(payload.with_data(without_status(recvs[peer])))
            if received.dtype != self._mix_dtype:
                received = self._scratch("received", self._mix_dtype).copy_(received)
            mixed.add_(received, alpha=weights[peer])
        self._incoming(x, sent, mixed)
        self._write_back(x)
        numel = self.numel
        self.stats.record(
            bytes_sent=payload.nbytes * n_sends,
            bytes_dense=self.bytes_dense,
            entries_sent=self.compressor.entries_sent(numel),
            entries=numel,
            seconds=self._compress_seconds,
        )
        residual = self._residual()
        if residual is not None:
            self.stats.set_residual("gossip", residual)
        self.stats.end_step()
        self.iteration += 1

    def _decode(self, payload: Payload) -> torch.Tensor:
        dense = self.compressor.decompress(payload).reshape(-1)
        return dense if self._decode_scale == 1.0 else dense.mul_(self._decode_scale)

    def _watch(self, distance: float) -> None:
        """Feed a measured distance to the divergence watch (it warns when the distance keeps growing)."""
        self.watch.observe(
            distance,
            lambda trail: (
                f"{type(self).__name__}: the consensus distance keeps growing ({trail}, checked every "
                f"{self.watch.every} steps, now at step {self.iteration}): the workers' models are drifting "
                f"apart. With compressor {self.compressor!r} and consensus_step={self.consensus_step:g}, "
                f"{self._divergence_advice()}."
            ),
            stacklevel=3,
        )

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(numel={self.numel}, topology={self.topology.name!r}, "
            f"compressor={self.compressor!r}, consensus_step={self.consensus_step:g}, "
            f"rank={self.rank}, world_size={self.world_size})"
        )


class DeepSqueeze(GossipAlgorithm):
    """DeepSqueeze (Tang et al., 2019): gossip of the compressed, error-compensated model.

    For worker ``i``, after the optimizer step has produced ``x_half``, with the fp32 compression
    error ``delta_i`` (zero at the start) and the consensus step ``eta``:

    1. ``v = x_half + delta_i``                      (error compensation)
    2. ``c_i = C(v)``;  ``delta_i = v - c_i``        (what was not sent stays local)
    3. send ``c_i`` to the out-neighbours, receive ``c_j`` from the in-neighbours
    4. ``x_i = x_half + eta * (sum_j W_ij c_j - c_i)``

    The effective mixing matrix is ``(1 - eta) I + eta W``.  The mean model moves exactly as the
    mean of the local optimizer steps whatever ``C`` does (columns of ``W`` sum to 1).  With
    ``Identity()`` and ``eta = 1`` this is D-PSGD, bit for bit.  Too large an ``eta`` for a crude
    compressor lets the workers drift apart: the divergence watch warns.
    """

    algorithm = "deepsqueeze"

    def _outgoing(self, x):
        if getattr(self, "_delta", None) is None:
            self._delta = torch.zeros_like(x)
        v = torch.add(x, self._delta, out=self._scratch("compensated", torch.float32))
        payload = self.compressor.compress(
            v, step=self.iteration, key=0, rank=self.rank, wire_dtype=self.wire_dtype
        )
        return payload, self._decode(payload)

    def _incoming(self, x, sent, mixed):
        # delta changes only once every message is known to be mixable (the step may be refused)
        torch.sub(self._scratch("compensated", torch.float32), sent, out=self._delta)
        super()._incoming(x, sent, mixed)

    def _buffers(self):
        return {"delta": getattr(self, "_delta", None)}

    def _residual(self):
        return self._delta


class DPSGD(GossipAlgorithm):
    """D-PSGD (Lian et al., 2017): uncompressed gossip of the model.

    1. send ``x_half`` (in the model's dtype) to the out-neighbours, receive the ``x_j``
    2. ``x_i = x_half + eta * (sum_j W_ij x_j - x_half)``; with the default ``eta = 1`` that is
       ``x_i = sum_j W_ij x_j``.

    Takes no compressor: ``compressor`` must be ``None`` or :class:`Identity` (use DeepSqueeze or
    ChocoSGD to compress).
    """

    algorithm = "dpsgd"

    def _resolve_compressor(self, compressor):
        if compressor is None:
            return Identity()
        resolved = make_compressor(compressor)
        if not isinstance(resolved, Identity):
            raise ValueError(
                f"compressor must be None or Identity() for DPSGD (it sends uncompressed models), "
                f"got {compressor!r}: use DeepSqueeze or ChocoSGD to compress"
            )
        return resolved

    def _outgoing(self, x):
        payload = self.compressor.compress(
            x, step=self.iteration, key=0, rank=self.rank, wire_dtype=self.wire_dtype
        )
        return payload, self._decode(payload)

    def _divergence_advice(self):
        return (
            "plain gossip never increases the disagreement by itself, so the local steps do: lower the "
            "learning rate or use a better-connected topology"
        )


class ChocoSGD(GossipAlgorithm):
    """CHOCO-SGD (Koloskova, Stich, Jaggi, 2019): gossip of compressed model *differences*.

    Every worker keeps its public copy ``x_hat_i`` (what its neighbours know of it) and, instead
    of one copy per neighbour, the neighbour sum ``sum_j W_ij x_hat_j``, stored relative to its own
    copy as ``d_i = sum_j W_ij x_hat_j - x_hat_i``.  Both start at zero.  After the optimizer step
    has produced ``x_half``, with the consensus step ``gamma``:

    1. ``q_i = C(x_half - x_hat_i)``;  ``x_hat_i += q_i``
    2. send ``q_i`` to the neighbours, receive their ``q_j``
    3. ``d_i += sum_j W_ij q_j - q_i``              (self included in the sum)
    4. ``x_i = x_half + gamma * d_i``               (``= x_half + gamma sum_j W_ij (x_hat_j - x_hat_i)``)

    ``d_i`` is a running sum: a rounding error in it would stay forever and, through step 4, move
    the mean model at a constant speed (in fp32, about 1e-4 of the model's scale per 3000 steps).
    It is therefore kept, and its increments computed, in fp64; relative to its own copy, so that
    it stays small.  Reaches exact consensus with any compressor for a small enough ``gamma``.
    Needs a static topology (``d_i`` is a running sum over fixed weights).
    """

    algorithm = "choco"
    _mix_dtype = torch.float64
    _buffer_dtypes = {"disagreement": torch.float64}

    def _check_topology(self):
        if self.topology.time_varying:
            raise ValueError(
                f"topology must be static for ChocoSGD (it keeps sum_j W_ij x_hat_j - x_hat_i as a running sum over "
                f"fixed weights), got the time-varying {self.topology.name!r}: use DeepSqueeze or DPSGD on it, or a "
                "static topology such as 'exponential'"
            )

    def _outgoing(self, x):
        if getattr(self, "_x_hat", None) is None:
            self._x_hat = torch.zeros_like(x)
            self._disagreement = torch.zeros_like(x, dtype=torch.float64)
        difference = torch.sub(x, self._x_hat, out=self._scratch("difference", torch.float32))
        payload = self.compressor.compress(
            difference, step=self.iteration, key=0, rank=self.rank, wire_dtype=self.wire_dtype
        )
        return payload, self._decode(payload)

    def _incoming(self, x, sent, mixed):
        # x_hat changes only once every message is known to be mixable (the step may be refused)
        self._x_hat.add_(sent)
        # ``mixed`` is fp64, ``sent`` fp32: the subtraction converts ``sent`` exactly.
        self._disagreement.add_(mixed.sub_(sent))
        # The payload (which may alias the difference) has been sent and mixed by now, so the
        # difference's buffer takes d_i rounded to the model's dtype.
        rounded = self._scratch("difference", torch.float32).copy_(self._disagreement)
        x.add_(rounded, alpha=self.consensus_step)
        self._error = torch.sub(x, self._x_hat, out=self._scratch("error", torch.float32))

    def _buffers(self):
        return {"x_hat": getattr(self, "_x_hat", None), "disagreement": getattr(self, "_disagreement", None)}

    def _residual(self):
        return self._error

    def _divergence_advice(self):
        return "lower consensus_step (gamma) or the learning rate"

    def _check_loaded_topology(self, saved):
        weights = saved.get("weights")
        mine = self.topology.weights(self.rank, 0)
        if weights is not None and {int(k): float(v) for k, v in weights.items()} != mine:
            raise ValueError(
                f"state_dict was saved on topology {saved.get('name')!r} with other mixing weights for rank "
                f"{self.rank}: ChocoSGD's disagreement sum_j W_ij x_hat_j - x_hat_i is only valid for the topology it was "
                f"built on ({self.topology.name!r} now)"
            )
