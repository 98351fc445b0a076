"""Scaled sign: one bit per entry and one fp32 scale."""

from __future__ import annotations

import torch

from ec_hooks.compressors.base import Compressor, Payload
from ec_hooks.compressors.wire import pack_bits, pad, to_bytes

__all__ = ["ScaledSign"]


class ScaledSign(Compressor):
    """``C(x) = (||x||_1 / d) * sign(x)``: one bit per entry plus one fp32 scale.

    The signs are bit-packed (32x smaller than fp32).  Zero maps to ``+``.  Payloads of different
    workers carry different scales, so they are allgathered, not summed.
    """

    summable = False
    name = "sign"
    consensus_steps = {**Compressor.consensus_steps, "deepsqueeze": 0.1, "choco": 0.5}

    def compress(self, x, *, step=0, key=0, rank=0, wire_dtype=None):
        flat = x.reshape(-1).float()
        scale = flat.abs().mean().reshape(1)
        bits = pack_bits((flat < 0).to(torch.uint8), 1)
        return Payload(data=to_bytes(scale, bits), shape=x.shape)

    def decompress(self, payload):
        n = payload.numel
        scale = payload.data[:4].view(torch.float32)
        # One gather of 8 scaled signs per byte, from a 256-row table scaled once.
        table = _sign_table(payload.data.device) * scale
        return table[payload.data[4 : 4 + -(-n // 8)].long()].reshape(-1)[:n].view(payload.shape)

    def wire_bytes(self, numel, dtype=torch.float32):
        return pad(4 + -(-numel // 8))


_SIGN_TABLES: dict[torch.device, torch.Tensor] = {}


def _sign_table(device: torch.device) -> torch.Tensor:
    """``(256, 8)`` fp32: row ``b`` holds the signs (+1 for a 0 bit, -1 for a 1 bit) of byte ``b``,
    least significant bit first, as :func:`pack_bits` packs them."""
    table = _SIGN_TABLES.get(device)
    if table is None:
        bits = (torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1
        table = _SIGN_TABLES[device] = (1.0 - 2.0 * bits.float()).to(device)
    return table
