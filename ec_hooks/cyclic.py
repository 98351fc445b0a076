"""Shared-index top-k: ScaleCom's cyclic local top-k (Chen et al., NeurIPS 2020).

Top-k payloads of different workers cannot be summed (each worker picks other indices), so they
are allgathered and every worker puts ``n - 1`` payloads on the wire.  With a *shared* index set
they can: at step ``t`` one worker, the leader, picks the ``k`` indices from its own
error-compensated gradient and broadcasts them; every worker takes its values at those indices;
one allreduce sums the values.  The bytes per worker no longer grow with ``n``.

A single leader picks from its own memory, a noisy picture of the sum the step applies.  With
``selection="candidates"`` every worker nominates its strongest entries, the values at the
union are summed, and the ``k`` largest sums are applied: the shared indices are chosen from
the sum itself, still at bytes per worker that do not grow with ``n``.

:class:`CyclicTopK` only says which indices and which values; the collectives belong to
:class:`ec_hooks.transport.SharedIndexAllreduce` (leader) and
:class:`ec_hooks.transport.CandidateAllreduce` (candidates), which the hook picks for it.
"""

from __future__ import annotations

import logging
import math
import numbers

import torch

from ec_hooks.compressors.base import Compressor, Payload
from ec_hooks.compressors.sparse import entries_for
from ec_hooks.compressors.topk import BACKENDS as _BACKENDS
from ec_hooks.compressors.wire import delta16_capacity as _delta16_capacity
from ec_hooks.compressors.wire import delta16_decode as _delta16_decode
from ec_hooks.compressors.wire import delta16_encode as _delta16_encode
from ec_hooks.compressors.wire import half_dtype as _value_dtype
from ec_hooks.compressors.wire import pad as _pad
from ec_hooks.kernels import error_feedback_topk_, to_wire, topk_magnitude
from ec_hooks.validation import check_choice, check_density

__all__ = ["SELECTIONS", "CyclicTopK"]

logger = logging.getLogger(__name__)

#: how the shared index set is chosen (see :class:`CyclicTopK`)
SELECTIONS = ("leader", "candidates")


