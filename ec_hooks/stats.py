"""Communication statistics shared by the hooks and the gossip algorithms.

Definitions (per worker):

* ``bytes_dense`` -- the bytes this worker would contribute to a dense allreduce of the same
  tensors in their own dtype (what DDP's default hook sends for a bucket).
* ``bytes_sent`` -- the bytes this worker actually contributes to the collectives (its payload,
  the 4-byte status word included), or sends to its neighbours for gossip.
* ``compression_ratio`` -- ``bytes_dense / bytes_sent``.

Each exists cumulatively and for the last completed step (``last_*``).  Values are plain Python
numbers, except the residual norm: the statistics keep a reference to the residual tensors and
compute the norm only when it is read, so recording it costs the hot path nothing (no pass over
the memory, no host synchronization).
"""

from __future__ import annotations

import math

import torch

__all__ = ["CommStats"]


class CommStats:
    """Running and last-step communication figures."""

    def __init__(self) -> None:
        self.steps = 0
        self.bytes_sent = 0
        self.bytes_dense = 0
        self.entries_sent = 0
        self.entries_total = 0
        self.last_bytes_sent = 0
        self.last_bytes_dense = 0
        self.last_density = 1.0
        self.compress_time_s = 0.0
        self.last_compress_time_s = 0.0
        self._step_sent = 0
        self._step_dense = 0
        self._step_entries_sent = 0
        self._step_entries = 0
        self._step_time = 0.0
        self._residual_sq: torch.Tensor | float = 0.0
        self._residuals: dict = {}

    def record(
        self,
        *,
        bytes_sent: int,
        bytes_dense: int,
        entries_sent: int,
        entries: int,
        seconds: float = 0.0,
    ) -> None:
        """Add one tensor's (or bucket's) figures to the step in progress."""
        self._step_sent += int(bytes_sent)
        self._step_dense += int(bytes_dense)
        self._step_entries_sent += int(entries_sent)
        self._step_entries += int(entries)
        self._step_time += seconds

    def set_residual(self, key, tensor: torch.Tensor, live_keys=None) -> None:
        """Point the residual norm of one bucket or tensor at ``tensor`` (read when the norm is).

        ``tensor`` is the live buffer (an error-feedback memory, a compression error), not a copy:
        the norm always describes its latest value.  ``live_keys``: when given, entries under
        other keys are dropped, so that a bucket layout DDP replaced (its rebuild after the first
        step) is not counted twice.
        """
        self._residuals[key] = tensor.detach()
        if live_keys is not None:
            # list(): DDP runs future callbacks on more than one thread.
            for stale in [k for k in list(self._residuals) if k not in live_keys]:
                self._residuals.pop(stale, None)

    def end_step(self) -> None:
        """Close the step in progress: its figures become the ``last_*`` ones."""
        self.steps += 1
        self.last_bytes_sent = self._step_sent
        self.last_bytes_dense = self._step_dense
        self.last_density = self._step_entries_sent / self._step_entries if self._step_entries else 1.0
        self.last_compress_time_s = self._step_time
        self.bytes_sent += self._step_sent
        self.bytes_dense += self._step_dense
        self.entries_sent += self._step_entries_sent
        self.entries_total += self._step_entries
        self.compress_time_s += self._step_time
        self._step_sent = self._step_dense = self._step_entries_sent = self._step_entries = 0
        self._step_time = 0.0

    @property
    def compression_ratio(self) -> float:
        """Cumulative ``bytes_dense / bytes_sent`` (1.0 before any traffic)."""
        return self.bytes_dense / self.bytes_sent if self.bytes_sent else 1.0

    @property
    def last_compression_ratio(self) -> float:
        return self.last_bytes_dense / self.last_bytes_sent if self.last_bytes_sent else 1.0

    @property
    def density(self) -> float:
        """Cumulative fraction of entries whose values were sent."""
        return self.entries_sent / self.entries_total if self.entries_total else 1.0

    @property
    def residual_norm(self) -> float:
        """L2 norm of the error-feedback memory (or compression error) after the last step."""
        if self._residuals:
            value = sum(float(t.double().pow(2).sum()) for t in list(self._residuals.values()))
        else:
            value = float(self._residual_sq)
        return math.sqrt(max(value, 0.0))

    def as_dict(self) -> dict[str, float]:
        return {
            "steps": self.steps,
            "bytes_sent": self.bytes_sent,
            "bytes_dense": self.bytes_dense,
            "compression_ratio": self.compression_ratio,
            "last_bytes_sent": self.last_bytes_sent,
            "last_bytes_dense": self.last_bytes_dense,
            "last_compression_ratio": self.last_compression_ratio,
            "density": self.density,
            "last_density": self.last_density,
            "residual_norm": self.residual_norm,
            "compress_time_s": self.compress_time_s,
            "last_compress_time_s": self.last_compress_time_s,
        }

    def state_dict(self) -> dict:
        out = self.as_dict()
        out["entries_sent"] = self.entries_sent
        out["entries_total"] = self.entries_total
        out["residual_sq"] = self.residual_norm**2
        return out

    def load_state_dict(self, sd: dict) -> None:
        for name in (
            "steps",
            "bytes_sent",
            "bytes_dense",
            "last_bytes_sent",
            "last_bytes_dense",
            "entries_sent",
            "entries_total",
            "compress_time_s",
            "last_compress_time_s",
            "last_density",
        ):
            if name in sd:
                setattr(self, name, type(getattr(self, name))(sd[name]))
        self._residual_sq = float(sd.get("residual_sq", 0.0))

    def __repr__(self) -> str:
        return (
            f"CommStats(steps={self.steps}, bytes_sent={self.bytes_sent}, bytes_dense={self.bytes_dense}, "
            f"compression_ratio={self.compression_ratio:.1f})"
        )
