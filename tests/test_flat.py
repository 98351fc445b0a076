"""The flat-buffer helpers: flatten, spans, split are inverse to each other and keep the order."""

from __future__ import annotations

import torch

from ec_hooks.flat import flatten, spans, split


def test_spans_are_consecutive():
    assert spans([3, 0, 2]) == [(0, 3), (3, 3), (3, 5)]
    assert spans([]) == []


def test_flatten_then_split_gives_the_tensors_back_as_views():
    tensors = [
        torch.arange(6.0).view(2, 3),
        torch.tensor([7.0], dtype=torch.float64),
        torch.ones(2, 1, 2, dtype=torch.bfloat16),
    ]
    buffer = flatten(tensors, torch.float32)
    assert buffer.dtype == torch.float32 and buffer.tolist() == [0, 1, 2, 3, 4, 5, 7, 1, 1, 1, 1]
    parts = split(buffer, tensors)
    assert [p.shape for p in parts] == [t.shape for t in tensors]
    assert all(torch.equal(p, t.float()) for p, t in zip(parts, tensors))
    parts[1].fill_(-1)  # views: writing a part writes the buffer
    assert buffer[6] == -1


def test_split_by_counts_and_flatten_into_out():
    buffer = torch.arange(5.0)
    assert [p.tolist() for p in split(buffer, [2, 0, 3])] == [[0, 1], [], [2, 3, 4]]
    out = torch.empty(3, dtype=torch.float64)
    result = flatten([torch.tensor([1.5]), torch.tensor([2, 3])], torch.float64, out=out)
    assert result.data_ptr() == out.data_ptr() and out.tolist() == [1.5, 2.0, 3.0]
    source = torch.ones(2, requires_grad=True)
    assert not flatten([source]).requires_grad  # detached: flattening is not part of the graph
