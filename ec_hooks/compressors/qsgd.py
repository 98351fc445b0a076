"""QSGD: stochastic quantisation to a few levels per sign."""

from __future__ import annotations

import math

import torch

from ec_hooks.compressors.base import Compressor, Payload, seed_from
from ec_hooks.compressors.wire import pack_bits, pad, to_bytes, unpack_bits
from ec_hooks.validation import check_int

__all__ = ["QSGD"]


class QSGD(Compressor):
    """Stochastic quantisation to ``levels`` levels per sign (Alistarh et al., 2017).

    1. ``norm = ||x||_2``;  ``r = levels * |x| / norm``.
    2. ``l = floor(r) + Bernoulli(r - floor(r))`` (unbiased), from a generator seeded by
       ``(seed, rank, step, key)``: independent across workers, reproducible, global RNG untouched.
    3. Wire: the fp32 norm, then ``1 + ceil(log2(levels + 1))`` bits per entry (sign and level).

    ``QSGD.from_bits(b)`` gives the ``b``-bit variant (``levels = 2**(b-1) - 1``).
    """

    summable = False
    name = "qsgd"
    consensus_steps = {
        **Compressor.consensus_steps,
        "deepsqueeze": (0.007, 0.005, 0.1),
        "choco": (0.03, 0.02, 0.5),
    }

    def __init__(self, levels: int = 7, seed: int = 0):
        self.levels = check_int("levels", levels, 1, 2**15 - 1)
        self.seed = check_int("seed", seed, 0)
        self.level_bits = max(1, math.ceil(math.log2(self.levels + 1)))
        self.bits = 1 + self.level_bits

    @classmethod
    def from_bits(cls, bits: int, seed: int = 0) -> QSGD:
        bits = check_int("bits", bits, 2, 16)
        return cls(levels=2 ** (bits - 1) - 1, seed=seed)

    def _repr_args(self):
        return {"levels": self.levels, "seed": self.seed}

    def consensus_unit(self) -> float:
        return self.levels

    def contraction_scale(self, numel: int) -> float:
        """``1 / (1 + omega)`` with QSGD's variance bound ``omega = min(d / s^2, sqrt(d) / s)`` for
        ``s`` levels: the rescaling of Koloskova et al. (2019) that makes it a contraction."""
        return 1.0 / (1.0 + min(numel / self.levels**2, math.sqrt(numel) / self.levels))

    def compress(self, x, *, step=0, key=0, rank=0, wire_dtype=None):
        flat = x.reshape(-1).float()
        norm = flat.norm().reshape(1)
        generator = torch.Generator(device="cpu")
        generator.manual_seed(seed_from(self.seed, rank, step, key))
        noise = torch.rand(flat.numel(), generator=generator).to(flat.device)
        scaled = flat.abs() / norm.clamp_min(torch.finfo(torch.float32).tiny) * self.levels
        level = torch.floor(scaled + noise).clamp_(0, self.levels).to(torch.int32)
        codes = level | ((flat < 0).to(torch.int32) << self.level_bits)
        if self.bits <= 8:
            packed = pack_bits(codes.to(torch.uint8), self.bits)
        else:
            packed = codes.to(torch.int16)
        return Payload(data=to_bytes(norm, packed), shape=x.shape)

    def decompress(self, payload):
        n = payload.numel
        norm = payload.data[:4].view(torch.float32)
        if self.bits <= 8:
            codes = unpack_bits(payload.data[4:], self.bits, n).to(torch.int32)
        else:
            codes = payload.data[4 : 4 + 2 * n].view(torch.int16).to(torch.int32)
        level = (codes & ((1 << self.level_bits) - 1)).float()
        sign = 1.0 - 2.0 * ((codes >> self.level_bits) & 1).float()
        return (norm * sign * level / self.levels).view(payload.shape)

    def wire_bytes(self, numel, dtype=torch.float32):
        body = -(-numel * self.bits // 8) if self.bits <= 8 else 2 * numel
        return pad(4 + body)
