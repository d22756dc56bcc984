r"""Projection onto the dual cone of the rows of ``J``, from the Gramian only (UPGrad, DualProj).

Quinton & Rey, *Jacobian Descent for Multi-Objective Optimization*, arXiv
`2406.16232 <https://arxiv.org/abs/2406.16232>`_, Proposition 1: for :math:`G = JJ^\top` and
weights :math:`u`, the projection of :math:`J^\top u` onto the dual cone
:math:`\{y : Jy \ge 0\}` is :math:`J^\top v` with

.. math::
    v \in \arg\min_{v \ge u}\ \tfrac12\, v^\top G v .

Its KKT conditions, with :math:`\mu = Gv = J(J^\top v)` the multipliers, are

.. math::
    v \ge u, \qquad \mu = G v \ge 0, \qquad \mu_j\,(v_j - u_j) = 0 ,

so :math:`J(J^\top v) \ge 0`: the projection conflicts with no row. Writing :math:`v = u + x`
gives the non-negative QP :math:`\min_{x\ge0} \tfrac12 x^\top G x + (Gu)^\top x`, which
:func:`dual_cone_weights` solves exactly (up to rounding) for a batch of :math:`u`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from ._base import GramianWeightedAggregator
from ._partial import present_tasks
from ._small_k import (
    SmallKFallback,
    dual_cone_entries,
    regularized_entries,
    small_cpu_entries,
)

_EPS = torch.finfo(torch.float64).eps


def regularized_gramian(gram: Tensor, norm_eps: float, reg_eps: float) -> Tensor:
    r"""TorchJD's conditioning of the Gramian: :math:`G / \operatorname{tr} G + \epsilon_r I`.

    The trace is :math:`\lVert J\rVert_F^2`, so dividing by it normalises ``J`` in Frobenius
    norm (the projection weights do not change). A trace below ``norm_eps`` gives the zero
    matrix instead (then :math:`v = \max(u, 0)` for ``reg_eps > 0``: the rows are treated as
    zero and no projection happens). ``reg_eps`` on the diagonal makes the matrix positive
    definite, so the weights are unique. No host sync.
    """
    gram = gram.to(torch.float64)
    trace = gram.diagonal().sum()
    safe = torch.where(trace > 0, trace, torch.ones_like(trace))
    normalized = torch.where(trace < norm_eps, torch.zeros_like(gram), gram / safe)  # NaN stays
    eye = torch.eye(gram.shape[0], dtype=torch.float64, device=gram.device)
    return normalized + reg_eps * eye


def dual_cone_weights(u: Tensor, gram: Tensor, max_iter: int | None = None) -> Tensor:
    r"""The weights :math:`v` of the projections of :math:`J^\top u_b` onto the dual cone.

    ``u`` is ``(K,)`` or a batch ``(B, K)`` of right-hand sides, ``gram`` the ``(K, K)`` PSD
    Gramian :math:`G = JJ^\top`; the result has ``u``'s shape, float64 on ``gram``'s device, and
    meets the KKT conditions of the module docstring (NaN if ``gram`` is not finite).

    **Method.** Lawson–Hanson's active-set algorithm for the non-negative QP in
    :math:`x = v - u` (in the normal-equation form of Bro & de Jong's FNNLS, which needs only
    :math:`G` and :math:`Gu`), run on the whole batch at once. Each iteration solves one
    masked system :math:`G_{PP}\,z_P = -(Gu)_P` on the passive set :math:`P` (the
    :math:`j` with :math:`v_j > u_j`) and then, per right-hand side, either

    * accepts :math:`x = z` when :math:`z_P > 0` and adds to :math:`P` the index of the largest
      positive :math:`-(Gv)_j`, or stops when no :math:`-(Gv)_j` exceeds its rounding bound
      :math:`4K\varepsilon\,(|G|\,|v|)_j` (:math:`\varepsilon` the float64 machine epsilon);
    * or steps from :math:`x` towards :math:`z` until the first passive coordinate reaches 0
      and drops it.

    The objective decreases strictly, so no passive set repeats and the exact solution is
    reached after finitely many iterations (on random problems up to K = 30, never more
    than :math:`2K`).
    A variable that rounding lets enter but not grow (zero step) ends the search: the
    current point is then optimal to rounding. At most ``max_iter`` iterations run (default
    :math:`4K + 10`), so the call always terminates; every iterate is feasible
    (:math:`v \ge u` exactly), so even a truncated result is a valid, if not optimal, point.
    The masked systems are positive definite where :math:`G` is (UPGrad and DualProj add
    ``reg_eps``); for a singular :math:`G` the rounding bound keeps dependent rows out of
    :math:`P`.

    **Host syncs.** None on accelerators: the loop count does not depend on tensor values,
    finished right-hand sides are carried along unchanged (``torch.where``) and the systems
    are solved with ``torch.linalg.solve_ex`` (no error check). On the CPU, where reading a
    value costs no device sync, the loop stops as soon as every right-hand side is done, and
    the same iterations run in NumPy (:func:`_dual_cone_weights_numpy`): on ``K×K`` arrays a
    NumPy operation costs a fraction of a torch one, which made the solver 2-3x faster
    (``benchmarks/vs_torchjd.py``); the torch loop below is its reference.
    """
    on_cpu = gram.device.type == "cpu" and u.device.type == "cpu"
    if on_cpu and not gram.requires_grad and not u.requires_grad:
        try:
            return _dual_cone_weights_numpy(u, gram, max_iter)
        except np.linalg.LinAlgError:  # an exactly singular system: solve_ex does not raise
            pass
    return _dual_cone_weights_torch(u, gram, max_iter)


def _dual_cone_weights_torch(u: Tensor, gram: Tensor, max_iter: int | None = None) -> Tensor:
    """:func:`dual_cone_weights` in torch, on any device (the reference of the NumPy twin)."""
    gram = gram.to(torch.float64)
    k = gram.shape[0]
    batch = u.to(device=gram.device, dtype=torch.float64).reshape(-1, k)
    iterations = 4 * k + 10 if max_iter is None else max_iter
    early_exit = gram.device.type == "cpu"

    q = batch @ gram  # rows (G u_b)ᵀ, G symmetric
    abs_gram = gram.abs()
    eye = torch.eye(k, dtype=torch.float64, device=gram.device)
    index = torch.arange(k, device=gram.device)
    x = torch.zeros_like(batch)
    passive = torch.zeros_like(batch, dtype=torch.bool)
    done = torch.zeros(batch.shape[0], dtype=torch.bool, device=gram.device)
    for _ in range(iterations):
        if early_exit and bool(done.all()):
            break
        both = passive.unsqueeze(2) & passive.unsqueeze(1)
        system = torch.where(both, gram, eye)  # identity on the free rows/columns keeps it regular
        rhs = torch.where(passive, -q, 0.0).unsqueeze(2)
        z = torch.where(passive, torch.linalg.solve_ex(system, rhs)[0].squeeze(2), 0.0)
        feasible = (z > 0).logical_or(~passive).all(dim=1)

        # accepted: x = z; the most violated multiplier enters P, or we are optimal
        v = batch + z
        slack = -(v @ gram) - 4 * k * _EPS * (v.abs() @ abs_gram)
        best, enter = torch.where(passive, -torch.inf, slack).max(dim=1)
        grows = feasible & (best > 0) & ~done
        optimal = feasible & ~(best > 0)

        # rejected: step towards z until the first passive coordinate hits 0, and drop it
        shrinking = passive & (z <= 0)
        gap = x - z
        ratio = torch.where(shrinking, x / torch.where(gap > 0, gap, 1.0), torch.inf)
        alpha, leave = ratio.min(dim=1)
        step = ~feasible & ~done
        stuck = step & ~(alpha > 0)  # rounding: the entering index cannot grow
        moved = x + alpha.clamp(0.0, 1.0).unsqueeze(1) * (z - x)
        left = index == leave.unsqueeze(1)
        drop = left | (moved <= 4 * k * _EPS * moved.abs().amax(dim=1, keepdim=True))

        accept = (feasible & ~done).unsqueeze(1)
        shrink = (step & ~stuck).unsqueeze(1)
        x = torch.where(accept, z, torch.where(shrink, torch.where(drop, 0.0, moved), x))
        passive = torch.where(
            grows.unsqueeze(1),
            passive | (index == enter.unsqueeze(1)),
            torch.where(
                shrink, passive & ~drop, torch.where(stuck.unsqueeze(1), passive & ~left, passive)
            ),
        )
        done = done | optimal | stuck
    result = torch.where(torch.isfinite(gram).all(), batch + x, torch.nan)
    return result.reshape(u.shape)


def _dual_cone_weights_numpy(u: Tensor, gram: Tensor, max_iter: int | None = None) -> Tensor:
    """:func:`dual_cone_weights` for CPU tensors: the same iterations as the torch loop, in
    NumPy (raises ``LinAlgError`` on an exactly singular system, where the caller falls back
    to torch)."""
    g = gram.detach().to(torch.float64).numpy()
    k = g.shape[0]
    batch = u.detach().to(torch.float64).reshape(-1, k).numpy()
    if not np.isfinite(g).all():
        return torch.full(u.shape, torch.nan, dtype=torch.float64)
    iterations = 4 * k + 10 if max_iter is None else max_iter
    bound = 4 * k * _EPS

    def times_g(rows: np.ndarray, matrix: np.ndarray) -> np.ndarray:
        # row by row (not BLAS, whose kernel and so rounding depends on the number of rows):
        # a right-hand side gets the same weights alone as in a batch
        return (rows[:, None, :] * matrix.T).sum(axis=2)  # rows @ matrix

    q = times_g(batch, g)
    abs_g = np.abs(g)
    eye = np.eye(k)
    index = np.arange(k)
    rows = np.arange(batch.shape[0])
    x = np.zeros_like(batch)
    passive = np.zeros(batch.shape, dtype=bool)
    done = np.zeros(batch.shape[0], dtype=bool)
    for _ in range(iterations):
        if done.all():
            break
        system = np.where(passive[:, :, None] & passive[:, None, :], g, eye)
        rhs = np.where(passive, -q, 0.0)[:, :, None]
        z = np.where(passive, np.linalg.solve(system, rhs)[:, :, 0], 0.0)
        feasible = ((z > 0) | ~passive).all(axis=1)

        v = batch + z
        slack = np.where(passive, -np.inf, -times_g(v, g) - bound * times_g(np.abs(v), abs_g))
        enter = slack.argmax(axis=1)
        best = slack[rows, enter]
        grows = feasible & (best > 0) & ~done
        optimal = feasible & ~(best > 0)

        gap = x - z
        ratio = np.where(passive & (z <= 0), x / np.where(gap > 0, gap, 1.0), np.inf)
        leave = ratio.argmin(axis=1)
        alpha = ratio[rows, leave]
        step = ~feasible & ~done
        stuck = step & ~(alpha > 0)
        moved = x + np.clip(alpha, 0.0, 1.0)[:, None] * (z - x)
        left = index == leave[:, None]
        drop = left | (moved <= bound * np.abs(moved).max(axis=1, keepdims=True))

        accept = (feasible & ~done)[:, None]
        shrink = (step & ~stuck)[:, None]
        x = np.where(accept, z, np.where(shrink, np.where(drop, 0.0, moved), x))
        passive = np.where(
            grows[:, None],
            passive | (index == enter[:, None]),
            np.where(shrink, passive & ~drop, np.where(stuck[:, None], passive & ~left, passive)),
        )
        done = done | optimal | stuck
    return torch.from_numpy(batch + x).reshape(u.shape)


class Preference:
    """A preference vector :math:`p`: ``None`` (:math:`1/K` each) or K finite numbers ≥ 0.

    Calling it with a Gramian gives the ``(K,)`` float64 weights on the Gramian's device. A
    given vector is copied to each device once and kept, so later calls move nothing from the
    host (a blocking host-to-device copy would synchronise the device).
    """

    def __init__(self, pref_vector: Tensor | Sequence[float] | None) -> None:
        self.vector = None if pref_vector is None else _check_pref_vector(pref_vector)
        self._copies: dict[torch.device, Tensor] = {}

    def __call__(
        self, gram: Tensor, index: Tensor | None = None, num_tasks: int | None = None
    ) -> Tensor:
        """The weights for the rows of ``gram``; with ``index`` (the rows' tasks among
        ``num_tasks``, partial labels) a given vector is read at those tasks (not renormalised),
        and the default is :math:`1/m` over the m rows."""
        k = gram.shape[0]
        if self.vector is None:
            return torch.full((k,), 1.0 / k, dtype=torch.float64, device=gram.device)
        total = k if index is None else num_tasks
        if self.vector.numel() != total:
            raise ValueError(
                f"pref_vector has {self.vector.numel()} entries but there are {total} tasks"
            )
        if index is not None:
            return self.vector[index].to(gram.device)
        if gram.device not in self._copies:
            self._copies[gram.device] = self.vector.to(gram.device)
        return self._copies[gram.device]

    def values(self, k: int, index: Tensor | None = None, num_tasks: int | None = None) -> list:
        """The same weights as a call, for ``k`` rows, as a list of Python floats."""
        if self.vector is None:
            return [1.0 / k] * k
        total = k if index is None else num_tasks
        if self.vector.numel() != total:
            raise ValueError(
                f"pref_vector has {self.vector.numel()} entries but there are {total} tasks"
            )
        return (self.vector if index is None else self.vector[index]).tolist()

    def __repr__(self) -> str:
        return repr(None if self.vector is None else self.vector.tolist())


def _check_pref_vector(pref_vector: Tensor | Sequence[float]) -> Tensor:
    if isinstance(pref_vector, (str, bytes)):
        raise TypeError(
            f"pref_vector must be a 1-D tensor or a sequence of numbers, got {pref_vector!r}"
        )
    try:
        pref = torch.as_tensor(pref_vector, dtype=torch.float64).detach().cpu().clone()
    except (TypeError, ValueError, RuntimeError) as err:
        raise TypeError(
            f"pref_vector must be a 1-D tensor or a sequence of numbers, got {pref_vector!r}"
        ) from err
    if pref.dim() != 1 or pref.numel() == 0:
        raise ValueError(
            f"pref_vector must be a non-empty 1-D vector, got shape {tuple(pref.shape)}"
        )
    if not (torch.isfinite(pref).all() and (pref >= 0).all()):
        raise ValueError(f"pref_vector must be finite and non-negative, got {pref.tolist()}")
    return pref


def non_negative(name: str, value: float) -> float:
    """Validate a finite non-negative hyperparameter (NaN is rejected too)."""
    if not 0 <= value < float("inf"):
        raise ValueError(f"{name} must be a finite non-negative number, got {value!r}")
    return float(value)


class DualConeAggregator(GramianWeightedAggregator):
    """What UPGrad and DualProj share: a preference vector and the regularised Gramian.

    Subclasses turn :meth:`cone_gramian` and :meth:`preferences` into weights.

    **Partial labels.** With only m of the K tasks present the rows are theirs, the default
    preference is :math:`1/m` each and a given K-entry ``pref_vector`` is read at the present
    tasks (not renormalised); there is no state.
    """

    def __init__(
        self,
        pref_vector: Tensor | Sequence[float] | None = None,
        *,
        norm_eps: float = 1e-4,
        reg_eps: float = 1e-4,
    ) -> None:
        self.preference = Preference(pref_vector)
        self.norm_eps = non_negative("norm_eps", norm_eps)
        self.reg_eps = non_negative("reg_eps", reg_eps)

    def preferences(self, gram: Tensor) -> Tensor:
        """The ``(m,)`` float64 preference weights of the rows of ``gram`` (see the class)."""
        return self.preference(gram, *present_tasks(self, gram.shape[0]))

    def cone_gramian(self, gram: Tensor) -> Tensor:
        return regularized_gramian(gram, self.norm_eps, self.reg_eps)

    def small_k_rows(self, gram: Tensor, diagonal: bool) -> list[list[float]] | None:
        """The dual-cone weights in Python floats for a small CPU Gramian (``None``: use the
        tensor path): one row per task for ``u = diag(p)`` (``diagonal``), else the row for
        ``u = p``. See :func:`small_cpu_entries`."""
        entries = small_cpu_entries(gram)
        if entries is None:
            return None
        k = len(entries)
        p = self.preference.values(k, *present_tasks(self, k))
        rhs = [[p[i] if j == i else 0.0 for j in range(k)] for i in range(k)] if diagonal else [p]
        try:
            return dual_cone_entries(rhs, regularized_entries(entries, self.norm_eps, self.reg_eps))
        except SmallKFallback:
            return None

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(pref_vector={self.preference!r}, norm_eps={self.norm_eps}, "
            f"reg_eps={self.reg_eps})"
        )