class CyclicTopK(Compressor):
    """Top-k on indices chosen by one worker per step, in turn (ScaleCom's cyclic local top-k).

    For a bucket with key ``key`` at step ``t`` on ``n`` workers:

    1. The leader ``(t + key) mod n`` selects the ``k = ceil(density * d)`` entries of largest
       magnitude of its error-compensated buffer and encodes their positions as uint16 gaps
       (the ``delta16`` format of :class:`~ec_hooks.compressors.TopK`: ``S = k + floor((d - k) /
       65535)`` slots, 2 bytes each, fixed for ``d``).  The key spreads the leaders (and their
       selection work) over the workers when a model has several buckets.
    2. The index message is broadcast; every worker decodes it and takes its own values at those
       positions (:meth:`compress_at`), in ``value_dtype`` (default: the gradient's dtype).
    3. The ``S`` values are summed by one allreduce (``summable``); what a worker did not send
       stays in its memory, as for every compressor.

    Filler slots of the gap format (gaps above 65535) carry the value at the filler's position,
    so they are sent and subtracted like any entry; tail slots carry 0.

    With ``selection="candidates"`` the index set is chosen from the sum instead
    (:class:`~ec_hooks.transport.CandidateAllreduce`):

    1. every worker nominates the ``m = ceil(candidates * k / n)`` entries of largest magnitude
       of its own compensated buffer (:meth:`nominate`, the same gap format with ``m`` entries);
    2. the nominations are allgathered (``n m``, about ``candidates k``, positions in all, 2
       bytes each; the broadcast of step 2 above moves ``k``) and their union ``U`` is decoded
       identically on every worker;
    3. one allreduce sums every worker's values at ``U`` (at most ``n m`` values);
    4. the ``k`` entries of ``U`` with the largest summed magnitude are applied
       (:meth:`keep`); every worker takes its own values there out of its memory, and what it
       sent at the other entries of ``U`` stays in its memory, as if it had not been sent.

    The entries applied are the top-``k`` of the summed buffer whenever those are among the
    candidates, which every worker's strongest entries are.  Bytes per worker stay constant in
    ``n``: about ``(n - 1) / n (2 candidates k)`` index bytes for the allgather plus
    ``2 (n - 1) / n (4 candidates k)`` for the ring allreduce of fp32 values, about twice the
    leader's at the default ``candidates = 2``.

    ScaleCom's low-pass filter (``memory_filter = beta < 1``) replaces the memory update
    ``m = acc - c`` by ``m = (1 - beta) m + beta (acc - c)``, i.e. ``m += beta (g - c)``: it keeps
    the workers' memories closer to each other, so that the leader's indices serve everybody,
    at the price of *dropping* ``(1 - beta) (g - c)`` per step.  That mass is lost on purpose
    (the conservation invariant reads ``m_T = beta * sum_t (g_t - c_t)``); the default ``1.0`` is
    plain error feedback and loses nothing.

    Args:
        density: fraction of entries kept, in (0, 1].
        value_dtype: ``None`` (the gradient's dtype), ``torch.bfloat16`` or ``torch.float16``
            (also ``"bf16"``, ...): the dtype in which the values are summed.
        memory_filter: ScaleCom's ``beta`` in (0, 1]; 1 (default) is plain error feedback.
        backend: selection backend of the leader (see :func:`ec_hooks.kernels.topk_magnitude`).
        selection: ``"leader"`` (default: ScaleCom's leader in turn) or ``"candidates"`` (the
            ``k`` largest sums among every worker's nominated entries).
        candidates: with ``selection="candidates"``, how many entries each worker nominates, in
            units of ``k / n`` (default 2.0; at least 1).
    """

    summable = True
    #: one worker chooses the indices and the others follow (see SharedIndexAllreduce)
    shares_indices = True
    #: ``MemSGDStrategy`` keeps the optimizer's momentum (plain error feedback) by default.  With
    #: the momentum in the hook, each worker's velocity keeps refilling its memory with its own
    #: past gradients after the shared indices cleared every memory there, so the leader's
    #: memory is a noisier picture of the sum it selects for (main job, 3 seeds: 1.8 points
    #: lower than plain error feedback; with the indices of the summed memory, no difference).
    prefers_momentum_correction = False
    name = "cyclic_topk"
    density: float
    memory_filter: float
    candidates: float

    def __init__(
        self,
        density: float = 0.01,
        value_dtype=None,
        memory_filter: float = 1.0,
        backend: str = "auto",
        selection: str = "leader",
        candidates: float = 2.0,
    ):
        self.density = check_density(density)
        self.value_dtype = _value_dtype(value_dtype)
        if (
            isinstance(memory_filter, bool)
            or not isinstance(memory_filter, numbers.Real)
            or not 0.0 < float(memory_filter) <= 1.0
        ):
            raise ValueError(
                f"memory_filter must be a float in (0, 1] (ScaleCom's beta; 1 = plain error "
                f"feedback), got {memory_filter!r}"
            )
        self.memory_filter = float(memory_filter)
        self.backend = check_choice("backend", backend, _BACKENDS)
        self.selection = check_choice("selection", selection, SELECTIONS)
        if isinstance(candidates, bool) or not isinstance(candidates, numbers.Real) or not candidates >= 1.0:
            raise ValueError(
                f"candidates must be a number >= 1 (entries each worker nominates, in units of k / n), "
                f"got {candidates!r}"
            )
        if selection == "leader" and candidates != 2.0:
            raise ValueError(
                f"candidates={candidates!r} is only used with selection='candidates' (the leader selects "
                "k entries itself)"
            )
        self.candidates = float(candidates)
        #: the index set is chosen from the summed values of every worker's nominations
        #: (see CandidateAllreduce) rather than by one leader (SharedIndexAllreduce)
        self.selects_from_candidates = self.selection == "candidates"

    def _repr_args(self):
        args = {"density": self.density}
        if self.value_dtype is not None:
            args["value_dtype"] = self.value_dtype
        if self.memory_filter != 1.0:
            args["memory_filter"] = self.memory_filter
        if self.backend != "auto":
            args["backend"] = self.backend
        if self.selection != "leader":
            args["selection"] = self.selection
            args["candidates"] = self.candidates
        return args

    def k_for(self, numel: int) -> int:
        """``k = ceil(density * numel)``, as top-k counts it."""
        return entries_for(self.density, numel)

    def entries_sent(self, numel: int) -> int:
        """``k``: tail slots and ``delta16`` fillers carry no entry of the tensor."""
        return self.k_for(numel)

    def slots_for(self, numel: int) -> int:
        return _delta16_capacity(numel, self.k_for(numel))

    @staticmethod
    def leader(step: int, key: int, world_size: int) -> int:
        """The rank that chooses the indices of bucket ``key`` at ``step``."""
        return (step + key) % world_size

    # -------------------------------------------------------------- the leader's index message

    def index_bytes(self, numel: int, count: int | None = None) -> int:
        """Bytes of an index message of ``count`` entries (default ``k``) for a tensor of
        ``numel`` entries (2 per slot, padded)."""
        count = self.k_for(numel) if count is None else count
        return _pad(2 * _delta16_capacity(numel, count))

    def select(self, x: torch.Tensor, count: int | None = None) -> torch.Tensor:
        """The leader's index message: the top-``count`` (default ``k``) positions of ``x`` as
        uint8 bytes."""
        flat = x.reshape(-1)
        count = self.k_for(flat.numel()) if count is None else count
        indices = topk_magnitude(flat, count, backend=self.backend)
        gaps, _ = _delta16_encode(
            indices, flat.new_zeros(indices.numel()), _delta16_capacity(flat.numel(), count)
        )
        out = torch.zeros(self.index_bytes(flat.numel(), count), dtype=torch.uint8, device=x.device)
        out[: 2 * gaps.numel()] = gaps.view(torch.uint8)
        return out

    def empty_index_message(self, numel: int, device) -> torch.Tensor:
        """The buffer a follower receives the index message into."""
        return torch.empty(self.index_bytes(numel), dtype=torch.uint8, device=device)

    def decode_indices(
        self, message: torch.Tensor, numel: int, count: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Slot positions (int64) and a mask of the slots that carry an entry (not the tail) of
        an index message of ``count`` entries (default ``k``)."""
        count = self.k_for(numel) if count is None else count
        slots = _delta16_capacity(numel, count)
        if message.numel() != self.index_bytes(numel, count):
            raise ValueError(
                f"CyclicTopK index message has {message.numel()} bytes, expected "
                f"{self.index_bytes(numel, count)} for a tensor of {numel} entries"
            )
        gaps = message[: 2 * slots].view(torch.int16)
        indices = _delta16_decode(gaps)
        # Tail slots repeat the last index with gap 0; slot 0 is an entry even with gap 0 (index 0).
        used = gaps != 0
        used[0] = True
        if indices.device.type == "cpu" and int(indices[-1]) >= numel:
            raise ValueError(
                f"CyclicTopK index message points past the tensor ({int(indices[-1])} >= {numel}): "
                "corrupted or mismatched message (do all workers use the same model?)"
            )
        return indices.clamp_(max=numel - 1), used

    # -------------------------------------------------------------- candidates (selection="candidates")

    def candidates_for(self, numel: int, world_size: int) -> int:
        """Entries each worker nominates: ``ceil(candidates * k / n)``, at most ``numel``."""
        return min(numel, math.ceil(self.candidates * self.k_for(numel) / world_size))

    def nominate(self, x: torch.Tensor, world_size: int) -> torch.Tensor:
        """This worker's nominations: the index message of its top :meth:`candidates_for` entries."""
        return self.select(x, self.candidates_for(x.numel(), world_size))

    def union_of(self, messages: torch.Tensor, numel: int, world_size: int) -> torch.Tensor:
        """The sorted union (int64) of the nominations, one message per row of ``messages``."""
        count = self.candidates_for(numel, world_size)
        found = []
        for message in messages:
            indices, used = self.decode_indices(message, numel, count)
            found.append(indices[used])
        return torch.unique(torch.cat(found))

    def keep(self, summed: torch.Tensor, numel: int) -> torch.Tensor:
        """Positions in ``summed`` (the values summed at the union) of the ``k`` largest
        magnitudes, ascending; the same on every worker, which holds the same sums."""
        k = min(self.k_for(numel), summed.numel())
        return torch.topk(summed.abs().float(), k, sorted=False).indices.sort().values

    def values_at(
        self, x: torch.Tensor, indices: torch.Tensor, wire_dtype: torch.dtype | None = None
    ) -> Payload:
        """This worker's values of ``x`` at ``indices`` (every slot an entry)."""
        values = x.reshape(-1)[indices]
        return Payload(
            data=to_wire(values, self.value_dtype or wire_dtype or x.dtype), shape=x.shape, indices=indices
        )

    # -------------------------------------------------------------- every worker's values

    def compress_at(
        self, x: torch.Tensor, message: torch.Tensor, wire_dtype: torch.dtype | None = None
    ) -> Payload:
        """This worker's values of ``x`` at the positions of the leader's index message."""
        flat = x.reshape(-1)
        indices, used = self.decode_indices(message, flat.numel())
        values = torch.where(used, flat[indices], 0)
        return Payload(
            data=to_wire(values, self.value_dtype or wire_dtype or x.dtype), shape=x.shape, indices=indices
        )

    def compress(self, x, *, step=0, key=0, rank=0, wire_dtype=None):
        """One worker's view: it is its own leader (what the hook does with ``world_size == 1``)."""
        return self.compress_at(x, self.select(x), wire_dtype)

    def compress_error_feedback_(
        self, memory: torch.Tensor, grad: torch.Tensor, *, step=0, key=0, rank=0, wire_dtype=None
    ) -> tuple[None, torch.Tensor]:
        """``memory += grad`` (finite entries only) with the kernels' fast accumulation; no
        payload yet (``None``): it depends on the leader's indices, which the transport gets.
        Returns ``(None, grad_finite)``."""
        accumulated = error_feedback_topk_(
            memory, grad, 0, wire_dtype=torch.float32, subtract_sent=False, backend=self.backend
        )
        return None, accumulated.grad_finite

    def decompress(self, payload):
        out = torch.zeros(payload.numel, dtype=torch.float32, device=payload.data.device)
        out.index_put_((payload.indices,), payload.data.float(), accumulate=True)
        return out.view(payload.shape)

    def sent_indices(self, payload):
        # tail slots repeat the last entry's index, which was sent anyway
        return payload.indices

    def subtract_sent_(self, acc, payload, scale=None):
        # The rounded values are subtracted, so the rounding of bf16 values stays in memory.
        values = payload.data.to(acc.dtype)
        acc.view(-1).index_add_(0, payload.indices, values if scale is None else values * scale, alpha=-1)

    def update_memory_(
        self, memory: torch.Tensor, payload: Payload, grad: torch.Tensor, scale: torch.Tensor | None = None
    ) -> None:
        """``memory`` holds ``acc = m + g``: make it ``acc - c`` (or, with the filter,
        ``m + beta (g - c) = acc - beta c - (1 - beta) g``)."""
        beta = self.memory_filter
        if beta == 1.0:
            self.subtract_sent_(memory, payload, scale)
            return
        self.subtract_sent_(memory, payload, beta if scale is None else scale * beta)
        g = grad.reshape(-1)
        dropped = torch.where(torch.isfinite(g), g, 0).to(memory.dtype).mul_(1.0 - beta)
        memory.view(-1).sub_(dropped if scale is None else dropped * scale)

    def wire_bytes(self, numel, dtype=torch.float32):
        """Bytes of this worker's values (the index message is the transport's, see
        :meth:`index_bytes`)."""
        return self.slots_for(numel) * torch.empty((), dtype=self.value_dtype or dtype).element_size()
