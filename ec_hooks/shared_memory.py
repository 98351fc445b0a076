"""Buffers that the ranks of one host map into their memory, for the node stages on gloo.

Inside a node, hierarchical Mem-SGD moves ``(L - 1) / L`` of every bucket to the other local
ranks (:mod:`ec_hooks.hierarchical`).  Through gloo, that goes over loopback TCP: a copy into the
kernel, a copy out of it and the socket work, on both sides.  Through shared memory it is one
copy into a buffer the peers map, which they then read in place.

:class:`NodeSharedMemory` keeps, per rank, named segments (files in ``/dev/shm``, mapped with
``mmap``) that the other ranks of its node open by name.  The ranks agree on whether they can:
at construction every rank writes a probe file, the others read it back, and all ranks of the
node take the result of the slowest (an ``all_reduce`` MIN), so they all use shared memory or
none does.  Ranks in different containers, or on different hosts given as one node, fall back
to gloo.  ``EC_HOOKS_SHM_DISABLE=1`` turns it off (as ``NCCL_SHM_DISABLE`` does for NCCL).

Synchronization is the caller's: a segment is written, then the writer tells its peers (a small
gloo message), then they read it.  Space is reserved with ``posix_fallocate`` when a segment is
created, so a full ``/dev/shm`` raises ``OSError`` there instead of a ``SIGBUS`` later.

A segment's file only lives until the peers have mapped it: the caller says so with
:meth:`settle` (after a second small message, sent only when a rank created a segment), which
unlinks the files created since; the mappings live on until the segments are dropped.  Files
still present are removed when the object is collected and at interpreter exit; only a process
killed between creating a segment and that message leaves one behind.
"""

from __future__ import annotations

import hashlib
import logging
import mmap
import os
import uuid
import weakref

import torch
import torch.distributed as dist

__all__ = ["DISABLE_VARIABLE", "NodeSharedMemory", "shared_memory_disabled"]

logger = logging.getLogger(__name__)

#: environment variable that turns shared memory off (``"1"``) or leaves it on (``"0"``, unset)
DISABLE_VARIABLE = "EC_HOOKS_SHM_DISABLE"
_DIRECTORY = "/dev/shm"


def shared_memory_disabled(env=os.environ) -> bool:
    """Whether ``EC_HOOKS_SHM_DISABLE`` turns shared memory off; a clear error for other values."""
    value = env.get(DISABLE_VARIABLE, "0").strip()
    if value not in ("0", "1"):
        raise ValueError(f"{DISABLE_VARIABLE} must be '0' or '1', got {value!r}")
    return value == "1"


def _unlink_all(paths: set) -> None:
    for path in list(paths):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        paths.discard(path)


def _map(path: str, nbytes: int, create: bool) -> torch.Tensor:
    flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0)
    fd = os.open(path, flags, 0o600)
    try:
        if create:
            os.posix_fallocate(fd, 0, max(nbytes, 1))
        elif os.fstat(fd).st_size < nbytes:
            raise RuntimeError(f"shared segment {path} holds {os.fstat(fd).st_size} bytes, expected {nbytes}")
        region = mmap.mmap(fd, max(nbytes, 1))
    except BaseException:
        if create:  # not yet known to anyone: a full /dev/shm must not keep the half-made file
            os.unlink(path)
        raise
    finally:
        os.close(fd)
    return torch.frombuffer(region, dtype=torch.uint8)[:nbytes]


