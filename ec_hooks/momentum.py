"""Momentum correction for error-feedback compression (Lin et al., *Deep Gradient Compression*, 2018).

An optimizer's momentum applied *after* sparsified aggregation sees delayed, bursty gradient
mass and amplifies it.  Momentum correction moves the momentum in front of the compression:
each worker keeps a velocity ``u`` per parameter, accumulates the velocity (not the raw
gradient) in its error-feedback memory, and the optimizer steps without momentum on the
aggregated result.  At density 1 without masking this is exactly momentum SGD on the mean
gradient, because the mean of the velocities is the velocity of the mean.

The velocities are fp32 and owned by parameters, like the memories: the store is an
:class:`~ec_hooks.memory.ErrorFeedbackMemory`, so they follow DDP's bucket rebuild, load into
any bucket layout and are rescaled with the loss scale in the same way.
"""

from __future__ import annotations

import logging
import math
import numbers
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import torch

from ec_hooks.memory import ErrorFeedbackMemory

__all__ = ["MomentumCorrection", "VelocityUpdate", "check_momentum", "optimizer_conflicts"]

logger = logging.getLogger(__name__)


def check_momentum(momentum) -> float:
    """A momentum factor in [0, 1)."""
    if (
        isinstance(momentum, bool)
        or not isinstance(momentum, numbers.Real)
        or not 0.0 <= float(momentum) < 1.0
    ):
        raise ValueError(f"momentum must be a float in [0, 1), got {momentum!r}")
    return float(momentum)


def _check_non_negative(name: str, value, allow_none: bool = False) -> float | None:
    if value is None and allow_none:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not (math.isfinite(float(value)) and float(value) >= 0)
    ):
        allowed = "a finite float >= 0" + (" or None" if allow_none else "")
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
    return float(value)


@dataclass
class VelocityUpdate:
    """One bucket's velocity step, applied to the store only once the step stands.

    ``signal`` is what enters the error-feedback memory this step: the new velocity
    ``mu u + g`` (or ``g + mu (mu u + g)`` with Nesterov), fp32, with the non-finite gradient
    entries left non-finite so that the memory update skips them and the step is voided.
    """

    velocity: torch.Tensor  # the bucket's live fp32 velocity buffer
    new_velocity: torch.Tensor
    signal: torch.Tensor


