"""Base classes of the gradient aggregators.

An aggregator maps the per-task gradient matrix ``J ∈ R^{K×d}`` (rows ``g_i``, produced by the
engine) to one direction ``(d,)``. A *row weighting* is an aggregator of the form ``Jᵀ w(J)``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from torch import Tensor

from .._method import Method


class Aggregator(Method, ABC):
    """Callable on a ``(K, d)`` matrix ``J``; returns the combined ``(d,)`` gradient."""

    #: If set, the optimizer clips the shared parameters' combined gradient to this norm
    #: (Nash-MTL's official step clips the shared parameters only; spec §2).
    max_norm: float | None = None

    def __call__(self, jacobian: Tensor) -> Tensor:
        if jacobian.dim() != 2:
            raise ValueError(f"expected a (K, d) matrix, got shape {tuple(jacobian.shape)}")
        return self.forward(jacobian)

    @abstractmethod
    def forward(self, jacobian: Tensor) -> Tensor:
        """The combined gradient, on ``jacobian``'s device and dtype."""

    def transform(self, jacobian: Tensor) -> Tensor:
        """Per-task edited gradients ``(K, d)`` whose row sum is the combined gradient.

        AdaTask feeds row ``i`` into task ``i``'s own moments (spec §1, decision 5). The default
        puts the whole combined direction on every task in proportion 1/K.
        """
        return self(jacobian).expand_as(jacobian) / jacobian.shape[0]


class RowWeighting(Aggregator):
    """An aggregator ``Jᵀ w`` whose weights ``w ∈ R^K`` are computed from ``J``."""

    @abstractmethod
    def weights(self, jacobian: Tensor) -> Tensor:
        """The ``(K,)`` row weights."""

    def forward(self, jacobian: Tensor) -> Tensor:
        return self.weights(jacobian) @ jacobian

    def transform(self, jacobian: Tensor) -> Tensor:
        return self.weights(jacobian).unsqueeze(1) * jacobian
