"""The logistic-regression experiment of *Sparsified SGD with Memory* (Stich, Cordonnier, Jaggi, 2018).

    python -m recipes.memsgd_paper                 # both data sets, the sizes below (a few minutes)
    python -m recipes.memsgd_paper --quick true    # small sizes, seconds (used by the tests)

Problem (section 4 of the paper): L2-regularised logistic regression

    f(w) = (1/n) sum_i log(1 + exp(-y_i a_i^T w)) + (lambda/2) ||w||^2,   lambda = 1/n,

solved by sequential SGD with batch size 1, one worker, all methods from ``w_0 = 0``:

1. At step ``t`` take the next sample of a shuffled epoch (the same order for every method).
2. ``u = eta_t * grad f_i(w_t)`` with ``eta_t = gamma / (lambda (t + a))``.
3. SGD: ``w -= u``.  Top-k / rand-k with memory: ``acc = m + u``, ``c = C(acc)``,
   ``m = acc - c``, ``w -= c`` (the memory holds the step-size-scaled update, as in the paper).
   Top-k without memory: ``w -= C(u)``.  QSGD: ``w -= Q(u)`` (unbiased, no memory).
4. The reported model is the paper's weighted average ``x_bar = sum_t w_t x_t / sum_t w_t``
   with weights ``w_t = (a + t)^2`` (Theorem 2.4).

The shift is ``a = shift_factor * d / k`` for a method that sends ``k`` coordinates.  SGD and
QSGD use the shift of the sparsest method, as in the paper's experiments: with ``a = 1`` their
first steps would be ``2n`` long.  ``shift_factor`` is 1 for the dense set and 10 for the sparse
one (the paper's RCV1 runs use ``10 d / k``).  The compressors are those of ``ec_hooks``
(``TopK``, ``RandK``, ``QSGD``); bits per update are their exact wire sizes.

Data (generated, shaped like the originals, which are large downloads):

* dense, like epsilon: ``d = 2000``; ``a_i ~ N(0, I_d)`` normalised to unit length (epsilon's
  features are standardised and its rows unit-norm); a planted ``w* ~ N(0, I_d)`` scaled so that
  the margins ``a_i^T w*`` have standard deviation ``margin_scale`` (4); labels ``y_i = +1`` with
  probability ``sigmoid(a_i^T w*)``, else ``-1`` (balanced, with label noise like real data).
  Its optimum is higher than epsilon's (f* = 0.50 against about 0.28) because lambda = 1/n is 40
  times larger with n = 10,000 than with epsilon's 400,000 samples.
* sparse, like RCV1: ``d = 47,236``; each row has ``1 + Poisson(0.0015 d - 1)`` draws (about 71
  non-zeros, 0.15% density) of feature ids from a Zipf-like law ``p_j ~ 1 / (j + 10)`` (word
  frequencies), values ``U(0.5, 1.5) * log(1 / p_j)`` (tf-idf-like, non-negative), rows
  normalised to unit length; labels from a planted model as above.

Loss values differ from the paper's (other data); the claim reproduced is the shape: top-k and
rand-k with memory end at the SGD loss, top-k without memory does not, and the bits per update
are orders of magnitude fewer.  ``f*`` (found by full-batch L-BFGS) is printed for reference.
"""

from __future__ import annotations

import csv
import logging
import multiprocessing
import os
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Literal

import torch

from ec_hooks import QSGD, Compressor, Identity, RandK, TopK

__all__ = ["Method", "Problem", "dense_problem", "sparse_problem", "default_methods", "run_methods", "main"]

logger = logging.getLogger(__name__)

# Figures of the paper (epsilon, after 3 epochs; bits per update): only for side-by-side printing.
PAPER_EPSILON = {
    "SGD": (0.28294, 128_000),
    "top-1": (0.28269, 64),
    "rand-1": (0.28325, 64),
    "top-1 no memory": (2.50, 64),
    "QSGD 8-bit": (None, 18_000),
    "QSGD 4-bit": (None, 2_947),
    "QSGD 2-bit": (None, 617),
}


@dataclass
class Problem:
    """A binary logistic-regression data set: rows ``a_i`` (dense or sparse CSR) and labels in {-1, +1}."""

    name: str
    features: torch.Tensor  # (n, d) dense float64, or sparse CSR float64
    labels: torch.Tensor  # (n,) float64 of +-1
    description: str = ""

    @property
    def n(self) -> int:
        return self.features.shape[0]

    @property
    def d(self) -> int:
        return self.features.shape[1]

    @property
    def sparse(self) -> bool:
        return self.features.layout == torch.sparse_csr

    def margins(self, weights: torch.Tensor) -> torch.Tensor:
        """``A @ weights.T`` for a (M, d) matrix of models: (n, M)."""
        return self.features @ weights.T

    def loss(self, weights: torch.Tensor, lam: float) -> torch.Tensor:
        """f(w) for each row of ``weights`` (M,)."""
        z = self.labels[:, None] * self.margins(weights)
        return torch.nn.functional.softplus(-z).mean(0) + 0.5 * lam * weights.pow(2).sum(1)