class NodeSharedMemory:
    """Named shared segments of the ranks of one node (see the module docstring).

    Created collectively by every rank of ``group`` (the node's process group); afterwards
    :attr:`usable` says, identically on every rank of the node, whether the segments work.

    Args:
        group: the node's process group.
        group_ranks: the rank in ``group`` of each local rank, in local-rank order.
        local_rank: this rank's local rank.
        directory: where the segments live (``/dev/shm``: memory, not disk).
    """

    def __init__(self, group, group_ranks: list[int], local_rank: int, directory: str = _DIRECTORY) -> None:
        self.local_rank = local_rank
        self.directory = directory
        self._own: dict[tuple, torch.Tensor] = {}
        self._peers: dict[tuple, torch.Tensor] = {}
        self._linked: set[str] = set()  # own files not unlinked yet
        weakref.finalize(self, _unlink_all, self._linked)
        self.usable = False
        # Every rank takes part in the collectives below, turned off or not, so that a rank whose
        # environment differs is outvoted (or named, for a bad value) instead of leaving its peers waiting.
        try:
            disabled, error = shared_memory_disabled(), ""
        except ValueError as exc:
            disabled, error = True, str(exc)
        prefix = f"ec-hooks-{uuid.uuid4().hex}-{local_rank}-"
        probe = os.urandom(16)
        self._prefixes = [""] * len(group_ranks)
        self._prefixes[local_rank] = prefix
        ok = False
        if not disabled:
            try:
                self.own("probe", len(probe)).copy_(torch.frombuffer(bytearray(probe), dtype=torch.uint8))
                ok = True
            except OSError as exc:
                logger.info(
                    "shared memory unavailable in %s (%s): the node stages go through gloo", directory, exc
                )
        gathered: list = [None] * len(group_ranks)
        dist.all_gather_object(gathered, (prefix, probe, ok, error), group=group)
        by_local_rank = [gathered[r] for r in group_ranks]
        errors = [f"local rank {j}: {e}" for j, (_, _, _, e) in enumerate(by_local_rank) if e]
        if errors:
            _unlink_all(self._linked)
            raise ValueError("; ".join(errors))
        self._prefixes = [p for p, _, _, _ in by_local_rank]
        ok = ok and self._prefixes[local_rank] == prefix
        if all(peer_ok for _, _, peer_ok, _ in by_local_rank):
            for j, (_, peer_probe, _, _) in enumerate(by_local_rank):
                if j == local_rank:
                    continue
                try:
                    ok = ok and bytes(self.peer(j, "probe", len(peer_probe)).tolist()) == peer_probe
                except (OSError, RuntimeError):
                    ok = False
        else:
            ok = False
        agreed = torch.tensor([int(ok)], dtype=torch.int32)
        dist.all_reduce(agreed, op=dist.ReduceOp.MIN, group=group)
        self.usable = bool(agreed.item())
        self.drop_all()
        _unlink_all(self._linked)
        if self.usable:
            logger.info("the node stages exchange through shared memory in %s", directory)

    @staticmethod
    def _file_name(name) -> str:
        return hashlib.blake2b(repr(name).encode(), digest_size=12).hexdigest()

    def _path(self, local_rank: int, name) -> str:
        return os.path.join(self.directory, self._prefixes[local_rank] + self._file_name(name))

    def own(self, name, nbytes: int, owner=None) -> torch.Tensor:
        """This rank's segment ``name`` of ``nbytes`` bytes (``uint8``), created on first use;
        ``owner`` groups segments for :meth:`keep`."""
        key = (owner, name, nbytes)
        out = self._own.get(key)
        if out is None:
            path = self._path(self.local_rank, (owner, name, nbytes))
            out = self._own[key] = _map(path, nbytes, create=True)
            self._linked.add(path)
        return out

    def peer(self, local_rank: int, name, nbytes: int, owner=None) -> torch.Tensor:
        """Local rank ``local_rank``'s segment ``name``, which it has created (mapped on first use)."""
        key = (local_rank, owner, name, nbytes)
        out = self._peers.get(key)
        if out is None:
            path = self._path(local_rank, (owner, name, nbytes))
            if not os.path.exists(path):
                raise RuntimeError(
                    f"local rank {local_rank}'s shared segment {path} does not exist: it was not created "
                    "yet, or was removed (another process cleaning /dev/shm?)"
                )
            out = self._peers[key] = _map(path, nbytes, create=False)
        return out

    @property
    def created(self) -> bool:
        """Whether this rank created a segment whose file is still there (see :meth:`settle`)."""
        return bool(self._linked)

    def settle(self) -> None:
        """Every peer has mapped this rank's segments: unlink their files (the mappings stay)."""
        _unlink_all(self._linked)

    def keep(self, owners) -> None:
        """Unmap the segments of owners not in ``owners`` (bucket layouts no longer in use)."""
        self._own = {k: v for k, v in self._own.items() if k[0] is None or k[0] in owners}
        self._peers = {k: v for k, v in self._peers.items() if k[1] is None or k[1] in owners}

    def drop_all(self) -> None:
        self._own.clear()
        self._peers.clear()

    def close(self) -> None:
        """Unmap every segment and remove this rank's files."""
        self.drop_all()
        _unlink_all(self._linked)
