"""Communication topologies for gossip: who talks to whom, with which mixing weights.

A topology of ``n`` workers is a mixing matrix ``W`` (``n x n``) or, for time-varying graphs, a
periodic sequence ``W(0), W(1), ..., W(period - 1)``.  Row ``i`` of ``W(t)`` says how worker ``i``
mixes what it receives at step ``t``: ``x_i <- sum_j W_ij(t) x_j``.  Hence

* ``in_peers(i, t)``: the ``j != i`` with ``W_ij(t) > 0`` -- the workers ``i`` receives from;
* ``out_peers(i, t)``: the ``k != i`` with ``W_ki(t) > 0`` -- the workers ``i`` sends to.

For symmetric matrices both are the same set.  The one-peer exponential graph is not symmetric:
at step ``t`` worker ``i`` sends to ``i + 2^j`` and receives from ``i - 2^j`` (``j = t mod
log2 n``).  Every matrix built here is *doubly stochastic*: rows sum to 1, so consensus is a fixed
point of the mixing, and columns sum to 1, so the mean over workers of ``sum_j W_ij x_j`` is the
mean of the ``x_j`` -- the average-model invariant the gossip algorithms rely on.

Constructors (all validated): :meth:`Topology.ring`, :meth:`Topology.torus`,
:meth:`Topology.complete`, :meth:`Topology.exponential` (static, symmetric),
:meth:`Topology.one_peer_exponential` (time-varying), :meth:`Topology.from_matrix` (a user
matrix: symmetric, non-negative, rows sum to 1, connected), and :meth:`Topology.make`, which
resolves a name (``TOPOLOGY_NAMES``), a matrix or a topology for a given number of workers.
"""

from __future__ import annotations

import logging
import math
import numbers
from collections.abc import Sequence

import torch

from ec_hooks.validation import check_size

__all__ = ["Topology", "TOPOLOGY_NAMES"]

logger = logging.getLogger(__name__)

TOPOLOGY_NAMES = ("ring", "torus", "complete", "exponential", "one_peer_exponential")

# Tolerance for "sums to 1" and "symmetric" on user matrices (float32 matrices round to ~1e-7).
_ATOL = 1e-6


def _max_degree_matrix(n: int, neighbours: Sequence[set[int]]) -> torch.Tensor:
    """Symmetric doubly stochastic ``W`` for an undirected graph: ``1 / (max degree + 1)`` per edge.

    On the regular graphs built here (rings, tori, circulant exponential graphs) every worker
    then gives the same weight to itself and to each neighbour.
    """
    degree = max((len(peers) for peers in neighbours), default=0)
    w = torch.zeros((n, n), dtype=torch.float64)
    for i, peers in enumerate(neighbours):
        for j in peers:
            w[i, j] = 1.0 / (degree + 1)
        w[i, i] = 1.0 - w[i].sum()
    return w


def _unreachable(matrices: Sequence[torch.Tensor]) -> list[int]:
    """Workers that information from worker 0 never reaches over the union of the graphs."""
    n = matrices[0].shape[0]
    edges = torch.zeros((n, n), dtype=torch.bool)
    for w in matrices:
        edges |= (w > 0) | (w > 0).T
    seen = {0}
    frontier = [0]
    while frontier:
        i = frontier.pop()
        for j in torch.nonzero(edges[i]).flatten().tolist():
            if j not in seen:
                seen.add(j)
                frontier.append(j)
    return [i for i in range(n) if i not in seen]


