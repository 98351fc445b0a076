"""Do all ranks run the same configuration?  One small collective that says which do not.

Ranks that disagree on the compressor, its density or seed, the warm-up, the wire dtype, the
step counter or the gossip topology either hang until the process group's timeout, abort inside
the backend ("Received data size doesn't match"), or silently drift apart.  Before the first
step, and after each load of a state dict, every rank therefore hashes each field of its
configuration, and one ``all_gather`` of a fixed-size vector of these digests (8 bytes a field,
the same size on every rank whatever the configuration) tells every rank which fields differ.
Then every rank raises the same :class:`ValueError`, naming each differing field and the value
each rank has (one more collective, on this error path only, gathers the values).

Every rank makes the same calls in the same order (the first call of a DDP comm hook in a step,
before that bucket's own collective; the start of a gossip step, before the exchange), so the
check cannot cross another collective.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Mapping

import torch
import torch.distributed as dist

from ec_hooks import transport

__all__ = [
    "Agreement",
    "check_agreement",
    "check_gossip",
    "compressor_config",
    "expect_gossip_check",
    "gossip_fields",
]

logger = logging.getLogger(__name__)

#: fields a digest vector holds at most; slot 0 is the digest of the field names themselves
MAX_FIELDS = 63


def _digest(value: object) -> int:
    digest = hashlib.blake2b(repr(value).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def _shown(value: object) -> str:
    return value if isinstance(value, str) else repr(value)


def check_agreement(
    fields: Mapping[str, object], group=None, device: torch.device | str = "cpu", who: str = "ec_hooks"
) -> None:
    """Raise ``ValueError`` on every rank when the ranks of ``group`` disagree on ``fields``.

    Collective: every rank of ``group`` must call it at the same point, with the same field
    names.  ``device`` is where the small digest tensor lives (the CUDA device under NCCL).
    """
    n = transport.world_size(group)
    if n == 1:
        return
    names = sorted(fields)
    if len(names) > MAX_FIELDS:
        raise ValueError(f"check_agreement compares at most {MAX_FIELDS} fields, got {len(names)}")
    digests = [_digest(names)] + [_digest(fields[name]) for name in names]
    digests += [0] * (MAX_FIELDS + 1 - len(digests))
    if dist.get_backend(group) == dist.Backend.GLOO:
        device = "cpu"
    mine = torch.tensor(digests, dtype=torch.int64, device=device)
    gathered = transport.allgather(mine, group).wait().cpu()
    if bool((gathered == gathered[0]).all()):
        return
    # The error path: every rank saw the same digests, so every rank takes it, and gathers the values.
    values: list = [None] * n
    dist.all_gather_object(values, {name: _shown(fields[name]) for name in names}, group=group)
    lines = []
    for name in sorted({key for v in values for key in v}):
        by_value: dict[str, list[int]] = {}
        for rank, theirs in enumerate(values):
            by_value.setdefault(theirs.get(name, "<missing>"), []).append(rank)
        if len(by_value) > 1:
            lines.append(
                f"  {name}: "
                + "; ".join(
                    f"{value} on rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))}"
                    for value, ranks in by_value.items()
                )
            )
    message = (
        f"{who}: the ranks disagree on their configuration (this is rank {transport.rank_in(group)} of {n}):\n"
        + "\n".join(lines)
        + "\nEvery rank must use the same settings and load the checkpoint of the same step."
    )
    logger.error(message)
    raise ValueError(message)


class Agreement:
    """A pending :func:`check_agreement`: due at the first step and again after each load."""

    def __init__(self) -> None:
        self.pending = True

    def expect(self) -> None:
        """Check again at the next step (a state dict was loaded)."""
        self.pending = True

    def check(
        self, fields: Callable[[], Mapping[str, object]], group=None, device="cpu", who: str = "ec_hooks"
    ) -> None:
        """Run the check if it is due; ``fields`` is called only then."""
        if self.pending:
            check_agreement(fields(), group, device, who)
            self.pending = False


def compressor_config(compressor) -> str:
    """The compressor as every rank must have it: its repr without the arguments that change how,
    not what, is computed (``local_args``, e.g. top-k's selection ``backend``)."""
    args = {k: v for k, v in compressor._repr_args().items() if k not in compressor.local_args}
    return f"{type(compressor).__name__}({', '.join(f'{k}={v!r}' for k, v in args.items())})"


def gossip_fields(algorithm) -> dict[str, object]:
    """What every rank of a gossip algorithm (DeepSqueeze, CHOCO-SGD, D-PSGD) must share."""
    topology = algorithm.topology
    return {
        "algorithm": type(algorithm).__name__,
        "topology": (
            topology.name,
            topology.size,
            topology.period,
            _digest([topology.matrix(step).tolist() for step in range(topology.period)]),
        ),
        "compressor": compressor_config(algorithm.compressor),
        "consensus_step": algorithm.consensus_step,
        "watch_every": algorithm.watch_every,
        "iteration": algorithm.iteration,
        "numel": algorithm.numel,
        "wire_dtype": str(algorithm.wire_dtype),
        "resumed": getattr(algorithm, "_resumed", False),
    }


def check_gossip(algorithm) -> None:
    """The check of a gossip algorithm, due at its first step and after each load."""
    agreement = algorithm.__dict__.setdefault("_agreement", Agreement())
    agreement.check(
        lambda: gossip_fields(algorithm), algorithm.process_group, algorithm.device, type(algorithm).__name__
    )


def expect_gossip_check(algorithm) -> None:
    """Mark a gossip algorithm as resumed; its next step checks the ranks' agreement again."""
    algorithm._resumed = True
    algorithm.__dict__.setdefault("_agreement", Agreement()).expect()
