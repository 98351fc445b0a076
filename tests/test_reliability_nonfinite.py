"""Non-finite values: NaN gradients never enter the error-feedback memory, with or without a
GradScaler, and a peer's payload with an out-of-range index never writes outside the tensor."""

from __future__ import annotations

import pytest
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

import ec_hooks
from ec_hooks.compressors import Payload, _mask_out_of_range, _to_bytes
from ec_hooks.transport import _resolve_to
from tests.distributed import run_distributed

POISON_STEP = 2


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


def _batch(rank, step):
    g = torch.Generator().manual_seed(100 * rank + step)
    return torch.randn(5, 6, generator=g), torch.randint(0, 3, (5,), generator=g)


def _train(rank, poison_value, use_scaler, compressor):
    model = DDP(_model())
    state = ec_hooks.ErrorFeedbackState(compressor=compressor, module=model)

    def poisoned(state, bucket):
        # One worker's gradient goes bad at one step (an fp16 overflow, a bad batch).
        if state.iteration == POISON_STEP and rank == 1:
            bucket.buffer()[1] = poison_value
        return ec_hooks.error_feedback_hook(state, bucket)

    model.register_comm_hook(state, poisoned)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8) if use_scaler else None
    records = []
    for step in range(4):
        x, y = _batch(rank, step)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        before_params = [p.detach().clone() for p in model.parameters()]
        before_memory = state.memory.state_dict()
        if scaler is None:
            loss.backward()
            stepped = all(torch.isfinite(p.grad).all() for p in model.parameters())
            if stepped:
                optimizer.step()
            factor = 1.0
        else:
            scale = scaler.get_scale()
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            factor = scaler.get_scale() / scale
            if factor != 1.0:
                state.rescale_memories(factor)
            stepped = not all(torch.equal(a, b) for a, b in zip(before_params, model.parameters()))
        memory = state.memory.state_dict()
        records.append(
            {
                "stepped": stepped,
                "memory_finite": all(torch.isfinite(t).all() for t in memory.values()),
                # At the poisoned step the memory must be what it was, times the scaler's change.
                "memory_change": max(
                    float(
                        (memory[k] - factor * before_memory.get(k, torch.zeros_like(memory[k]))).abs().max()
                    )
                    for k in memory
                ),
                "memory_magnitude": max(float(t.abs().max()) for t in memory.values()),
                "params": [p.detach().clone() for p in model.parameters()],
            }
        )
    return records


def _nonfinite_runs(rank, world_size):
    return {
        (label, use_scaler): _train(rank, value, use_scaler, compressor)
        for label, value in (("nan", float("nan")), ("-inf", float("-inf")))
        for use_scaler in (False, True)
        for compressor in [ec_hooks.TopK(0.2) if label == "nan" else ec_hooks.RandK(0.2)]
    }


@pytest.mark.slow
def test_nan_and_inf_gradients_never_enter_memory_with_and_without_grad_scaler():
    results = run_distributed(_nonfinite_runs, 3)
    for key in results[0]:
        for rank, per_rank in enumerate(results):
            records = per_rank[key]
            assert all(r["memory_finite"] for r in records), (key, rank)
            # Taking the finite entries back out is exact up to float rounding of the memory.
            poisoned = records[POISON_STEP]
            assert poisoned["memory_change"] <= 1e-6 * max(1.0, poisoned["memory_magnitude"]), (key, rank)
            assert not records[POISON_STEP]["stepped"], (key, rank)  # void on every rank, not only rank 1
            assert records[POISON_STEP + 1]["stepped"], (key, rank)  # and training goes on
            # Replicas stay identical through the voided step.
            for a, b in zip(records[-1]["params"], results[0][key][-1]["params"]):
                assert torch.equal(a, b), (key, rank)


def test_out_of_range_indices_are_masked_without_a_host_check():
    indices = torch.tensor([0, 4, -1, 9, 2])
    values = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    kept, masked = _mask_out_of_range(indices, values, 5)
    assert kept.tolist() == [0, 4, 0, 0, 2]
    assert masked[[0, 1, 4]].tolist() == [1.0, 2.0, 5.0] and torch.isnan(masked[[2, 3]]).all()


def _corrupt_topk_payload(device):
    topk = ec_hooks.TopK(0.5)
    payload = topk.compress(torch.arange(1.0, 7.0, device=device))
    indices = torch.tensor([5, 4, 600], dtype=torch.int32, device=device)
    values = torch.tensor([6.0, 5.0, 4.0], device=device)
    return topk, Payload(data=_to_bytes(indices, values), shape=payload.shape, value_dtype=torch.float32)


def test_topk_decode_refuses_an_out_of_range_peer_index_on_cpu():
    topk, corrupt = _corrupt_topk_payload("cpu")
    with pytest.raises(ValueError, match="index 600 outside"):
        topk.sum_payloads([corrupt])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_topk_decode_of_an_out_of_range_peer_index_on_cuda_is_visible_and_writes_nothing_outside():
    topk, corrupt = _corrupt_topk_payload("cuda")
    out = topk.sum_payloads([corrupt])
    torch.cuda.synchronize()  # a device-side assert would surface here
    assert out.shape == (6,) and torch.isnan(out[0]) and out[4].item() == 5.0 and out[5].item() == 6.0


class _FailedWork:
    """What a collective's work object holds after a peer died."""

    def get_future(self):
        fut = torch.futures.Future()
        fut.set_exception(RuntimeError("Connection closed by peer"))
        return fut


def test_a_failed_collective_fails_the_future_instead_of_returning_its_unfilled_buffer():
    with pytest.raises(RuntimeError, match="Connection closed by peer"):
        _resolve_to(_FailedWork(), torch.empty(3)).wait()
