"""Random-k: entries chosen from a generator every worker seeds alike, so the values sum."""

from __future__ import annotations

import torch

from ec_hooks.compressors.base import Payload, seed_from
from ec_hooks.compressors.sparse import Sparsifier
from ec_hooks.compressors.wire import widen
from ec_hooks.kernels import to_wire
from ec_hooks.validation import check_int

__all__ = ["RandK"]


class RandK(Sparsifier):
    """Keep ``k = ceil(density * d)`` entries chosen uniformly at random, without replacement.

    All workers draw the same indices from a dedicated ``torch.Generator`` seeded by
    ``(seed, step, key)``, so only the ``k`` values travel and they can be summed (one allreduce
    of ``k`` values).  The global RNG is never touched.

    Args:
        density: fraction of entries kept, in (0, 1].
        seed: base seed shared by all workers.
    """

    summable = True
    name = "randk"
    consensus_steps = {
        **Sparsifier.consensus_steps,
        "deepsqueeze": (0.5, 0.002, 0.25),
        "choco": (0.5, 0.002, 0.5),
    }

    def __init__(self, density: float = 0.01, seed: int = 0):
        super().__init__(density)
        self.seed = check_int("seed", seed, 0)

    def _repr_args(self):
        return {"density": self.density, "seed": self.seed}

    def indices(self, numel: int, *, step: int, key: int, device) -> torch.Tensor:
        generator = torch.Generator(device="cpu")
        generator.manual_seed(seed_from(self.seed, step, key))
        k = self.k_for(numel)
        if k == numel:
            return torch.arange(numel, device=device)
        if 4 * k > numel:
            return torch.randperm(numel, generator=generator)[:k].sort().values.to(device)
        # randperm(d) costs O(d) per step; for small k draw with replacement and deduplicate.
        # The distinct draws form a uniformly random subset given their number, and a random
        # k-subset of it is a uniformly random k-subset of range(d).
        draws = k + k // 8 + 16
        while True:
            distinct = torch.randint(numel, (draws,), generator=generator).unique()
            if distinct.numel() >= k:
                break
            draws *= 2
        pick = torch.randperm(distinct.numel(), generator=generator)[:k]
        return distinct[pick].sort().values.to(device)

    def compress(self, x, *, step=0, key=0, rank=0, wire_dtype=None):
        flat = x.reshape(-1)
        idx = self.indices(flat.numel(), step=step, key=key, device=x.device)
        return Payload(data=to_wire(flat[idx], wire_dtype or x.dtype), shape=x.shape, indices=idx)

    def decompress(self, payload):
        values = widen(payload.data)
        out = torch.zeros(payload.numel, dtype=values.dtype, device=payload.data.device)
        out[payload.indices] = values
        return out.view(payload.shape)

    def sent_indices(self, payload):
        return payload.indices

    def subtract_sent_(self, acc, payload, scale=None):
        values = widen(payload.data)
        flat = acc.view(-1)
        flat[payload.indices] -= values if scale is None else values * scale

    def wire_bytes(self, numel, dtype=torch.float32):
        return self.k_for(numel) * torch.empty((), dtype=dtype).element_size()