class Topology:
    """A (possibly time-varying) mixing matrix over ``size`` workers.

    Build it with the class methods; the constructor takes already validated matrices.

    Attributes:
        name: ``"ring"``, ``"torus"``, ..., or ``"custom"`` for :meth:`from_matrix`.
        size: the number of workers ``n``.
        period: number of distinct matrices; ``W(t) = W(t mod period)``.
        time_varying: ``period > 1``.
    """

    def __init__(self, name: str, matrices: Sequence[torch.Tensor]):
        if not matrices:
            raise ValueError("a topology needs at least one mixing matrix")
        self.name = name
        self._matrices = tuple(m.to(torch.float64).clone() for m in matrices)
        self.size = int(self._matrices[0].shape[0])
        self.period = len(self._matrices)
        self.time_varying = self.period > 1
        self._rows: dict[tuple[int, int], dict[int, float]] = {}
        self._cols: dict[tuple[int, int], list[int]] = {}
        self._spectral_gap: float | None = None
        problems = self._problems(symmetric=False)
        if problems:
            raise ValueError(f"invalid {name} topology: " + "; ".join(problems))

    # ------------------------------------------------------------------ constructors

    @classmethod
    def ring(cls, n: int) -> Topology:
        """Each worker mixes itself and its two ring neighbours with weight 1/3.

        ``n = 2`` degenerates to a pair (weights 1/2), ``n = 1`` to the identity.
        """
        n = check_size("n", n)
        return cls("ring", [_max_degree_matrix(n, [{(i - 1) % n, (i + 1) % n} - {i} for i in range(n)])])

    @classmethod
    def torus(cls, rows: int, cols: int) -> Topology:
        """2-D torus of ``rows x cols`` workers (rank ``r * cols + c``), weight 1/5 per neighbour.

        Sides of length 2 or 1 merge neighbours (a ``2 x 3`` torus has degree 3, weight 1/4).
        """
        rows, cols = check_size("rows", rows), check_size("cols", cols)
        n = rows * cols
        peers = []
        for i in range(n):
            r, c = divmod(i, cols)
            around = {
                ((r - 1) % rows) * cols + c,
                ((r + 1) % rows) * cols + c,
                r * cols + (c - 1) % cols,
                r * cols + (c + 1) % cols,
            }
            peers.append(around - {i})
        return cls("torus", [_max_degree_matrix(n, peers)])

    @classmethod
    def complete(cls, n: int) -> Topology:
        """Everybody with everybody, weight ``1/n``: one gossip step is an exact average."""
        n = check_size("n", n)
        return cls("complete", [torch.full((n, n), 1.0 / n, dtype=torch.float64)])

    @classmethod
    def exponential(cls, n: int) -> Topology:
        """Static exponential graph: neighbours at distance ``2^0, 2^1, ...`` on both sides.

        The undirected (symmetric) version, so that ``W`` is symmetric as DeepSqueeze and
        CHOCO-SGD assume; every worker has the same degree (about ``2 log2 n``) and weight.
        """
        n = check_size("n", n)
        hops = [2**k for k in range(max(1, math.ceil(math.log2(n))))] if n > 1 else []
        peers = [({(i + h) % n for h in hops} | {(i - h) % n for h in hops}) - {i} for i in range(n)]
        return cls("exponential", [_max_degree_matrix(n, peers)])

    @classmethod
    def one_peer_exponential(cls, n: int) -> Topology:
        """Time-varying one-peer exponential graph (Ying et al., NeurIPS 2021).

        At step ``t``, with ``j = t mod ceil(log2 n)``, worker ``i`` sends its model to
        ``i + 2^j`` and receives from ``i - 2^j`` (mod ``n``), and mixes ``1/2`` of its own with
        ``1/2`` of what it received.  One message per step.  ``W(t)`` is doubly stochastic but
        not symmetric; for ``n`` a power of two the product of ``log2 n`` consecutive matrices
        is the exact average.
        """
        n = check_size("n", n)
        if n == 1:
            return cls("one_peer_exponential", [torch.ones((1, 1), dtype=torch.float64)])
        matrices = []
        for j in range(math.ceil(math.log2(n))):
            w = 0.5 * torch.eye(n, dtype=torch.float64)
            for i in range(n):
                w[i, (i - 2**j) % n] += 0.5
            matrices.append(w)
        return cls("one_peer_exponential", matrices)

    @classmethod
    def from_matrix(cls, matrix) -> Topology:
        """A user mixing matrix, checked to be square, finite, non-negative, symmetric, with rows
        summing to 1 and a connected graph.  A ValueError lists every property that fails."""
        try:
            w = torch.as_tensor(matrix, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise ValueError(
                f"matrix must be a square 2-D array of floats, got {type(matrix).__name__}"
            ) from exc
        if w.dim() != 2 or w.shape[0] != w.shape[1] or w.shape[0] == 0:
            raise ValueError(f"matrix must be a non-empty square 2-D array, got shape {tuple(w.shape)}")
        topology = cls.__new__(cls)
        topology.name = "custom"
        topology._matrices = (w.clone(),)
        topology.size, topology.period, topology.time_varying = w.shape[0], 1, False
        topology._rows, topology._cols, topology._spectral_gap = {}, {}, None
        problems = topology._problems(symmetric=True)
        if problems:
            raise ValueError("matrix is not a valid mixing matrix: " + "; ".join(problems))
        return topology

    @classmethod
    def make(cls, topology, n: int) -> Topology:
        """Resolve ``topology`` for ``n`` workers.

        ``topology`` is a :class:`Topology` (its size must be ``n``), a name from
        ``TOPOLOGY_NAMES`` (``"torus"`` picks the most square ``rows x cols = n``), or a matrix
        (see :meth:`from_matrix`).
        """
        n = check_size("n", n)
        if isinstance(topology, Topology):
            if topology.size != n:
                hint = (
                    f"a {n} x {n} matrix" if topology.name == "custom" else f"Topology.{topology.name}({n})"
                )
                raise ValueError(
                    f"topology has {topology.size} workers but the process group has {n}: build it "
                    f"for the world size, e.g. {hint}"
                )
            return topology
        if isinstance(topology, str):
            name = topology.lower().replace("-", "_")
            if name not in TOPOLOGY_NAMES:
                raise ValueError(
                    f"topology must be a Topology, a matrix, or one of {list(TOPOLOGY_NAMES)}, "
                    f"got {topology!r}"
                )
            if name == "torus":
                rows = max(r for r in range(1, math.isqrt(n) + 1) if n % r == 0)
                return cls.torus(rows, n // rows)
            return getattr(cls, name)(n)
        if isinstance(topology, (torch.Tensor, list, tuple)) or hasattr(topology, "__array__"):
            resolved = cls.from_matrix(topology)
            return cls.make(resolved, n)
        raise ValueError(
            f"topology must be a Topology, a matrix, or one of {list(TOPOLOGY_NAMES)}, "
            f"got {type(topology).__name__}"
        )

    # ------------------------------------------------------------------ queries

    def matrix(self, step: int = 0) -> torch.Tensor:
        """The dense ``n x n`` float64 mixing matrix used at ``step`` (a copy)."""
        return self._matrices[step % self.period].clone()

    def weights(self, rank: int, step: int = 0) -> dict[int, float]:
        """Row ``rank`` of ``W(step)``: ``{peer: weight}`` for every non-zero, self included."""
        self._check_rank(rank)
        key = (step % self.period, rank)
        row = self._rows.get(key)
        if row is None:
            values = self._matrices[key[0]][rank]
            row = {int(j): float(values[j]) for j in torch.nonzero(values).flatten()}
            self._rows[key] = row
        return dict(row)

    def in_peers(self, rank: int, step: int = 0) -> list[int]:
        """Workers ``rank`` receives from at ``step`` (self excluded), ascending."""
        return sorted(j for j in self.weights(rank, step) if j != rank)

    def out_peers(self, rank: int, step: int = 0) -> list[int]:
        """Workers ``rank`` sends to at ``step`` (self excluded), ascending."""
        self._check_rank(rank)
        key = (step % self.period, rank)
        col = self._cols.get(key)
        if col is None:
            values = self._matrices[key[0]][:, rank]
            col = [int(i) for i in torch.nonzero(values).flatten() if int(i) != rank]
            self._cols[key] = col
        return list(col)

    @property
    def spectral_gap(self) -> float:
        """``1 - rho``, with ``rho`` the per-step contraction of the disagreement.

        ``rho = ||W(period-1) ... W(1) W(0) - J||_2 ^ (1/period)`` with ``J = 11^T / n``: for a
        static symmetric ``W`` it is the second largest eigenvalue modulus, so the gap is
        ``1 - max(|lambda_2|, |lambda_n|)``.  1 means exact averaging (complete graph, or a
        one-peer exponential graph over a power of two); close to 0 means slow mixing (long
        rings: about ``2 pi^2 / (3 n^2)``).  0 for a single worker.
        """
        if self._spectral_gap is None:
            n = self.size
            if n == 1:
                self._spectral_gap = 0.0
            else:
                product = torch.eye(n, dtype=torch.float64)
                for w in self._matrices:
                    product = w @ product
                rho = float(torch.linalg.matrix_norm(product - 1.0 / n, ord=2))
                self._spectral_gap = 1.0 - max(rho, 0.0) ** (1.0 / self.period)
        return self._spectral_gap

    def __eq__(self, other) -> bool:
        if not isinstance(other, Topology):
            return NotImplemented
        return self.period == other.period and all(
            a.shape == b.shape and torch.equal(a, b) for a, b in zip(self._matrices, other._matrices)
        )

    def __repr__(self) -> str:
        return (
            f"Topology(name={self.name!r}, size={self.size}, period={self.period}, "
            f"spectral_gap={self.spectral_gap:.4g})"
        )

    # ------------------------------------------------------------------ validation

    def _check_rank(self, rank: int) -> None:
        if isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or not (0 <= rank < self.size):
            raise ValueError(f"rank must be an integer in [0, {self.size}), got {rank!r}")

    def _problems(self, symmetric: bool) -> list[str]:
        problems = []
        for t, w in enumerate(self._matrices):
            where = f" (W({t}))" if self.period > 1 else ""
            if w.dim() != 2 or w.shape[0] != w.shape[1]:
                return [f"not square{where}: shape {tuple(w.shape)}"]
            if not torch.isfinite(w).all():
                return [f"has non-finite entries{where}"]
            if (w < 0).any():
                i, j = (int(v) for v in torch.nonzero(w < 0)[0])
                problems.append(f"not non-negative{where}: W[{i}, {j}] = {float(w[i, j]):.6g}")
            if symmetric and not torch.allclose(w, w.T, atol=_ATOL, rtol=0):
                i, j = (int(v) for v in torch.nonzero((w - w.T).abs() > _ATOL)[0])
                problems.append(
                    f"not symmetric{where}: W[{i}, {j}] = {float(w[i, j]):.6g} but "
                    f"W[{j}, {i}] = {float(w[j, i]):.6g}"
                )
            rows = w.sum(dim=1)
            bad = torch.nonzero((rows - 1).abs() > _ATOL).flatten()
            if bad.numel():
                i = int(bad[0])
                problems.append(f"rows do not sum to 1{where}: row {i} sums to {float(rows[i]):.6g}")
            cols = w.sum(dim=0)
            bad = torch.nonzero((cols - 1).abs() > _ATOL).flatten()
            if bad.numel() and not symmetric:  # for a symmetric matrix the row message says it all
                j = int(bad[0])
                problems.append(f"columns do not sum to 1{where}: column {j} sums to {float(cols[j]):.6g}")
        unreachable = _unreachable(self._matrices)
        if unreachable:
            problems.append(f"not connected: workers {unreachable[:8]} are unreachable from worker 0")
        return problems
