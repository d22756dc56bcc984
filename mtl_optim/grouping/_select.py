r"""TAG's grouping search: which networks to train, given the inter-task affinities.

Fifty et al., *Efficiently Identifying Task Groupings for Multi-Task Learning*, NeurIPS 2021,
arXiv `2109.04617 <https://arxiv.org/abs/2109.04617>`_; official ``TAG_network_selection``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from .._validation import check_int

__all__ = ["Grouping", "select_groups"]

SearchMethod = Literal["auto", "exact", "beam"]

#: The official score of a task in a singleton group: serving a task alone is all but forbidden.
SINGLETON_SCORE = -1e6
#: ``method="auto"`` searches exhaustively up to this many tasks, and by beam search above.
EXACT_AUTO_MAX_TASKS = 10
#: ``method="exact"`` refuses more tasks than this (its cost grows as 4^K).
EXACT_MAX_TASKS = 12
_MAX_TASKS = 62  # groups are int64 bitmasks
_CHUNK = 512  # candidate rows scored at a time by the exact search (bounds memory)


@dataclass(frozen=True)
class Grouping:
    r"""The result of :func:`select_groups`.

    Attributes:
        groups: the chosen groups, each a sorted tuple of task indices, in lexicographic order.
        serving: ``serving[a]`` is the index in ``groups`` of the group whose network serves
            task ``a`` (its best-scoring group).
        objective: :math:`\frac1K \sum_a \max_{S \ni a} \operatorname{score}(a, S)`.
    """

    groups: tuple[tuple[int, ...], ...]
    serving: tuple[int, ...]
    objective: float


def _as_matrix(affinity: Tensor | np.ndarray | Sequence[Sequence[float]]) -> np.ndarray:
    if isinstance(affinity, Tensor):
        affinity = affinity.detach().cpu().to(torch.float64).numpy()
    a = np.array(affinity, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] != a.shape[1] or a.shape[0] == 0:
        raise ValueError(f"affinity must be a non-empty square K×K matrix, got shape {a.shape}")
    if a.shape[0] > _MAX_TASKS:
        raise ValueError(f"at most {_MAX_TASKS} tasks are supported, got {a.shape[0]}")
    if not np.isfinite(a).all():
        raise ValueError("affinity has NaN or infinite entries")
    return a


def _scores(a: np.ndarray, members: np.ndarray) -> np.ndarray:
    r"""``score(a, S)`` for every row ``S`` of ``members`` (``(..., K)`` bool): ``(..., K)``.

    :math:`\operatorname{score}(a,S) = \frac{1}{|S|-1}\sum_{b \in S, b \ne a} A_{ab}` for
    :math:`|S| \ge 2`, ``SINGLETON_SCORE`` for :math:`S = \{a\}` and :math:`-\infty` for
    :math:`a \notin S`.
    """
    off = a - np.diag(np.diag(a))
    sums = members.astype(np.float64) @ off.T
    size = members.sum(-1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        score = np.where(size > 1, sums / (size - 1), SINGLETON_SCORE)
    return np.where(members, score, -np.inf)


def _objective(a: np.ndarray, collections: np.ndarray) -> np.ndarray:
    """The objective of each ``(..., B, K)`` collection; ``-inf`` where a task is uncovered."""
    return _scores(a, collections).max(-2).mean(-1)


def _bits(masks: np.ndarray, k: int) -> np.ndarray:
    """Bitmasks ``(...)`` → membership ``(..., K)`` (task ``i`` is bit ``i``)."""
    return (masks[..., None] >> np.arange(k)) & 1 == 1


def _to_masks(members: np.ndarray) -> np.ndarray:
    return members.astype(np.int64) @ (1 << np.arange(members.shape[-1], dtype=np.int64))


def _finish(a: np.ndarray, masks: list[int]) -> Grouping:
    """The :class:`Grouping` of a collection of group bitmasks (duplicates and empties dropped)."""
    k = a.shape[0]
    groups = sorted({tuple(i for i in range(k) if m >> i & 1) for m in masks if m})
    scores = _scores(a, np.array([[i in g for i in range(k)] for g in groups]))
    return Grouping(
        groups=tuple(groups),
        serving=tuple(int(g) for g in scores.argmax(0)),
        objective=float(scores.max(0).mean()),
    )


def _block_values(a: np.ndarray, disjoint: bool) -> tuple[np.ndarray, np.ndarray]:
    r"""For every task set ``P`` (bitmask), the best value of serving exactly ``P`` by one group.

    Overlapping: :math:`f(P) = \max_{S \supseteq P} \sum_{a \in P} \operatorname{score}(a, S)`
    and the maximising ``S``; disjoint: :math:`f(P) = \sum_{a \in P} \operatorname{score}(a, P)`.
    """
    k = a.shape[0]
    masks = np.arange(1 << k, dtype=np.int64)
    members = _bits(masks, k)
    scores = _scores(a, members)
    if disjoint:
        return np.where(members, scores, 0.0).sum(1), masks
    finite = np.where(members, scores, 0.0)
    value = np.full(1 << k, -np.inf)
    best = masks.copy()
    for start in range(0, 1 << k, _CHUNK):
        p = masks[start : start + _CHUNK]
        sums = members[start : start + _CHUNK].astype(np.float64) @ finite.T
        sums[(masks[None, :] & p[:, None]) != p[:, None]] = -np.inf  # S must contain P
        best[start : start + _CHUNK] = sums.argmax(1)
        value[start : start + _CHUNK] = sums.max(1)
    return value, best


def _exact(a: np.ndarray, n_groups: int, disjoint: bool) -> list[int]:
    r"""Exhaustive search, as a dynamic programme over partitions of the tasks.

    Assigning every task to its serving group partitions the tasks into at most ``B`` blocks
    :math:`P_1, \dots, P_m`, and the best collection serving that partition is the best
    superset of each block, so the optimum is
    :math:`\max_{\{P_k\}} \sum_k f(P_k)` over partitions into at most ``B`` blocks.
    ``best_b(U)`` (the optimum for the task set ``U`` with at most ``b`` blocks) fixes the block
    of ``U``'s lowest task: :math:`O(B \cdot 3^K)` instead of enumerating
    :math:`\binom{2^K - 1}{B}` collections as the official code does.
    """
    k = a.shape[0]
    value, best_superset = _block_values(a, disjoint)
    value = value.tolist()
    full = (1 << k) - 1
    previous = [0.0] + [-np.inf] * full
    choices: list[list[int]] = []
    for _ in range(min(n_groups, k)):
        current, choice = [0.0] * (full + 1), [0] * (full + 1)
        for u in range(1, full + 1):
            low = u & -u
            rest = u ^ low
            sub, top, arg = rest, -np.inf, 0
            while True:
                block = sub | low
                v = value[block] + previous[u ^ block]
                if v > top:
                    top, arg = v, block
                if sub == 0:
                    break
                sub = (sub - 1) & rest
            current[u], choice[u] = top, arg
        previous = current
        choices.append(choice)
    blocks, u = [], full
    for choice in reversed(choices):
        if u == 0:
            break
        blocks.append(choice[u])
        u ^= choice[u]
    return [int(best_superset[b]) for b in blocks]


def _canonical(masks: np.ndarray) -> np.ndarray:
    """Collections as ``(N, B)`` bitmasks in one form: duplicates emptied, rows sorted."""
    m = np.sort(masks, axis=1)
    m[:, 1:][m[:, 1:] == m[:, :-1]] = 0
    return np.sort(m, axis=1)


def _neighbours(state: np.ndarray, disjoint: bool) -> np.ndarray:
    """Collections one move away from ``state`` (``(B, K)`` bool): ``(N, B, K)``."""
    b, k = state.shape
    out = []
    if not disjoint:  # add a task to a group, or drop it from one
        out.append(state[None] ^ np.eye(b * k, dtype=bool).reshape(b * k, b, k))
    # move a task from one of its groups into another
    src, task, dst = np.nonzero(state[:, :, None] & ~state.T[None])
    moved = np.repeat(state[None], len(task), axis=0)
    moved[np.arange(len(task)), src, task] = False
    moved[np.arange(len(task)), dst, task] = True
    out.append(moved)
    i, j = np.triu_indices(k, 1)
    if disjoint:  # swap two tasks between their groups
        owner = state.argmax(0)
        apart = owner[i] != owner[j]
        si, sj, gi, gj = i[apart], j[apart], owner[i[apart]], owner[j[apart]]
        n = np.arange(len(si))
        swapped = np.repeat(state[None], len(si), axis=0)
        swapped[n, gi, si], swapped[n, gj, si] = False, True
        swapped[n, gj, sj], swapped[n, gi, sj] = False, True
        out.append(swapped)
    # a new two-task group: in an unused slot (its tasks leave their groups if disjoint), or,
    # overlapping, in place of a used group
    used = state.any(1)
    rows = [] if disjoint else list(np.flatnonzero(used))
    rows += list(np.flatnonzero(~used)[:1])
    n = np.arange(len(i))
    for row in rows:
        opened = np.repeat(state[None], len(i), axis=0)
        opened[:, row] = False
        if disjoint:
            opened[n, :, i] = False
            opened[n, :, j] = False
        opened[n, row, i] = True
        opened[n, row, j] = True
        out.append(opened)
    return np.concatenate(out)


def _beam(a: np.ndarray, n_groups: int, disjoint: bool, width: int) -> np.ndarray:
    """Local beam search **(ours, not in the paper code)**.

    The beam holds the ``width`` best collections found so far (ties broken by their sorted
    bitmasks, so the search is deterministic), starting from the single group of all tasks
    (and, for overlapping groups, also from the disjoint search's result, so that allowing
    overlaps never scores lower).
    Each round scores every collection one move away from a beam member: add a task to a group
    or drop it from one (overlapping only), move a task between groups, swap two tasks of
    different groups (disjoint only), open a new two-task group while fewer than ``B`` are
    used, or replace a group by a two-task group (overlapping only). The search stops when the
    beam no longer changes; its members only move up a total order, so it terminates.
    """
    k = a.shape[0]
    beam = np.zeros((1, n_groups), dtype=np.int64)
    beam[0, -1] = (1 << k) - 1
    if not disjoint:  # a partition is a collection too: also start from the best one found
        beam = np.unique(np.stack([beam[0], _beam(a, n_groups, True, width)]), axis=0)
    while True:
        states = _bits(beam, k)
        pool = np.concatenate([states, *(_neighbours(s, disjoint) for s in states)])
        keys = np.unique(_canonical(_to_masks(pool)), axis=0)
        values = _objective(a, _bits(keys, k))
        keys, values = keys[values > -np.inf], values[values > -np.inf]
        order = np.lexsort((*keys[:, ::-1].T, -values))[:width]
        ranked = keys[order]
        if np.array_equal(np.unique(ranked, axis=0), np.unique(beam, axis=0)):
            return ranked[0]
        beam = ranked


def select_groups(
    affinity: Tensor | np.ndarray | Sequence[Sequence[float]],
    n_groups: int,
    *,
    disjoint: bool = False,
    method: SearchMethod = "auto",
    beam_width: int = 16,
) -> Grouping:
    r"""Choose at most ``n_groups`` task groups (networks) that maximise the served affinity.

    ``affinity[a, b]`` is the affinity of task ``b``'s step onto task ``a``'s loss
    (:meth:`TaskAffinity.affinity`'s orientation; the diagonal is ignored). A task ``a`` in a
    group ``S`` scores

    .. math::
        \operatorname{score}(a, S) = \frac{1}{|S| - 1} \sum_{b \in S,\, b \neq a} A_{ab}
        \quad (|S| \ge 2), \qquad \operatorname{score}(a, \{a\}) = -10^6,

    and the search maximises
    :math:`\frac1K \sum_a \max_{S \in \mathcal C,\, a \in S} \operatorname{score}(a, S)`
    over collections :math:`\mathcal C` of at most ``n_groups`` groups covering every task.
    As in the paper, groups may overlap (a task can be trained in several networks and is
    served by its best one); ``disjoint=True`` asks for a partition instead.

    ``method="exact"`` is an exhaustive search (a dynamic programme over partitions, cost
    :math:`O(B \cdot 3^K + 4^K)`, at most ``EXACT_MAX_TASKS`` tasks); ``"beam"`` a local beam
    search of ``beam_width`` collections **(ours, not in the paper code)**; ``"auto"`` is exact
    up to ``EXACT_AUTO_MAX_TASKS`` tasks and beam search above.
    """
    a = _as_matrix(affinity)
    k = a.shape[0]
    check_int("n_groups", n_groups, 1)
    if method not in ("auto", "exact", "beam"):
        raise ValueError(f"method must be 'auto', 'exact' or 'beam', got {method!r}")
    check_int("beam_width", beam_width, 1)
    if method == "exact" and k > EXACT_MAX_TASKS:
        raise ValueError(
            f"method='exact' supports at most {EXACT_MAX_TASKS} tasks (got {k}); use 'beam'"
        )
    if method == "exact" or (method == "auto" and k <= EXACT_AUTO_MAX_TASKS):
        masks = _exact(a, n_groups, disjoint)
    else:
        masks = _beam(a, min(n_groups, k), disjoint, beam_width).tolist()
    return _finish(a, masks)
