"""MGDA's min-norm weights for small K in plain Python floats (see :mod:`._small_k`): the
official start (the best pair, then projected-gradient steps) and the exact polish of
:mod:`._mgda`, the same iterations on ``gram.tolist()``."""

from __future__ import annotations

import math

from ._small_k import SmallKFallback, solve_small

__all__ = ["min_norm_entries"]


#: A KKT system with a larger condition number sends the call to the NumPy solver (its
#: least-squares solve and this elimination agree to rounding times the conditioning, and
#: its cut-off decides the numerically singular systems).
_MAX_COND = 1e8


def min_norm_entries(gram: list[list[float]], max_iter: int, tol: float, exact: bool) -> list:
    """:func:`~._mgda._min_norm_weights` for a finite ``K ≥ 2`` Gramian given as lists."""
    scale = max(gram[i][i] for i in range(len(gram)))
    d = [[e / scale for e in row] for row in gram] if scale > 0 else gram
    alpha = _official_entries(d, max_iter, tol)
    return _polish_entries(d, alpha, max_iter) if exact else alpha


def _mat_vec(d: list[list[float]], v: list[float]) -> list[float]:
    out = []
    for row in d:
        acc = 0.0
        for a, b in zip(row, v):
            acc += a * b
        out.append(acc)
    return out


def _vec_dot(a: list[float], b: list[float]) -> float:
    acc = 0.0
    for x, y in zip(a, b):
        acc += x * y
    return acc


def _two_point_entry(d11: float, d12: float, d22: float) -> tuple[float, float]:
    """:func:`_two_point` for one pair."""
    if d12 >= d11:
        return 0.999, d11
    if d12 >= d22:
        return 0.001, d22
    den = d11 + d22 - 2 * d12
    if not den > 0:  # NumPy divides by zero (or NaN) here
        raise SmallKFallback
    gamma = (d22 - d12) / den
    return gamma, d22 + gamma * (d12 - d22)


def _official_entries(d: list[list[float]], max_iter: int, tol: float) -> list[float]:
    k = len(d)
    best = None
    for r in range(k):
        for c in range(r + 1, k):
            gamma, cost = _two_point_entry(d[r][r], d[r][c], d[c][c])
            if cost != cost:
                raise SmallKFallback
            if best is None or cost < best[0]:
                best = (cost, r, c, gamma)
    assert best is not None
    _, r, c, gamma = best
    alpha = [0.0] * k
    alpha[r] = gamma
    alpha[c] = 1.0 - gamma
    if k == 2:
        return alpha

    best_alpha, best_cost = alpha, _vec_dot(_mat_vec(d, alpha), alpha)
    for _ in range(max_iter):
        d_alpha = _mat_vec(d, alpha)
        mean = 0.0
        for e in d_alpha:
            mean += e
        mean /= k
        direction = [mean - e for e in d_alpha]
        step = _step_length_entries(alpha, direction)
        candidate = _project_to_simplex_entries([a + step * e for a, e in zip(alpha, direction)])
        d_cand = _mat_vec(d, candidate)
        aa, ac, cc = _vec_dot(alpha, d_alpha), _vec_dot(alpha, d_cand), _vec_dot(candidate, d_cand)
        gamma = _two_point_entry(aa, ac, cc)[0]
        new = [gamma * a + (1.0 - gamma) * c for a, c in zip(alpha, candidate)]
        change = 0.0
        for a, b in zip(new, alpha):
            change += abs(a - b)
        if change < tol:
            break
        alpha = new
        cost = gamma * gamma * aa + 2 * gamma * (1 - gamma) * ac + (1 - gamma) ** 2 * cc
        if cost < best_cost:
            best_alpha, best_cost = alpha, cost
    return best_alpha


def _step_length_entries(alpha: list[float], direction: list[float]) -> float:
    best = math.inf
    for a, e in zip(alpha, direction):
        if e < 0:
            t = -a / e
        elif e > 0:
            t = (1.0 - a) / e
        else:
            continue
        if t > 1e-7 and t < best:  # inf and NaN are never below a finite best
            best = t
    return best if best < math.inf else 1.0


def _project_to_simplex_entries(v: list[float]) -> list[float]:
    """:func:`project_to_simplex` on a list (the same sums in the same order)."""
    desc = sorted(v, reverse=True)
    total = 0.0
    theta = math.nan
    for rank, value in enumerate(desc, start=1):
        total += value
        if value - (total - 1.0) / rank > 0:
            theta = (total - 1.0) / rank
    if theta != theta:
        raise SmallKFallback
    return [max(e - theta, 0.0) for e in v]


def _polish_entries(d: list[list[float]], alpha: list[float], max_iter: int) -> list[float]:
    lam = alpha[:]
    k = len(d)
    support = [a > 0 for a in lam]
    last = math.inf
    for _ in range(max_iter):
        idx = [i for i in range(k) if support[i]]
        beta = _affine_minimiser_entries([[d[i][j] for j in idx] for i in idx])
        neg = [n for n, b in enumerate(beta) if b <= 0]
        if neg:
            ratio, first = math.inf, -1
            for n in neg:
                r = lam[idx[n]] / (lam[idx[n]] - beta[n])
                if r < ratio or first < 0:
                    ratio, first = r, n
            for n, i in enumerate(idx):
                lam[i] = lam[i] + ratio * (beta[n] - lam[i])
            lam[idx[first]] = 0.0
            lam = [a if a > 0.0 else 0.0 for a in lam]
            support = [a > 0 for a in lam]
            continue
        lam = [0.0] * k
        for n, i in enumerate(idx):
            lam[i] = beta[n]
        d_lam = _mat_vec(d, lam)
        cost = _vec_dot(lam, d_lam)
        vertex = min(range(k), key=d_lam.__getitem__)
        if cost - d_lam[vertex] <= 1e-12 or support[vertex] or cost >= last:
            break
        last = cost
        support[vertex] = True
    return lam


def _affine_minimiser_entries(d: list[list[float]]) -> list[float]:
    """:func:`_affine_minimiser` by elimination; an ill-conditioned KKT system raises
    :class:`SmallKFallback` (the least-squares solve of the NumPy twin decides those)."""
    k = len(d)
    kkt = [row[:] + [1.0] for row in d] + [[1.0] * k + [0.0]]
    beta = solve_small(kkt, [0.0] * k + [1.0], max_cond=_MAX_COND)[:k]
    total = 0.0
    for b in beta:
        total += b
    if not (total != 0.0 and math.isfinite(total)):
        raise SmallKFallback
    return [b / total for b in beta]
