"""Topologies: mixing matrices, peers, spectral gaps and validation (single process)."""

import math

import pytest
import torch

from ec_hooks import TOPOLOGY_NAMES, Topology

STATIC = [
    Topology.ring(1),
    Topology.ring(2),
    Topology.ring(3),
    Topology.ring(7),
    Topology.torus(2, 3),
    Topology.torus(3, 4),
    Topology.complete(5),
    Topology.exponential(6),
    Topology.exponential(8),
]
TIME_VARYING = [Topology.one_peer_exponential(n) for n in (2, 3, 4, 6, 8)]


@pytest.mark.parametrize("topology", STATIC + TIME_VARYING, ids=repr)
def test_every_matrix_is_doubly_stochastic_and_matches_weights_and_peers(topology):
    n = topology.size
    for step in range(topology.period + 1):
        w = topology.matrix(step)
        assert w.shape == (n, n)
        assert (w >= 0).all()
        torch.testing.assert_close(w.sum(dim=0), torch.ones(n, dtype=torch.float64))
        torch.testing.assert_close(w.sum(dim=1), torch.ones(n, dtype=torch.float64))
        for rank in range(n):
            row = topology.weights(rank, step)
            assert rank in row
            assert row == {j: float(w[rank, j]) for j in range(n) if w[rank, j] > 0}
            assert topology.in_peers(rank, step) == sorted(j for j in row if j != rank)
            assert topology.out_peers(rank, step) == [i for i in range(n) if i != rank and w[i, rank] > 0]
            # what rank sends, its out-peers expect: the send and receive lists agree everywhere
            for peer in topology.out_peers(rank, step):
                assert rank in topology.in_peers(peer, step)


@pytest.mark.parametrize("topology", STATIC, ids=repr)
def test_static_topologies_are_symmetric(topology):
    assert not topology.time_varying and topology.period == 1
    w = topology.matrix()
    torch.testing.assert_close(w, w.T)


def test_named_weights():
    assert Topology.ring(1).weights(0) == {0: 1.0}
    assert Topology.ring(2).weights(0) == {0: 0.5, 1: 0.5}
    ring = Topology.ring(5).weights(2)
    assert set(ring) == {1, 2, 3} and all(math.isclose(v, 1 / 3) for v in ring.values())
    torus = Topology.torus(3, 3).weights(4)  # centre of a 3x3 grid: up, down, left, right
    assert set(torus) == {1, 3, 4, 5, 7} and all(math.isclose(v, 1 / 5) for v in torus.values())
    assert set(Topology.exponential(8).weights(0)) == {0, 1, 2, 4, 6, 7}
    assert Topology.complete(4).weights(3) == {r: 0.25 for r in range(4)}


def test_one_peer_exponential_sends_and_receives_at_distance_two_to_the_step():
    topology = Topology.one_peer_exponential(8)
    assert topology.time_varying and topology.period == 3
    for step in range(7):
        hop = 2 ** (step % 3)
        for rank in range(8):
            assert topology.out_peers(rank, step) == [(rank + hop) % 8]
            assert topology.in_peers(rank, step) == [(rank - hop) % 8]
            assert topology.weights(rank, step) == {rank: 0.5, (rank - hop) % 8: 0.5}
    # W(t) is not symmetric for n = 8 but for n = 2 the peer is both ways
    assert not torch.equal(topology.matrix(0), topology.matrix(0).T)
    assert Topology.one_peer_exponential(2).weights(1, 5) == {0: 0.5, 1: 0.5}


