"""The hook's CUDA path (no host sync: memory updates masked by the status word), on one GPU."""

import os

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import ec_hooks

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.fixture()
def nccl_group():
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    from .distributed import free_port

    os.environ["MASTER_PORT"] = str(free_port())
    dist.init_process_group("nccl", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize(
    "compressor", [ec_hooks.TopK(0.05), ec_hooks.RandK(0.05), ec_hooks.ScaledSign()], ids=repr
)
def test_cuda_hook_conserves_mass(nccl_group, compressor):
    from .test_hooks import Recorder

    torch.manual_seed(0)
    model = DDP(
        torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10)).cuda()
    )
    state = ec_hooks.ErrorFeedbackState(compressor=compressor, module=model)
    recorder = Recorder(state)
    model.register_comm_hook(state, recorder)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for _ in range(12):
        opt.zero_grad()
        model(torch.randn(32, 64, device="cuda")).pow(2).mean().backward()
        opt.step()
    memories = state.memory.state_dict()
    for key, memory in memories.items():
        # one worker: the hook's output is C(acc) itself, so sum g = sum C + m
        drift = (
            recorder.grad_sum[key] - recorder.out_sum[key] - memory.double().to(recorder.grad_sum[key].device)
        )
        assert drift.abs().max() < 1e-5, key
    assert state.stats.compression_ratio > 1


def test_cuda_hook_voids_nonfinite_steps_without_touching_memory(nccl_group):
    torch.manual_seed(0)
    model = DDP(
        torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10)).cuda()
    )
    state = ec_hooks.ErrorFeedbackState(compressor=ec_hooks.TopK(0.05), module=model)
    model.register_comm_hook(state, ec_hooks.error_feedback_hook)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for step in range(6):
        opt.zero_grad()
        loss = model(torch.randn(32, 64, device="cuda")).pow(2).mean()
        before = state.memory.state_dict()
        (loss * float("inf") if step == 4 else loss).backward()
        if step == 4:
            assert all(torch.isnan(p.grad).all() for p in model.parameters())
            after = state.memory.state_dict()
            assert all(torch.equal(before[k], after[k]) for k in before)
        else:
            opt.step()
    assert all(torch.isfinite(m).all() for m in state.memory.state_dict().values())
