"""Gossip's refusals: the status word every message ends with, and what a worker does with it.

Nothing non-finite is ever mixed, and nothing stale: the status word says whether the sender's
model or message has an inf or NaN entry and whether its parameters were replaced behind the
gossip's back (see :mod:`ec_hooks.gossip`).  A worker that sees a non-zero word raises
:class:`GossipRefusedError` before it mixes anything.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch

from ec_hooks.compressors import Payload

__all__ = ["GossipRefusedError", "StatusChecks", "watch_replacements", "without_status"]

# Bits of the status word every message ends with: why it must not be mixed (0: it may).
_MODEL_NOT_FINITE = 1
_MESSAGE_NOT_FINITE = 2
_PARAMETERS_REPLACED = 4


class GossipRefusedError(RuntimeError):
    """A gossip step was refused: a worker's model or message is not finite, or its parameters
    were replaced.  Raised on that worker and on every neighbour that received its message,
    before anything is mixed or any buffer changes.

    Attributes:
        step: the step (``iteration``) that was refused.
        workers: ``{rank: reason}`` of the workers whose messages were refused.
    """

    def __init__(self, message: str, step: int, workers: dict[int, str]) -> None:
        super().__init__(message)
        self.step = step
        self.workers = workers


def _all_finite(x: torch.Tensor) -> torch.Tensor:
    """Whether every entry of ``x`` is finite, as a tensor (no host sync): NaN propagates into
    the extremes and an infinity is one, so one pass without a mask (about 15 times faster on
    CPU than ``isfinite(x).all()``, and exact, unlike a sum, which can overflow)."""
    if x.numel() == 0:
        return torch.ones((), dtype=torch.bool, device=x.device)
    low, high = torch.aminmax(x)
    return torch.isfinite(low) & torch.isfinite(high)


def _status_word(message: torch.Tensor) -> torch.Tensor:
    """The status word at the end of a message, as an fp32 scalar."""
    if message.dtype == torch.uint8:
        return message[-4:].clone().view(torch.float32)[0]
    return message[-1].float()


def without_status(message: torch.Tensor) -> torch.Tensor:
    return message[:-4] if message.dtype == torch.uint8 else message[:-1]


def watch_replacements(gossip: Any) -> None:
    """Note in ``gossip._replaced`` each module parameter slot whose tensor, one of the gossip's,
    is replaced by another (``load_state_dict(assign=True)`` or an assignment).

    The hook holds the gossip weakly and is removed when the gossip is collected.
    """
    mine = {id(p) for p in gossip.params}
    ref = weakref.ref(gossip)

    def on_register(module: torch.nn.Module, name: str, param) -> None:
        owner, old = ref(), module._parameters.get(name)
        if owner is not None and old is not None and old is not param and id(old) in mine:
            owner._replaced.append(f"{name!r} of {type(module).__name__}")

    handle = torch.nn.modules.module.register_module_parameter_registration_hook(on_register)
    weakref.finalize(gossip, handle.remove)


class StatusChecks:
    """The status word of this worker's message, and the refusal of a step whose words are not all 0."""

    rank: int
    iteration: int
    params: list[torch.Tensor]
    _replaced: list[str]

    def _buffers(self) -> dict[str, torch.Tensor | None]:
        return {}

    def _with_status(self, payload: Payload, x: torch.Tensor, sent: torch.Tensor) -> Payload:
        """``payload`` with this worker's status word appended (see the module docstring)."""
        status = (
            (~_all_finite(x)).float() * _MODEL_NOT_FINITE
            + (~_all_finite(sent)).float() * _MESSAGE_NOT_FINITE
            + (_PARAMETERS_REPLACED if self._replaced else 0)
        ).reshape(1)
        data = payload.data.reshape(-1)
        # As in the DDP hook: one element of a numeric payload, an fp32 word after a byte payload
        # (which keeps its 4-byte alignment).
        word = status.view(torch.uint8) if data.dtype == torch.uint8 else status.to(data.dtype)
        return payload.with_data(torch.cat([data, word]))

    def _refuse(self, payload: Payload, recvs: dict[int, torch.Tensor]) -> None:
        """Raise :class:`GossipRefusedError` unless this worker's status word and every received
        one are 0.  Nothing has been mixed or changed yet when it raises."""
        ranks = [self.rank, *sorted(recvs)]
        words = torch.stack([_status_word(payload.data), *(_status_word(recvs[peer]) for peer in ranks[1:])])
        codes = [int(code) for code in words.tolist()]  # one host sync for all of them
        refused = {rank: code for rank, code in zip(ranks, codes) if code}
        if not refused:
            return
        name = type(self).__name__
        reasons = {rank: self._refusal_reason(rank, code) for rank, code in refused.items()}
        if self.rank in refused and refused[self.rank] & _PARAMETERS_REPLACED:
            raise GossipRefusedError(self._replaced_message(), self.iteration, reasons)
        told = "; ".join(f"worker {rank}: {reason}" for rank, reason in reasons.items())
        raise GossipRefusedError(
            f"{name} step {self.iteration} refused on worker {self.rank}, nothing mixed: {told}. Non-finite values "
            "would spread to every worker within a few steps. A model does not recover by itself: restore every "
            "worker from the last checkpoint (a lower learning rate, gradient clipping or a GradScaler keep "
            "inf/NaN out of the optimizer step).",
            self.iteration,
            reasons,
        )

    def _refusal_reason(self, rank: int, code: int) -> str:
        if code & _PARAMETERS_REPLACED:
            return (
                "its parameters were replaced after its gossip was built (load_state_dict(..., assign=True)?); "
                "it would mix stale tensors"
            )
        if code & _MODEL_NOT_FINITE:
            where = ""
            if rank == self.rank:
                bad = next((i for i, p in enumerate(self.params) if not bool(torch.isfinite(p).all())), None)
                if bad is not None:
                    where = f" (parameter {bad}, shape {tuple(self.params[bad].shape)})"
            return f"its model has inf/NaN entries after the optimizer step{where}"
        return (
            f"its compressed message has inf/NaN entries while its model is finite (its buffers "
            f"{sorted(self._buffers())} are not)"
        )

    def _replaced_message(self) -> str:
        name = type(self).__name__
        return (
            f"{name}: parameter {', '.join(self._replaced)} was replaced by another tensor after this {name} was built "
            "(model.load_state_dict(..., assign=True) does this, as does assigning a new nn.Parameter). The "
            f"{name} still holds the old tensors and would mix them instead of the model's (so would an optimizer "
            f"built before). Build the optimizer and the {name} again from model.parameters() after loading "
            f"(new.load_state_dict(old.state_dict()) carries the gossip state over), or load without assign=True, "
            "which copies into the existing tensors."
        )

    def _raise_if_replaced(self) -> None:
        if self._replaced:
            raise GossipRefusedError(
                self._replaced_message(),
                self.iteration,
                {self.rank: self._refusal_reason(self.rank, _PARAMETERS_REPLACED)},
            )