@pytest.mark.parametrize("n", [2, 4, 8, 16])
def test_one_peer_exponential_averages_exactly_in_log2_n_steps(n):
    topology = Topology.one_peer_exponential(n)
    steps = int(math.log2(n))
    x = torch.randn(n, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    for t in range(steps):
        before = x.clone()
        x = topology.matrix(t) @ x
        if t < steps - 1:
            assert (x - x.mean(dim=0)).abs().max() > 1e-3  # not there yet
        torch.testing.assert_close(x.mean(dim=0), before.mean(dim=0))
    assert (x - x.mean(dim=0)).abs().max() < 1e-12
    assert topology.spectral_gap == pytest.approx(1.0)


def test_spectral_gaps():
    assert Topology.complete(6).spectral_gap == pytest.approx(1.0)
    assert Topology.ring(2).spectral_gap == pytest.approx(1.0)
    assert Topology.ring(1).spectral_gap == 0.0
    for n in (5, 8, 16):  # ring eigenvalues 1/3 + 2/3 cos(2 pi k / n)
        lambdas = [1 / 3 + 2 / 3 * math.cos(2 * math.pi * k / n) for k in range(1, n)]
        assert Topology.ring(n).spectral_gap == pytest.approx(1 - max(abs(v) for v in lambdas))
    ring, exponential = Topology.ring(16), Topology.exponential(16)
    assert 0 < ring.spectral_gap < exponential.spectral_gap < 1
    # time-varying and not a power of two: mixes, but not exactly
    assert 0 < Topology.one_peer_exponential(6).spectral_gap < 1


def test_from_matrix_accepts_a_valid_matrix():
    w = [[0.5, 0.5, 0.0], [0.5, 0.25, 0.25], [0.0, 0.25, 0.75]]
    topology = Topology.from_matrix(w)
    assert topology.name == "custom" and topology.size == 3 and not topology.time_varying
    assert topology.weights(2) == {1: 0.25, 2: 0.75}
    assert topology.in_peers(0) == topology.out_peers(0) == [1]
    assert Topology.make(torch.tensor(w), 3) == topology


@pytest.mark.parametrize(
    "matrix, properties",
    [
        ([[0.5, 0.5], [0.3, 0.7]], ["not symmetric"]),
        ([[0.6, 0.5, -0.1], [0.5, 0.0, 0.5], [-0.1, 0.5, 0.6]], ["not non-negative"]),
        ([[0.9, 0.2], [0.2, 0.9]], ["rows do not sum to 1"]),
        ([[1.0, 0.0, 0.0], [0.0, 0.5, 0.5], [0.0, 0.5, 0.5]], ["not connected"]),
        ([[0.6, 0.0, 0.0], [0.0, 0.5, 0.5], [0.4, 0.5, 0.5]], ["not symmetric", "rows do not sum to 1"]),
        ([[1.5, -0.5, 0.0], [-0.5, 1.5, 0.0], [0.0, 0.0, 1.0]], ["not non-negative", "not connected"]),
    ],
)
def test_from_matrix_names_every_failing_property(matrix, properties):
    with pytest.raises(ValueError) as info:
        Topology.from_matrix(matrix)
    message = str(info.value)
    for prop in properties:
        assert prop in message
    for other in {"not symmetric", "not non-negative", "rows do not sum to 1", "not connected"} - set(
        properties
    ):
        assert other not in message


@pytest.mark.parametrize("matrix", [[[0.5, 0.5]], [1.0, 0.0], [], "ring", [[float("nan")]]])
def test_from_matrix_rejects_malformed_input(matrix):
    with pytest.raises(ValueError, match="matrix"):
        Topology.from_matrix(matrix)


def test_make_resolves_names_and_checks_sizes():
    for name in TOPOLOGY_NAMES:
        topology = Topology.make(name, 8)
        assert topology.size == 8 and topology.name == name
    assert Topology.make("one-peer-exponential", 4).name == "one_peer_exponential"
    assert Topology.make("torus", 12) == Topology.torus(3, 4)
    assert Topology.make("torus", 7) == Topology.torus(1, 7)
    ring = Topology.ring(4)
    assert Topology.make(ring, 4) is ring
    with pytest.raises(ValueError, match="4 workers but the process group has 3"):
        Topology.make(ring, 3)
    with pytest.raises(
        ValueError, match=r"one of \['ring', 'torus', 'complete', 'exponential', 'one_peer_exponential'\]"
    ):
        Topology.make("star", 4)
    with pytest.raises(ValueError, match="topology must be"):
        Topology.make(3.5, 4)


@pytest.mark.parametrize(
    "call",
    [
        lambda: Topology.ring(0),
        lambda: Topology.ring(2.0),
        lambda: Topology.torus(0, 3),
        lambda: Topology.complete(True),
        lambda: Topology.exponential(-1),
        lambda: Topology.one_peer_exponential("4"),
        lambda: Topology.ring(4).weights(4),
        lambda: Topology.ring(4).out_peers(-1),
    ],
)
def test_bad_sizes_and_ranks_raise(call):
    with pytest.raises(ValueError, match=r"(n|rows|rank) must be an integer"):
        call()
