"""Gramian-only aggregator weights for small K in plain Python floats.

A ``K×K`` Gramian is a handful of numbers; each torch or NumPy operation on it costs
microseconds of dispatch while the arithmetic costs nanoseconds. For ``K ≤`` :data:`SMALL_K`
on the CPU, UPGrad, DualProj, MGDA and IMTL-G therefore run their algorithms on
``gram.tolist()``: the same iterations, closed forms and stopping rules as their tensor paths,
so the same weights up to float64 rounding (``benchmarks/results/small_k_weights.md``: 3-15x
faster weights for K <= 4, the crossover near K = 8-12). This module holds what they share
and the dual-cone solver; MGDA's own iterations are in :mod:`._mgda_small`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "SMALL_K",
    "SmallKFallback",
    "dual_cone_entries",
    "regularized_entries",
    "small_cpu_entries",
    "solve_small",
]

_EPS = torch.finfo(torch.float64).eps

#: The largest K for which CPU Gramians are read into Python floats and the weights computed
#: with plain float arithmetic (the same algorithms; see :func:`small_cpu_entries`).
SMALL_K = 8


class SmallKFallback(Exception):
    """The plain-float path met a case it leaves to the tensor path (an exactly singular
    system or a non-finite intermediate): the caller reruns the tensor path."""


def small_cpu_entries(gram: Tensor, max_k: int | None = None) -> list[list[float]] | None:
    r"""The entries of a small CPU Gramian as Python floats, or ``None`` for the tensor path.

    For ``K ≤ max_k`` (default :data:`SMALL_K`) a ``K×K`` Gramian is a handful of numbers,
    and each torch or NumPy operation on it costs microseconds of dispatch while the arithmetic
    costs nanoseconds. So the Gramian-only aggregators (UPGrad, DualProj, MGDA, IMTL-G) run
    their algorithm on ``gram.tolist()`` in plain float64 arithmetic: the same iterations,
    closed forms and stopping rules, so the same weights up to float64 rounding (the order of
    a few sums and the elimination of the small linear systems differ, so the two paths agree
    to about the systems' condition number times the machine epsilon). Cases the tensor path
    decides through a singular or nearly singular system, or a non-finite value, raise
    :class:`SmallKFallback` and go to the tensor path. Only for a plain, strided CPU tensor of
    float32/float64 (read exactly as float64) that does not require grad; on an accelerator
    reading the values would synchronise the host, so the tensor path (no host sync) is kept.
    """
    if (
        type(gram) is not Tensor
        or gram.device.type != "cpu"
        or gram.dtype not in (torch.float64, torch.float32)
        or gram.layout != torch.strided
        or gram.requires_grad
        or gram.dim() != 2
        or not 0 < gram.shape[0] <= (SMALL_K if max_k is None else max_k)
    ):
        return None
    return gram.tolist()


def solve_small(a: list[list[float]], b: list[float], max_cond: float = math.inf) -> list[float]:
    r"""``a⁻¹ b`` by Gaussian elimination with partial pivoting (LAPACK's ``gesv`` algorithm),
    in Python floats; ``a`` and ``b`` are not modified.

    Raises :class:`SmallKFallback` on an exactly zero (or NaN) pivot, where ``gesv`` reports a
    singular matrix, and, for a finite ``max_cond``, when the 1-norm condition number
    :math:`\lVert a\rVert_1 \lVert a^{-1}\rVert_1` exceeds it (computed from the ``n``
    columns of the inverse, cheap for the ``n ≤ 9`` systems met here): there the result would
    differ from a least-squares or pseudo-inverse solve by more than rounding.
    """
    n = len(b)
    lu = [row[:] for row in a]
    perm = list(range(n))
    for col in range(n):
        piv = col
        big = abs(lu[col][col])
        for r in range(col + 1, n):
            if abs(lu[r][col]) > big:
                piv, big = r, abs(lu[r][col])
        if not big > 0.0:
            raise SmallKFallback
        if piv != col:
            lu[col], lu[piv] = lu[piv], lu[col]
            perm[col], perm[piv] = perm[piv], perm[col]
        top = lu[col]
        inv = 1.0 / top[col]
        for r in range(col + 1, n):
            row = lu[r]
            f = row[col] * inv
            row[col] = f
            if f != 0.0:
                for c in range(col + 1, n):
                    row[c] -= f * top[c]
    x = _lu_solve(lu, [b[p] for p in perm])
    if max_cond < math.inf:
        norm = max(sum(abs(a[i][j]) for i in range(n)) for j in range(n))
        norm_inv = 0.0
        for j in range(n):
            column = _lu_solve(lu, [1.0 if p == j else 0.0 for p in perm])
            norm_inv = max(norm_inv, sum(abs(e) for e in column))
        if not norm * norm_inv <= max_cond:
            raise SmallKFallback
    return x


def _lu_solve(lu: list[list[float]], pb: list[float]) -> list[float]:
    """Solve with the packed factors (unit lower ``L``, upper ``U``) and the permuted ``b``."""
    n = len(pb)
    y = pb[:]
    for i in range(n):
        row = lu[i]
        acc = y[i]
        for c in range(i):
            acc -= row[c] * y[c]
        y[i] = acc
    for i in range(n - 1, -1, -1):
        row = lu[i]
        acc = y[i]
        for c in range(i + 1, n):
            acc -= row[c] * y[c]
        y[i] = acc / row[i]
    return y


def regularized_entries(g: list[list[float]], norm_eps: float, reg_eps: float) -> list[list[float]]:
    """:func:`regularized_gramian` on Python floats (the same operations, the same result)."""
    k = len(g)
    trace = 0.0
    for i in range(k):
        trace += g[i][i]
    if trace < norm_eps:
        out = [[0.0] * k for _ in range(k)]
    else:
        safe = trace if trace > 0 else 1.0  # a NaN trace stays NaN
        out = [[entry / safe for entry in row] for row in g]
    for i in range(k):
        out[i][i] += reg_eps
    return out


def dual_cone_entries(
    rhs: list[list[float]], g: list[list[float]], max_iter: int | None = None
) -> list[list[float]]:
    r""":func:`dual_cone_weights` on Python floats: the weights for each right-hand side of
    ``rhs`` (lists of K floats) and the Gramian ``g`` (K lists of K floats).

    The same iterations and stopping rule as :func:`_dual_cone_weights_numpy`, one right-hand
    side after the other (they are independent there too); the masked systems are solved by
    :func:`solve_small`. Raises :class:`SmallKFallback` on an exactly singular system or a
    non-finite iterate, where the caller reruns the tensor path. A non-finite ``g`` gives NaN.
    """
    k = len(g)
    if not all(math.isfinite(entry) for row in g for entry in row):
        return [[math.nan] * k for _ in rhs]
    iterations = 4 * k + 10 if max_iter is None else max_iter
    cols = [list(col) for col in zip(*g)]  # products with G are Σ_j v_j G_jm, column by column
    abs_cols = [[abs(entry) for entry in col] for col in cols]
    return [_dual_cone_one(u, g, cols, abs_cols, iterations) for u in rhs]


def _dot(a: list[float], b: list[float]) -> float:
    acc = 0.0
    for x, y in zip(a, b):
        acc += x * y
    return acc


def _dual_cone_one(
    u: list[float],
    g: list[list[float]],
    cols: list[list[float]],
    abs_cols: list[list[float]],
    iterations: int,
) -> list[float]:
    k = len(u)
    bound = 4 * k * _EPS
    q = [_dot(u, col) for col in cols]
    x = [0.0] * k
    passive = [False] * k
    idx: list[int] = []  # the passive set, increasing
    for _ in range(iterations):
        z = [0.0] * k
        feasible = True
        if idx:
            sol = solve_small([[g[i][j] for j in idx] for i in idx], [-q[i] for i in idx])
            for i, value in zip(idx, sol):
                if not math.isfinite(value):
                    raise SmallKFallback
                z[i] = value
                if not value > 0:
                    feasible = False
        if feasible:
            # accepted: x = z; the most violated multiplier enters P, or we are optimal
            v = [a + b for a, b in zip(u, z)]
            best, enter = -math.inf, -1
            for m in range(k):
                if passive[m]:
                    continue
                lin = mag = 0.0
                for a, b, c in zip(v, cols[m], abs_cols[m]):
                    lin += a * b
                    mag += abs(a) * c
                slack = -lin - bound * mag
                if slack > best:
                    best, enter = slack, m
                elif slack != slack:
                    raise SmallKFallback
            x = z
            if not best > 0:
                break
            passive[enter] = True
            idx = [j for j in range(k) if passive[j]]
            continue
        # rejected: step towards z until the first passive coordinate hits 0, and drop it
        alpha, leave = math.inf, -1
        for j in idx:
            if z[j] <= 0:
                gap = x[j] - z[j]
                ratio = x[j] / (gap if gap > 0 else 1.0)
                if ratio < alpha:
                    alpha, leave = ratio, j
        if not alpha > 0:  # rounding: the entering index cannot grow
            break
        step = min(alpha, 1.0)
        moved = [a + step * (b - a) for a, b in zip(x, z)]
        cut = bound * max(abs(value) for value in moved)
        for j in range(k):
            if j == leave or moved[j] <= cut:
                x[j] = 0.0
                passive[j] = False
            else:
                x[j] = moved[j]
        idx = [j for j in range(k) if passive[j]]
    return [a + b for a, b in zip(u, x)]
