"""Base classes of the gradient aggregators.

An aggregator maps the per-task gradient matrix ``J ∈ R^{K×d}`` (rows ``g_i``, produced by the
engine) to one direction ``(d,)``. A *weighted aggregator* is one of the form ``Jᵀ w(J)``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import Tensor

from .._linalg import gramian
from .._method import Method


class Aggregator(Method, ABC):
    """Callable on a ``(K, d)`` matrix ``J``; returns the combined ``(d,)`` gradient."""

    #: If set, the optimizer clips the shared parameters' combined gradient to this norm (Nash-MTL's
    #: official step clips the shared parameters only; see docs/methods/aggregators.md, "Nash-MTL").
    max_norm: float | None = None
    #: True for methods that also use the loss values (MGDA's "loss" normalisations); the
    #: optimizer then calls :meth:`set_losses` with the detached ``(K,)`` values before combining.
    needs_losses: bool = False
    #: True when the aggregator can run on the rows of the tasks present in a batch (partial
    #: labels: ``opt.backward`` got ``None`` for some tasks). The optimizer then calls it on the
    #: ``(m, d)`` rows of the present tasks, with :attr:`present` set; a stateful aggregator
    #: uses :attr:`present` to read and update only the present tasks' entries of its state.
    supports_missing: bool = True
    #: While the optimizer calls the aggregator on the rows of the present tasks only: their
    #: ``(m,)`` indices among the K tasks, increasing (a CPU ``int64`` tensor). ``None`` when
    #: every task is present (the rows are all K tasks, in order).
    present: Tensor | None = None
    #: K, the number of tasks, while :attr:`present` is set (to size state that has one entry
    #: per task when the first call already misses a task); ``None`` otherwise.
    all_tasks: int | None = None

    def set_losses(self, losses: Tensor) -> None:  # noqa: B027 - a hook
        """Receive this batch's detached loss values (only if :attr:`needs_losses`)."""

    def __call__(self, jacobian: Tensor) -> Tensor:
        if jacobian.dim() != 2:
            raise ValueError(f"expected a (K, d) matrix, got shape {tuple(jacobian.shape)}")
        return self.forward(jacobian)

    @abstractmethod
    def forward(self, jacobian: Tensor) -> Tensor:
        """The combined gradient, on ``jacobian``'s device and dtype."""

    def transform(self, jacobian: Tensor) -> Tensor:
        """Per-task edited gradients ``(K, d)`` whose row sum is the combined gradient.

        AdaTask feeds row ``i`` into task ``i``'s own moments (see
        docs/methods/adatask.md, "With an aggregator"). The default puts the whole combined
        direction on every task in proportion 1/K.
        """
        return self(jacobian).expand_as(jacobian) / jacobian.shape[0]


class WeightedAggregator(Aggregator):
    """An aggregator ``Jᵀ w`` whose weights ``w ∈ R^K`` are computed from ``J``."""

    @abstractmethod
    def weights(self, jacobian: Tensor) -> Tensor:
        """The ``(K,)`` row weights."""

    def forward(self, jacobian: Tensor) -> Tensor:
        return self.weights(jacobian) @ jacobian

    def transform(self, jacobian: Tensor) -> Tensor:
        return self.weights(jacobian).unsqueeze(1) * jacobian


class GramianWeightedAggregator(WeightedAggregator):
    r"""A weighted aggregator whose weights depend on ``J`` only through the Gramian
    :math:`M = JJ^\top`.

    Subclasses implement :meth:`weights_from_gramian`. The optimizer can then use its Gramian
    route: it forms the ``K×K`` Gramian (float64) without keeping ``J`` for the combination and
    applies the weights with one backward of :math:`\sum_i w_i L_i`.
    """

    @abstractmethod
    def weights_from_gramian(self, gram: Tensor) -> Tensor:
        """The ``(K,)`` row weights (float64, on ``gram``'s device) from a float64 Gramian."""

    def weights(self, jacobian: Tensor) -> Tensor:
        j = jacobian.detach()
        if not j.is_floating_point():
            j = j.to(torch.float64)
        w = self.weights_from_gramian(gramian(j))
        if j.dtype != torch.float64:  # weights ~ 1/‖g‖ may exceed a half-precision range
            big = torch.finfo(j.dtype).max
            w = w.clamp(-big, big)
        return w.to(device=jacobian.device, dtype=j.dtype)