class MomentumCorrection:
    """Per-parameter fp32 velocities and the momentum-corrected signal fed to error feedback.

    Args:
        momentum: momentum factor ``mu`` in [0, 1).
        nesterov: feed ``g + mu u`` instead of ``u`` (torch's Nesterov form).
        weight_decay: L2 coefficient ``wd`` added to the local gradient (``g + wd p``) before
            it enters the velocity, where ``torch.optim.SGD`` adds it before its momentum.
        clip_norm: each worker clips its bucket gradient to this L2 norm before it enters the
            velocity (DGC's local clipping; the caller scales a global threshold).  In the units
            of the gradients the hook sees: under AMP, times :attr:`clip_scale` (the loss scale,
            which :meth:`scale_` follows).
        masking: momentum factor masking (step 3; default ``False``, measured in
            ``docs/momentum-correction.md``): ``False`` keeps the velocity of sent entries, so
            that every gradient gets its full momentum ``1 / (1 - mu)`` as with SGD.
        send_tail: send each sent entry's momentum tail with it (step 3; default ``False``):
            the mass ``mu / (1 - mu) u`` that its velocity would still add to its memory over the
            next steps goes out in the same slot, and the velocity is cleared.  Masking without
            losing mass: every gradient keeps its weight ``1 / (1 - mu)``, and the tail is applied
            at once instead of queueing in the memory behind other entries.

    Step, for a bucket with gradient ``g``, parameters ``p`` and velocity ``u``:

    1. ``g = clip(g + wd p)`` (non-finite entries stay non-finite);
    2. ``u_new = mu u + g``; the signal is ``u_new`` (Nesterov: ``g + mu u_new``);
    3. after the exchange, when every worker's step was finite: ``u = u_new``, and with
       ``masking``, ``u[sent] = 0`` for the entries the compressor sent (DGC's momentum factor
       masking; dense compressors send an approximation of every entry and mask nothing).  With
       ``send_tail``, the payload's entries carried ``acc + mu / (1 - mu) u_new`` (the caller
       adds :meth:`tail` to the memory before the exchange) and ``u[sent] = 0`` too.  A voided
       step leaves ``u`` untouched.

    Invariant without Nesterov (to float rounding):
    ``sum_t g_t / (1 - mu) = sum_t sent_t + m_T + mu / (1 - mu) u_T``, with the velocity kept or its
    tail sent: every gradient gets the weight ``1 / (1 - mu)`` it has in SGD with momentum;
    ``masking`` drops ``mu / (1 - mu) u[sent]`` from it.
    """

    def __init__(
        self,
        momentum: float,
        nesterov: bool = False,
        weight_decay: float = 0.0,
        clip_norm: float | None = None,
        masking: bool = False,
        send_tail: bool = False,
    ) -> None:
        self.momentum = check_momentum(momentum)
        if not isinstance(nesterov, bool):
            raise ValueError(f"nesterov must be True or False, got {nesterov!r}")
        if nesterov and self.momentum == 0:
            raise ValueError("nesterov=True needs momentum > 0")
        self.nesterov = nesterov
        self.weight_decay = _check_non_negative("weight_decay", weight_decay)
        self.clip_norm = _check_non_negative("clip_norm", clip_norm, allow_none=True)
        if self.clip_norm == 0:
            raise ValueError("clip_norm must be > 0 or None, got 0")
        if not isinstance(masking, bool):
            raise ValueError(f"momentum_masking must be True or False, got {masking!r}")
        self.masking = masking
        if not isinstance(send_tail, bool):
            raise ValueError(f"send_momentum_tail must be True or False, got {send_tail!r}")
        if send_tail and (masking or self.momentum == 0):
            raise ValueError(
                "send_momentum_tail=True needs momentum > 0 and momentum_masking=False (it masks, and sends "
                "what masking would drop)"
            )
        self.send_tail = send_tail
        self.clip_scale = 1.0
        self.velocity = ErrorFeedbackMemory()

    def __repr__(self) -> str:
        return (
            f"MomentumCorrection(momentum={self.momentum}, nesterov={self.nesterov}, "
            f"weight_decay={self.weight_decay}, clip_norm={self.clip_norm}, masking={self.masking}, "
            f"send_tail={self.send_tail})"
        )

    def step(
        self,
        keys: Sequence[Hashable],
        numels: Sequence[int],
        grad: torch.Tensor,
        params: Sequence[torch.Tensor] | None = None,
    ) -> VelocityUpdate:
        """Steps 1-2 for the flat gradient of the parameters ``keys``; the store is not changed."""
        velocity = self.velocity.buffer_for(keys, numels, grad.device)
        g = grad.reshape(-1).float()
        if self.weight_decay:
            if params is None:
                raise ValueError("weight_decay needs the bucket's parameters")
            flat = torch.cat([p.detach().reshape(-1).float() for p in params])
            g = torch.add(g, flat, alpha=self.weight_decay)
        if self.clip_norm is not None:
            g = _clip(g, self.clip_norm * self.clip_scale)
        new_velocity = torch.add(g, velocity, alpha=self.momentum)
        signal = torch.add(g, new_velocity, alpha=self.momentum) if self.nesterov else new_velocity
        return VelocityUpdate(velocity, new_velocity, signal)

    def tail(self, update: VelocityUpdate, sent: torch.Tensor) -> torch.Tensor:
        """``mu / (1 - mu) u_new[sent]`` (Nesterov: ``mu^2 / (1 - mu) u_new[sent]``): what the
        velocity of the ``sent`` entries would still add to their memory in the steps to come
        (non-finite entries, of a step that will be voided, as 0)."""
        mu = self.momentum
        # Nesterov feeds g + mu u: later steps feed mu u_{t+1} = mu^2 u_new, mu^3 u_new, ...
        factor = (mu * mu if self.nesterov else mu) / (1.0 - mu)
        tail = update.new_velocity.index_select(0, sent) * factor
        return torch.where(torch.isfinite(tail), tail, 0.0)

    def commit(self, update: VelocityUpdate, keep: torch.Tensor, sent: torch.Tensor | None) -> None:
        """Step 3: ``u = u_new`` when ``keep`` (0-dim bool), then mask the ``sent`` indices."""
        velocity = update.velocity
        if velocity.is_cuda:
            # no host sync: a voided step writes the old velocity back
            velocity.copy_(torch.where(keep, update.new_velocity, velocity))
        elif bool(keep):
            velocity.copy_(update.new_velocity)
        else:
            return
        if (self.masking or self.send_tail) and sent is not None and sent.numel():
            if velocity.is_cuda:
                values = torch.where(keep, 0.0, velocity.index_select(0, sent))
                velocity.index_copy_(0, sent, values)
            else:
                velocity.index_fill_(0, sent, 0.0)

    def scale_(self, factor: float) -> None:
        """The loss scale changed by ``factor``: velocities and the clip threshold follow it."""
        self.velocity.scale_(factor)
        self.clip_scale *= factor

    def config(self) -> dict:
        return {
            "momentum": self.momentum,
            "nesterov": self.nesterov,
            "weight_decay": self.weight_decay,
            "clip_norm": self.clip_norm,
            "masking": self.masking,
            # absent = False: state dicts written before the option existed load unchanged
            **({"send_tail": True} if self.send_tail else {}),
        }