def dense_problem(n: int = 10_000, d: int = 2000, margin_scale: float = 4.0, seed: int = 0) -> Problem:
    """Dense synthetic set shaped like epsilon (see the module docstring)."""
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(n, d, generator=g, dtype=torch.float64)
    features /= features.norm(dim=1, keepdim=True)
    w_star = torch.randn(d, generator=g, dtype=torch.float64)
    margins = features @ w_star
    w_star *= margin_scale / margins.std()
    labels = _planted_labels(features @ w_star, g)
    return Problem("dense (epsilon-like)", features, labels, f"n={n:,}, d={d:,}, dense, unit-norm rows")


def sparse_problem(
    n: int = 10_000, d: int = 47_236, density: float = 0.0015, margin_scale: float = 4.0, seed: int = 0
) -> Problem:
    """Sparse synthetic set shaped like RCV1 (see the module docstring)."""
    g = torch.Generator().manual_seed(seed)
    ranks = torch.arange(d, dtype=torch.float64)
    word_freq = 1.0 / (ranks + 10.0)
    word_freq /= word_freq.sum()
    per_row = (
        1
        + torch.poisson(
            torch.full((n,), max(density * d - 1.0, 0.0), dtype=torch.float64), generator=g
        ).long()
    )
    rows = torch.repeat_interleave(torch.arange(n), per_row)
    cols = torch.multinomial(word_freq, int(per_row.sum()), replacement=True, generator=g)
    values = (0.5 + torch.rand(cols.numel(), generator=g, dtype=torch.float64)) * torch.log(
        1.0 / word_freq[cols]
    )
    coo = torch.sparse_coo_tensor(
        torch.stack([rows, cols]), values, (n, d), check_invariants=False
    ).coalesce()
    rows, cols = coo.indices()
    values = coo.values()
    norms = torch.zeros(n, dtype=torch.float64).index_add_(0, rows, values**2).sqrt()
    values = values / norms[rows]
    with warnings.catch_warnings():  # "sparse CSR support is in beta": the matrix products used here are not
        warnings.simplefilter("ignore", UserWarning)
        features = (
            torch.sparse_coo_tensor(torch.stack([rows, cols]), values, (n, d), check_invariants=False)
            .coalesce()
            .to_sparse_csr()
        )
    w_star = torch.randn(d, generator=g, dtype=torch.float64)
    margins = features @ w_star
    margins *= margin_scale / margins.std()
    labels = _planted_labels(margins, g)
    nnz = values.numel()
    return Problem(
        "sparse (RCV1-like)",
        features,
        labels,
        f"n={n:,}, d={d:,}, {nnz / (n * d):.2%} non-zeros ({nnz / n:.0f} per row), unit-norm rows",
    )


