"""Checkpoint writes are atomic: a crash in the middle of a save leaves the previous checkpoint.

Lightning's local save writes the bytes to a temporary file in ``$TMPDIR`` and moves it over the
checkpoint.  When ``$TMPDIR`` is on another filesystem than the checkpoint (a tmpfs ``/tmp``, a
network checkpoint directory), that move is a copy into the final path, and a crash during the
copy leaves a truncated checkpoint where the previous good one was.  The strategies write to a
temporary file beside the checkpoint and rename it instead.  The crash is simulated in a child
process: renames across filesystems fail (as they do), and the copy dies half-way with
``os._exit``.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_plugin import DeepSqueezeStrategy, MemSGDStrategy

ROOT = Path(__file__).resolve().parents[1]
CRASH_EXIT = 17

_CHILD = r"""
import errno, os, shutil, sys
import torch
import lightning_plugin

strategy = getattr(lightning_plugin, sys.argv[1])()
path = sys.argv[2]

def rename(*args, **kwargs):  # the temporary file is on another filesystem
    raise OSError(errno.EXDEV, "Invalid cross-device link")

def copyfile(src, dst, **kwargs):  # the machine dies half-way through the copy
    with open(src, "rb") as f:
        data = f.read()
    with open(dst, "wb") as f:
        f.write(data[: len(data) // 2])
        f.flush()
        os.fsync(f.fileno())
    os._exit(CRASH_EXIT)

os.rename = rename
shutil.copyfile = copyfile
strategy.save_checkpoint({"step": 2, "state_dict": {"w": torch.full((50000,), 2.0)}}, path)
os._exit(0)
""".replace("CRASH_EXIT", str(CRASH_EXIT))


def _checkpoint(step):
    return {"step": step, "state_dict": {"w": torch.full((50000,), float(step))}}


@pytest.mark.slow
@pytest.mark.parametrize("cls", [MemSGDStrategy, DeepSqueezeStrategy])
def test_a_crash_during_a_save_leaves_the_previous_checkpoint_loadable(tmp_path, cls):
    path = tmp_path / "checkpoints" / "last.ckpt"
    cls().save_checkpoint(_checkpoint(1), path)
    assert torch.load(path, weights_only=False)["step"] == 1
    child = subprocess.run(
        [sys.executable, "-c", _CHILD, cls.__name__, str(path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert child.returncode == CRASH_EXIT, child.stderr[-2000:]
    saved = torch.load(path, weights_only=False)
    assert saved["step"] == 1 and torch.equal(saved["state_dict"]["w"], torch.full((50000,), 1.0))
    # A later save goes through.
    cls().save_checkpoint(_checkpoint(3), path)
    assert torch.load(path, weights_only=False)["step"] == 3
    # Only the crashed writer's own temporary file may remain beside the checkpoint.
    leftovers = [p.name for p in path.parent.iterdir() if p.name != "last.ckpt"]
    assert len(leftovers) <= 1 and all(name.startswith(".last.ckpt.tmp-") for name in leftovers), leftovers
