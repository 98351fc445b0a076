"""Recipes: three processes extracting the same CIFAR-10 archive at once all get the whole data set.

Each process waits at a barrier, then calls ``load_cifar10``; extraction is slowed down so that
all three find no extracted folder and extract concurrently.  One rename wins; the others must
use its folder, and no temporary folder may be left behind.
"""

from __future__ import annotations

import tarfile
import time

import pytest
import torch

from tests.distributed import context
from tests.test_recipes_data import make_cifar_archive, md5

PROCESSES = 3


def _load_after_barrier(root, archive_md5, barrier, queue):
    try:
        extractall = tarfile.TarFile.extractall

        def slow_extractall(self, *args, **kwargs):
            time.sleep(0.6)  # every process passes the "is it extracted?" check before anyone renames
            return extractall(self, *args, **kwargs)

        tarfile.TarFile.extractall = slow_extractall
        from recipes.data import load_cifar10

        barrier.wait(timeout=60)
        train_x, train_y, test_x, test_y = load_cifar10(
            root, download=False, archive_md5=archive_md5, batch_md5={}
        )
        # numpy arrays travel by value (tensors would be shared with a process that exits)
        queue.put(("ok", [t.numpy() for t in (train_x, train_y, test_x, test_y)]))
    except BaseException as exc:  # noqa: BLE001 - reported to the test
        queue.put(("error", f"{type(exc).__name__}: {exc}"))


@pytest.mark.slow
def test_concurrent_extractions_use_one_whole_folder(tmp_path):
    archive, batches = make_cifar_archive(tmp_path)
    ctx = context()
    barrier, queue = ctx.Barrier(PROCESSES), ctx.Queue()
    procs = [
        ctx.Process(target=_load_after_barrier, args=(str(tmp_path), md5(archive), barrier, queue))
        for _ in range(PROCESSES)
    ]
    for p in procs:
        p.start()
    try:
        results = [queue.get(timeout=120) for _ in procs]
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    errors = [value for status, value in results if status != "ok"]
    assert not errors, errors
    first = [torch.from_numpy(a) for a in results[0][1]]
    for _, arrays in results[1:]:
        assert all(torch.equal(a, torch.from_numpy(b)) for a, b in zip(first, arrays))
    assert first[0].shape[0] == 5 * len(batches["data_batch_1"][b"labels"])
    assert first[3].tolist() == batches["test_batch"][b"labels"]
    # only the archive and the one folder: every loser removed its temporary copy
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cifar-10-batches-py", "cifar-10-python.tar.gz"]
    assert sorted(p.name for p in (tmp_path / "cifar-10-batches-py").iterdir()) == sorted(
        [*batches, "batches.meta"]
    )
