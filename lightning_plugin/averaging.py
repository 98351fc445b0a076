"""The average model of decentralized training, and swapping it in and out of a module."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from ec_hooks import flat, transport

__all__ = ["average_state_dict", "broadcast_buffers", "ModelSwap"]


def average_state_dict(module: nn.Module, group=None) -> dict[str, torch.Tensor]:
    """``module.state_dict()`` averaged over the workers, as new tensors.  Collective.

    Floating-point entries (parameters and buffers such as BatchNorm running statistics) are
    averaged in fp32, one allreduce per device; integer buffers (``num_batches_tracked``) are
    the same on every worker and are copied.
    """
    state = module.state_dict()
    out = {name: tensor.detach().clone() for name, tensor in state.items()}
    if transport.world_size(group) == 1:
        return out
    by_device: dict[torch.device, list[str]] = {}
    for name, tensor in state.items():
        if tensor.is_floating_point():
            by_device.setdefault(tensor.device, []).append(name)
    # Fixed device order so that every worker issues the same sequence of collectives.
    for device in sorted(by_device, key=str):
        names = by_device[device]
        tensors = [state[name] for name in names]
        buffer = flat.flatten(tensors, torch.float32)
        transport.allreduce_mean(buffer, group).wait()
        for name, tensor, part in zip(names, tensors, flat.split(buffer, tensors)):
            out[name] = part.to(tensor.dtype).clone()
    return out


def broadcast_buffers(module: nn.Module, src: int = 0, group=None) -> None:
    """Copy rank ``src``'s buffers to every worker (collective)."""
    if transport.world_size(group) == 1:
        return
    for buffer in module.buffers():
        dist.broadcast(buffer.data, src=src, group=group)


class ModelSwap:
    """Puts the average model into a module for evaluation, and the local one back afterwards.

    The tensors of the module are written in place (``load_state_dict``), so DDP, the optimizer
    and the gossip algorithm keep pointing at the same parameters, and the local model comes
    back bit for bit.
    """

    def __init__(self) -> None:
        self.local: dict[str, torch.Tensor] | None = None
        self.holding_average = False

    def swap_in_average(self, module: nn.Module, group=None) -> None:
        """Collective (unless the average is already in)."""
        if self.holding_average:
            return
        average = average_state_dict(module, group)
        self.local = {name: tensor.detach().clone() for name, tensor in module.state_dict().items()}
        module.load_state_dict(average)
        self.holding_average = True

    def swap_back(self, module: nn.Module) -> None:
        if self.local is None:
            return
        module.load_state_dict(self.local)
        self.local = None
        self.holding_average = False

    def local_state_dict(self, module: nn.Module) -> dict[str, torch.Tensor]:
        """This worker's own model, wherever it is right now."""
        return self.local if self.local is not None else module.state_dict()

    def keep_average(self) -> None:
        """The average stays in for good (end of training): it becomes every worker's model."""
        self.local = None
