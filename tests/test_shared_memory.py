"""Shared segments of the ranks of one node (ec_hooks.shared_memory) on real gloo processes."""

import glob
import os

import pytest
import torch
import torch.distributed as dist

from ec_hooks.shared_memory import DISABLE_VARIABLE, NodeSharedMemory, shared_memory_disabled

from .distributed import run_distributed


def _files(shared: NodeSharedMemory) -> list[str]:
    return sorted(glob.glob(os.path.join(shared.directory, shared._prefixes[shared.local_rank] + "*")))


def _segments(rank, world_size, directory):
    ranks = list(range(world_size))
    report = {}
    shared = NodeSharedMemory(dist.group.WORLD, ranks, rank)
    report["usable"] = shared.usable
    report["probe files left"] = len(_files(shared))
    # each rank writes its segment, then (after a barrier, the caller's signal) reads the others'
    shared.own("x", 16, owner=("layout",)).copy_(torch.full((16,), rank + 1, dtype=torch.uint8))
    dist.barrier()
    report["read"] = [int(shared.peer(j, "x", 16, owner=("layout",))[5]) for j in ranks if j != rank]
    report["files after creation"] = len(_files(shared))
    report["created"] = shared.created
    dist.barrier()  # every peer has mapped them: the files go, the mappings stay
    shared.settle()
    report["files after settle"] = len(_files(shared))
    report["created after settle"] = shared.created
    shared.own("x", 16, owner=("layout",))[5] = 100 + rank
    dist.barrier()
    report["read after unlink"] = [
        int(shared.peer(j, "x", 16, owner=("layout",))[5]) for j in ranks if j != rank
    ]
    shared.keep(set())
    report["mapped after keep"] = len(shared._own) + len(shared._peers)
    shared.own("y", 8)
    report["files before close"] = len(_files(shared))
    shared.close()
    report["files after close"] = len(_files(shared))
    dist.barrier()
    # turned off by the environment: no probe, not usable
    os.environ[DISABLE_VARIABLE] = "1"
    report["disabled usable"] = NodeSharedMemory(dist.group.WORLD, ranks, rank).usable
    del os.environ[DISABLE_VARIABLE]
    # one rank cannot create segments (its directory does not exist): no rank uses them
    failing = NodeSharedMemory(
        dist.group.WORLD, ranks, rank, directory=directory if rank == 1 else "/dev/shm"
    )
    report["one rank failing usable"] = failing.usable
    report["one rank failing files"] = len(_files(failing))
    # a rank whose environment differs takes part all the same: turned off on rank 0 only
    if rank == 0:
        os.environ[DISABLE_VARIABLE] = "1"
    report["one rank disabled usable"] = NodeSharedMemory(dist.group.WORLD, ranks, rank).usable
    # a bad value on the last rank: every rank is told, none waits for it
    os.environ[DISABLE_VARIABLE] = "yes" if rank == world_size - 1 else "0"
    try:
        NodeSharedMemory(dist.group.WORLD, ranks, rank)
        report["bad value"] = None
    except ValueError as exc:
        report["bad value"] = str(exc)
    del os.environ[DISABLE_VARIABLE]
    return report


@pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="needs /dev/shm")
def test_segments_are_shared_unlinked_once_mapped_and_agreed_on_by_every_rank(tmp_path):
    for world_size in (2, 3):
        for rank, report in enumerate(run_distributed(_segments, world_size, str(tmp_path / "missing"))):
            assert report["usable"] and report["probe files left"] == 0
            assert report["read"] == [j + 1 for j in range(world_size) if j != rank]
            assert report["files after creation"] == 1 and report["created"]
            assert report["files after settle"] == 0 and not report["created after settle"]
            assert report["read after unlink"] == [100 + j for j in range(world_size) if j != rank]
            assert report["mapped after keep"] == 0
            assert report["files before close"] == 1 and report["files after close"] == 0
            assert not report["disabled usable"]
            assert not report["one rank failing usable"] and report["one rank failing files"] == 0
            assert not report["one rank disabled usable"]
            assert (
                report["bad value"]
                == f"local rank {world_size - 1}: EC_HOOKS_SHM_DISABLE must be '0' or '1', got 'yes'"
            )


def test_the_disable_variable_takes_0_or_1():
    assert shared_memory_disabled({DISABLE_VARIABLE: "1"})
    assert not shared_memory_disabled({DISABLE_VARIABLE: "0"}) and not shared_memory_disabled({})
    with pytest.raises(ValueError, match="EC_HOOKS_SHM_DISABLE must be '0' or '1'"):
        shared_memory_disabled({DISABLE_VARIABLE: "yes"})


def test_a_segment_that_cannot_be_reserved_leaves_no_file(tmp_path, monkeypatch):
    from ec_hooks import shared_memory

    def full(fd, offset, length):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(shared_memory.os, "posix_fallocate", full)
    with pytest.raises(OSError, match="No space left"):
        shared_memory._map(str(tmp_path / "segment"), 1024, create=True)
    assert list(tmp_path.iterdir()) == []
