"""``GossipAlgorithm.average_into(module)``: the mean model loaded into a module, on real gloo
processes: parameters averaged (in place or into a copy), floating buffers averaged, integer
buffers kept."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist

from ec_hooks import ChocoSGD, DeepSqueeze, TopK
from tests.distributed import run_distributed


def _mean_over_ranks(tensor: torch.Tensor, world_size: int) -> torch.Tensor:
    gathered = [torch.empty_like(tensor, dtype=torch.float64) for _ in range(world_size)]
    dist.all_gather(gathered, tensor.detach().to(torch.float64))
    return torch.stack(gathered).mean(dim=0)


def _average_into(rank, world_size, cls_name):
    cls = {"DeepSqueeze": DeepSqueeze, "ChocoSGD": ChocoSGD}[cls_name]
    torch.manual_seed(rank)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))
    for _ in range(rank + 1):  # running statistics and num_batches_tracked differ across ranks
        model(torch.randn(8, 3))
    gossip = cls(model.parameters(), "ring", TopK(0.5), 0.3, watch_every=0)
    for step in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(
                    torch.randn(p.shape, generator=torch.Generator().manual_seed(10 * step + rank)), alpha=0.1
                )
        gossip.step()
    expected_params = [_mean_over_ranks(p, world_size) for p in model.parameters()]
    expected_buffers = {
        name: _mean_over_ranks(b, world_size) for name, b in model.named_buffers() if b.is_floating_point()
    }
    local = {name: t.detach().clone() for name, t in model.state_dict().items()}

    evaluation = copy.deepcopy(model)
    gossip.average_into(evaluation)
    out = {
        "param_error": max(
            float((p.double() - e).abs().max()) for p, e in zip(evaluation.parameters(), expected_params)
        ),
        "buffer_error": max(
            float((dict(evaluation.named_buffers())[n].double() - e).abs().max())
            for n, e in expected_buffers.items()
        ),
        "num_batches_tracked": int(evaluation[1].num_batches_tracked),
        "local_untouched": all(torch.equal(local[n], t) for n, t in model.state_dict().items()),
        "spread_before": max(
            float((p.double() - e).abs().max()) for p, e in zip(model.parameters(), expected_params)
        ),
    }
    pointers = [p.data_ptr() for p in model.parameters()]
    gossip.average_into(model)  # in place: the same tensors, now holding the mean
    out["in_place_equals_copy"] = all(
        torch.equal(a, b) for a, b in zip(model.state_dict().values(), evaluation.state_dict().values())
    )
    out["same_tensors"] = pointers == [p.data_ptr() for p in model.parameters()]
    try:
        gossip.average_into(torch.nn.Linear(3, 4))
    except ValueError as error:
        out["mismatch"] = str(error)
    return out


@pytest.mark.parametrize(
    ("cls_name", "world_size"),
    [("DeepSqueeze", 2), pytest.param("DeepSqueeze", 3, marks=pytest.mark.slow), ("ChocoSGD", 2)],
)
def test_average_into_loads_the_mean_model_with_buffers(cls_name, world_size):
    results = run_distributed(_average_into, world_size, cls_name)
    for rank, out in enumerate(results):
        assert out["spread_before"] > 1e-3  # the workers' models differ, so the average is not trivial
        assert out["param_error"] < 1e-6 and out["buffer_error"] < 1e-6
        assert out["num_batches_tracked"] == rank + 1  # integer buffers stay each worker's own
        assert out["local_untouched"] and out["in_place_equals_copy"] and out["same_tensors"]
        assert out["mismatch"].startswith(
            f"module must be the model this {cls_name} mixes, or a copy of it: "
            "it has 2 parameters, the gossip 6"
        )
