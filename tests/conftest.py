"""Test-wide settings and fixtures."""

import datetime

import pytest
import torch.distributed as dist
from hypothesis import settings

from tests.distributed import free_port

# Property tests explore the same examples on every run (a red CI must point at a change, not at
# the draw), and machines shared with other jobs get no per-example deadline.
settings.register_profile("ec_hooks", derandomize=True, deadline=None)
settings.load_profile("ec_hooks")


@pytest.fixture
def one_rank_group():
    """A one-rank gloo process group for constructors that need one, torn down after the test."""
    assert not dist.is_initialized()
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{free_port()}",
        rank=0,
        world_size=1,
        timeout=datetime.timedelta(seconds=30),
    )
    try:
        yield
    finally:
        dist.destroy_process_group()