def optimizer_conflicts(correction: MomentumCorrection | None, optimizer: torch.optim.Optimizer) -> list[str]:
    """What in ``optimizer`` undoes the momentum correction ``correction`` (empty: nothing).

    With momentum in the hook the optimizer must step on the aggregated velocities without
    momentum, and the L2 term belongs in the hook, in front of the velocity, as in
    ``torch.optim.SGD``.  Left in the optimizer it is not amplified by ``1 / (1 - mu)`` like the
    gradient, so the run heads for the optimum of an L2 term ``1 / (1 - mu)`` times weaker
    (measured on the logistic regression of ``docs/momentum-correction.md``).  Checked per
    parameter group, from the groups' ``momentum`` and ``weight_decay`` (``torch.optim.SGD``'s
    names; other optimizers' groups are checked for what they have).
    """
    if correction is None:
        return []
    found = []
    for i, group in enumerate(optimizer.param_groups):
        momentum, decay = group.get("momentum", 0) or 0, group.get("weight_decay", 0) or 0
        if momentum and correction.momentum:
            found.append(
                f"param group {i} has momentum={momentum} and the hook momentum={correction.momentum}: "
                "momentum applies twice; set the optimizer's momentum to 0"
            )
        if decay and correction.weight_decay:
            found.append(
                f"param group {i} has weight_decay={decay} and the hook weight_decay={correction.weight_decay}: "
                "weight decay applies twice; set the optimizer's weight_decay to 0"
            )
        elif decay and correction.momentum:
            found.append(
                f"param group {i} has weight_decay={decay} after the hook's momentum={correction.momentum}: "
                f"the L2 term is then {1 / (1 - correction.momentum):.3g} times weaker than in SGD with "
                "momentum; pass weight_decay to the hook's state and set the optimizer's to 0"
            )
    return found


def _clip(g: torch.Tensor, max_norm: float) -> torch.Tensor:
    """``g * min(1, max_norm / ||g||)`` over the finite entries' norm; non-finite entries stay
    non-finite, so that the step is still recognised as an overflow."""
    finite = torch.isfinite(g)
    norm = torch.where(finite, g, 0).norm()
    factor = (max_norm / norm.clamp_min(torch.finfo(torch.float32).tiny)).clamp_max(1.0)
    return g * factor
