"""The compressor interface and its payload."""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

__all__ = ["CONFIG_VERSION", "Compressor", "Payload", "seed_from"]

#: version of the layout of :meth:`Compressor.config`
CONFIG_VERSION = 1


@dataclass
class Payload:
    """What a compressor puts on the wire for one tensor.

    Attributes:
        data: the tensor that travels.  For summable compressors a numeric tensor that the
            transport may sum across workers; otherwise a flat ``uint8`` buffer.
        shape: shape of the compressed tensor.
        indices: for ``RandK`` the indices every worker derives from the shared seed; they are
            not sent.
        value_dtype: for byte payloads that carry float values (``TopK``), their dtype.
    """

    data: torch.Tensor
    shape: torch.Size
    indices: torch.Tensor | None = None
    value_dtype: torch.dtype | None = None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()

    def with_data(self, data: torch.Tensor) -> Payload:
        """The same payload with other wire data (a peer's, or the sum over workers)."""
        return Payload(data=data, shape=self.shape, indices=self.indices, value_dtype=self.value_dtype)


def seed_from(*values: int) -> int:
    """A 63-bit seed that mixes its inputs well (adjacent steps give unrelated streams)."""
    digest = hashlib.blake2b(repr(values).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


class Compressor:
    """Base class.  Subclasses implement :meth:`compress`, :meth:`decompress`, :meth:`wire_bytes`.

    What a compressor can do is declared here, with the defaults of a plain dense compressor, and
    overridden by the compressors that can do more: :attr:`summable`, :attr:`shares_indices`,
    :attr:`index_value_pairs`, :attr:`prefers_momentum_correction`, :meth:`compress_error_feedback_` (fused on top-k),
    :meth:`contraction_scale` (QSGD) and :meth:`default_consensus_step`.
    """

    #: payloads of different workers may be summed element-wise (then: one allreduce)
    summable: bool = False
    name: str = "compressor"
    #: constructor arguments that may differ across workers: they change how, not what, is computed
    local_args: tuple[str, ...] = ()
    #: one worker chooses the indices and the others send their values there
    #: (:class:`~ec_hooks.transport.SharedIndexAllreduce`); the payload then waits for the leader
    shares_indices: bool = False
    #: with :attr:`shares_indices`: the index set is chosen from the summed values of every
    #: worker's nominations (:class:`~ec_hooks.transport.CandidateAllreduce`), not by one leader
    selects_from_candidates: bool = False
    #: payloads decode to ``(indices, values)`` with :meth:`decode` (the sparse allreduce needs it)
    index_value_pairs: bool = False
    #: ``MemSGDStrategy`` moves SGD's momentum into the hook by default (``ec_hooks.momentum``)
    prefers_momentum_correction: bool = True
    #: fraction of the entries sent, for the compressors that choose how many (top-k, rand-k,
    #: shared-index top-k); the density warm-up sets it on copies.  ``None``: no such choice.
    density: float | None = None
    #: backend of the selection and accumulation kernels (see :mod:`ec_hooks.kernels`)
    backend: str = "auto"
    #: default consensus step per gossip algorithm: a step, or ``(step per unit, min, max)`` with
    #: the unit :meth:`consensus_unit` (see :func:`ec_hooks.gossip.default_consensus_step`)
    consensus_steps: ClassVar[dict[str, float | tuple[float, float, float]]] = {
        "deepsqueeze": 0.01,
        "choco": 0.1,
        "dpsgd": 1.0,
    }

    def compress_error_feedback_(
        self,
        memory: torch.Tensor,
        grad: torch.Tensor,
        *,
        step: int = 0,
        key: int = 0,
        rank: int = 0,
        wire_dtype: torch.dtype | None = None,
    ) -> tuple[Payload | None, torch.Tensor]:
        """``memory += grad`` (finite entries only), then the payload of ``memory``.

        Returns the payload (``None`` for a compressor that :attr:`shares_indices`: its payload
        waits for the leader's indices) and a 0-dim bool, "every gradient entry was finite".
        Compressors with a fused kernel (top-k) override it; this is the reference path.
        """
        finite_entries = torch.isfinite(grad)
        finite = finite_entries.all()
        memory.add_(torch.where(finite_entries, grad, 0))
        payload = (
            None
            if self.shares_indices
            else self.compress(memory, step=step, key=key, rank=rank, wire_dtype=wire_dtype)
        )
        return payload, finite

    def contraction_scale(self, numel: int) -> float:
        """Factor applied to decoded payloads of ``numel`` entries so that the compressor is a
        contraction ``E||C(x) - x||^2 <= (1 - delta) ||x||^2``, as gossip needs: 1 unless the
        compressor is unbiased instead (QSGD)."""
        return 1.0

    def consensus_unit(self) -> float:
        """What the ``(step per unit, min, max)`` rules of :attr:`consensus_steps` multiply."""
        return 1.0

    def default_consensus_step(self, algorithm: str) -> float:
        """The consensus step of gossip ``algorithm`` (``"deepsqueeze"``, ``"choco"``, ``"dpsgd"``)
        with this compressor, from :attr:`consensus_steps`."""
        rule = self.consensus_steps[algorithm]
        if isinstance(rule, tuple):
            per_unit, low, high = rule
            return round(min(high, max(low, per_unit * self.consensus_unit())), 6)
        return float(rule)

    def compress(
        self,
        x: torch.Tensor,
        *,
        step: int = 0,
        key: int = 0,
        rank: int = 0,
        wire_dtype: torch.dtype | None = None,
    ) -> Payload:
        """Compress ``x``.

        Args:
            step, key: identify the call (training step, bucket or tensor id); randomised
                compressors derive their random stream from them, never from the global RNG.
            rank: the caller's rank, for compressors whose randomness must differ across workers.
            wire_dtype: dtype of the values on the wire (default ``x.dtype``); the hook passes the
                gradient's dtype so that an fp32 memory does not double the bytes of bf16 gradients.
        """
        raise NotImplementedError

    def decompress(self, payload: Payload) -> torch.Tensor:
        """Dense fp32 tensor shaped like the compressed one (fp64 when the payload carries fp64 values)."""
        raise NotImplementedError

    def wire_bytes(self, numel: int, dtype: torch.dtype = torch.float32) -> int:
        """Exact bytes one payload for a tensor of ``numel`` entries of ``dtype`` puts on the wire."""
        raise NotImplementedError

    def entries_sent(self, numel: int) -> int:
        """How many of ``numel`` entries a payload carries a value for (all, unless sparse)."""
        return numel

    def sent_indices(self, payload: Payload) -> torch.Tensor | None:
        """Flat indices of the entries this payload sends whole (the memory keeps nothing of them
        but rounding), or ``None`` for a compressor that sends an approximation of every entry.

        Momentum factor masking clears the velocity at these indices: for a sparsifier, the
        entries it emptied; a dense compressor (sign, QSGD, 16-bit casts) would clear every
        entry at every step, which is no momentum at all, so it masks nothing.
        """
        return None

    def sum_payloads(self, payloads: list[Payload]) -> torch.Tensor:
        """Dense fp32 sum of several workers' payloads (the allgather path)."""
        out = self.decompress(payloads[0]).clone()
        for p in payloads[1:]:
            out += self.decompress(p)
        return out

    def subtract_sent_(self, acc: torch.Tensor, payload: Payload, scale: torch.Tensor | None = None) -> None:
        """``acc -= C(acc)`` in place: what stays in the error-feedback memory.

        ``scale`` (a 0-dim tensor, 0 or 1) lets the caller void the update without a host sync.
        """
        sent = self.decompress(payload).view_as(acc)
        acc.sub_(sent if scale is None else sent * scale)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self._repr_args().items())
        return f"{type(self).__name__}({args})"

    def config(self) -> dict[str, Any]:
        """The compressor as a checkpoint records it: ``{"version": 1, "name": ..., "args": {...}}``,
        plain values only (a dtype is its name, ``"bfloat16"``).  Compared field by field when a
        state is loaded (:meth:`config_differences`), so that reprs may change freely."""
        args = {
            k: str(v).removeprefix("torch.") if isinstance(v, torch.dtype) else v
            for k, v in self._repr_args().items()
        }
        return {"version": CONFIG_VERSION, "name": self.name, "args": args}

    def config_differences(self, saved: object) -> list[str]:
        """How the compressor a state was saved with (``saved``: a :meth:`config`, the ``repr``
        string that older checkpoints carry, or ``None`` when none was recorded) differs from
        this one, field by field; empty when it is the same."""
        if saved is None:
            return []
        if isinstance(saved, str):
            return [] if saved == repr(self) else [f"compressor {saved} (saved), {self!r} (here)"]
        if not isinstance(saved, dict) or saved.get("version") != CONFIG_VERSION:
            version = saved.get("version") if isinstance(saved, dict) else None
            return [
                f"compressor config of version {version!r} ({saved!r}), this version reads {CONFIG_VERSION}"
            ]
        mine = self.config()
        differences = (
            []
            if saved.get("name") == mine["name"]
            else [f"name {saved.get('name')!r} (saved), {mine['name']!r} (here)"]
        )
        saved_args, args = saved.get("args") or {}, mine["args"]
        for key in sorted(set(saved_args) | set(args)):
            if saved_args.get(key, "-") != args.get(key, "-"):
                differences.append(
                    f"{key} {saved_args.get(key, '-')!r} (saved), {args.get(key, '-')!r} (here)"
                )
        return differences

    def _repr_args(self) -> dict:
        return {}