def _planted_labels(margins: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    positive = torch.rand(margins.shape, generator=g, dtype=torch.float64) < torch.sigmoid(margins)
    return torch.where(positive, 1.0, -1.0).to(torch.float64)


@dataclass
class Method:
    """One optimiser of the comparison.

    ``kind``: ``"sgd"`` (dense update), ``"memory"`` (error feedback), ``"no_memory"`` (compress
    the update, drop the rest) or ``"unbiased"`` (QSGD).  ``k`` is the number of coordinates the
    method sends (``d`` for dense ones); it sets the shift ``a``.
    """

    name: str
    kind: Literal["sgd", "memory", "no_memory", "unbiased"]
    compressor: Compressor = field(default_factory=Identity)
    k: int | None = None


def default_methods(d: int, ks: tuple[int, ...], qsgd_bits: tuple[int, ...] = (8, 4, 2)) -> list[Method]:
    """SGD, top-k and rand-k with memory for each k, top-(min k) without memory, QSGD b-bit."""
    methods = [Method("SGD", "sgd")]
    # torch.topk is the fastest selection at these sizes (k of at most 30, d of at most 47k).
    methods += [Method(f"top-{k}", "memory", TopK(density=k / d, backend="torch"), k) for k in ks]
    methods += [Method(f"rand-{k}", "memory", RandK(density=k / d, seed=i), k) for i, k in enumerate(ks)]
    methods.append(
        Method(f"top-{min(ks)} no memory", "no_memory", TopK(density=min(ks) / d, backend="torch"), min(ks))
    )
    methods += [Method(f"QSGD {b}-bit", "unbiased", QSGD.from_bits(b, seed=b)) for b in qsgd_bits]
    return methods


def optimum(problem: Problem, lam: float, iterations: int = 200) -> float:
    """f* by full-batch L-BFGS (the problem is strongly convex)."""
    w = torch.zeros(1, problem.d, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS(
        [w],
        lr=1.0,
        max_iter=iterations,
        tolerance_grad=1e-12,
        tolerance_change=1e-15,
        history_size=20,
        line_search_fn="strong_wolfe",
    )

    def closure():
        opt.zero_grad()
        loss = problem.loss(w, lam).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return float(problem.loss(w.detach(), lam))


@dataclass
class Result:
    method: Method
    losses: list[float]  # f(x_bar) after each epoch
    bits_per_update: int
    shift: float


def run_methods(
    problem: Problem,
    methods: list[Method],
    epochs: int = 3,
    gamma: float = 2.0,
    shift_factor: float = 1.0,
    seed: int = 0,
) -> list[Result]:
    """Run every method on ``problem`` side by side (one sample order), batch size 1.

    All models live in one (M, d) matrix so that the gradient, step and averaging of every method
    are a few tensor operations per step; only the compressors are called method by method.
    """
    n, d = problem.n, problem.d
    lam = 1.0 / n
    num = len(methods)
    k_min = min(m.k for m in methods if m.k is not None)
    shifts = torch.tensor(
        [shift_factor * d / (m.k if m.k is not None else k_min) for m in methods], dtype=torch.float64
    )
    # fp32 like the wire; the compressors' rounding stays in memory.  Losses are evaluated in fp64.
    w = torch.zeros(num, d)
    w_bar = torch.zeros(num, d)
    weight_sum = torch.zeros(num, dtype=torch.float64)
    memory = torch.zeros(num, d)
    order_gen = torch.Generator().manual_seed(seed)
    labels = problem.labels.tolist()
    if problem.sparse:
        crow = problem.features.crow_indices().tolist()
        col = problem.features.col_indices()
        val = problem.features.values().float()
    else:
        dense = problem.features.float()
    losses: list[list[float]] = []
    t = 0
    for _epoch in range(epochs):
        for i in torch.randperm(n, generator=order_gen).tolist():
            lr = gamma / (lam * (t + shifts))  # (M,)
            y = labels[i]
            if problem.sparse:
                idx, a = col[crow[i] : crow[i + 1]], val[crow[i] : crow[i + 1]]
                margin = w[:, idx] @ a
            else:
                a = dense[i]
                margin = w @ a
            # eta * grad f_i(w) = coef * a + eta * lam * w,  coef = -y sigmoid(-y a^T w) eta
            coef = (-y * torch.sigmoid(-y * margin.double()) * lr).tolist()
            decay = (lr * lam).tolist()
            for j, method in enumerate(methods):
                row, c = w[j], coef[j]
                if method.kind == "sgd":
                    row.mul_(1.0 - decay[j])
                    _add_scaled(row, idx if problem.sparse else None, a, -c)
                    continue
                if method.kind == "memory":
                    source = memory[j].add_(row, alpha=decay[j])
                else:
                    source = row * decay[j]
                _add_scaled(source, idx if problem.sparse else None, a, c)
                payload = method.compressor.compress(source, step=t, key=j)
                if method.kind == "memory":
                    method.compressor.subtract_sent_(source, payload)  # what was not sent stays in memory
                method.compressor.subtract_sent_(row, payload)  # w -= C(source)
            # weighted average with weights (a + t)^2, in place
            weight = (shifts + t) ** 2
            weight_sum += weight
            rho = (weight / weight_sum).float()[:, None]
            w_bar.mul_(1.0 - rho).addcmul_(w, rho)
            t += 1
        losses.append(problem.loss(w_bar.double(), lam).tolist())
    results = []
    for j, method in enumerate(methods):
        bits = 8 * (Identity().wire_bytes(d) if method.kind == "sgd" else method.compressor.wire_bytes(d))
        results.append(Result(method, [epoch_losses[j] for epoch_losses in losses], bits, float(shifts[j])))
    return results


def _add_scaled(target: torch.Tensor, idx: torch.Tensor | None, a: torch.Tensor, scale: float) -> None:
    """``target += scale * a`` for a dense row ``a`` or one given by its non-zeros at ``idx``."""
    if idx is None:
        target.add_(a, alpha=scale)
    else:
        target.index_add_(0, idx, a, alpha=scale)


def format_table(
    problem: Problem, results: list[Result], f_star: float, seconds: float, paper: dict | None
) -> str:
    lines = [
        f"### {problem.name}: {problem.description}",
        "",
        f"lambda = 1/n, batch 1, {len(results[0].losses)} epochs, f* = {f_star:.5f} (L-BFGS); wall time {seconds:.0f} s",
        "",
        "| method | shift a | final loss | loss - f* | bits per update | vs SGD | paper: loss | paper: bits |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    sgd_bits = results[0].bits_per_update
    for r in results:
        paper_loss, paper_bits = (paper or {}).get(r.method.name, (None, None))
        lines.append(
            f"| {r.method.name} | {r.shift:,.0f} | {r.losses[-1]:.5f} | {r.losses[-1] - f_star:.2e} | "
            f"{r.bits_per_update:,} | {sgd_bits / r.bits_per_update:,.0f}x | "
            f"{'' if paper_loss is None else f'{paper_loss:.5f}'} | {'' if paper_bits is None else f'{paper_bits:,}'} |"
        )
    return "\n".join(lines)


def _run_plan(kind: str, n: int, d: int, epochs: int, gamma: float, seed: int, threads: int) -> dict:
    """One data set: generate it, find f*, run every method; a picklable summary."""
    torch.set_num_threads(threads)
    if kind == "dense":
        problem, ks, shift_factor, paper = dense_problem(n, d, seed=seed), (1, 2, 3), 1.0, PAPER_EPSILON
    else:
        problem, ks, shift_factor, paper = sparse_problem(n, d, seed=seed), (10, 20, 30), 10.0, None
    f_star = optimum(problem, 1.0 / problem.n)
    start = time.perf_counter()
    results = run_methods(problem, default_methods(problem.d, ks), epochs, gamma, shift_factor, seed)
    seconds = time.perf_counter() - start
    rows = [
        {
            "dataset": problem.name,
            "method": r.method.name,
            "shift": r.shift,
            "f_star": f_star,
            "bits_per_update": r.bits_per_update,
            "seconds": round(seconds, 1),
            **{f"loss_epoch{e + 1}": v for e, v in enumerate(r.losses)},
        }
        for r in results
    ]
    return {
        "name": problem.name,
        "results": results,
        "rows": rows,
        "table": format_table(problem, results, f_star, seconds, paper),
    }


def main(
    dataset: Literal["dense", "sparse", "both"] = "both",
    quick: bool = False,
    epochs: int = 3,
    dense_n: int = 10_000,
    dense_d: int = 2000,
    sparse_n: int = 8_000,
    sparse_d: int = 47_236,
    gamma: float = 2.0,
    seed: int = 0,
    threads: int = 1,
    parallel: bool = True,
    out_dir: str | None = "runs/memsgd_paper",
) -> dict[str, list[Result]]:
    """Run the reproduction and print one table per data set.

    Args:
        dataset: which data set(s) to run.
        quick: small sizes for a smoke run (dense n=1,000, d=200; sparse n=400, d=4,000;
            2 epochs, unless given explicitly).
        epochs: passes over the data (the paper reports epsilon after 3).
        dense_n, dense_d, sparse_n, sparse_d: data set sizes.
        gamma: step-size numerator (the paper uses 2).
        seed: data and sample order.
        threads: torch threads per data set (the per-step tensors are small: one is fastest).
        parallel: run the two data sets in two processes at once (one core each).
        out_dir: where ``memsgd_paper.md`` and ``memsgd_paper.csv`` are written (None: nowhere).
    """
    if quick:
        dense_n, dense_d, sparse_n, sparse_d, epochs = 1000, 200, 400, 4000, min(epochs, 2)
    plans = []
    if dataset in ("dense", "both"):
        plans.append(("dense", dense_n, dense_d, epochs, gamma, seed, threads))
    if dataset in ("sparse", "both"):
        plans.append(("sparse", sparse_n, sparse_d, epochs, gamma, seed, threads))
    if parallel and len(plans) > 1:
        with ProcessPoolExecutor(len(plans), mp_context=multiprocessing.get_context("spawn")) as pool:
            summaries = list(pool.map(_run_plan, *zip(*plans)))
    else:
        summaries = [_run_plan(*plan) for plan in plans]
    for summary in summaries:
        print(summary["table"] + "\n", flush=True)
    if out_dir:
        rows = [row for summary in summaries for row in summary["rows"]]
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "memsgd_paper.md"), "w") as f:
            f.write("\n\n".join(summary["table"] for summary in summaries) + "\n")
        with open(os.path.join(out_dir, "memsgd_paper.csv"), "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
            writer.writeheader()
            writer.writerows(rows)
    return {summary["name"]: summary["results"] for summary in summaries}


if __name__ == "__main__":
    from jsonargparse import CLI

    CLI(main, as_positional=False)
