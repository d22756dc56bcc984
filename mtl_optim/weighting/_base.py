"""Base class of the loss weightings.

A weighting maps the K task losses to the K per-task objectives that the engine
differentiates, e.g. ``w_i * L_i``. It sees losses only, never gradients.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from torch import Tensor

from .._method import Method


class Weighting(Method, ABC):
    """``W(losses) -> objectives``, both ``(K,)`` tensors; ``W.weights`` the last weights."""

    weights: Tensor | None = None

    def __call__(self, losses: Tensor) -> Tensor:
        if losses.dim() != 1:
            raise ValueError(f"expected a (K,) tensor of losses, got shape {tuple(losses.shape)}")
        return self.forward(losses)

    @abstractmethod
    def forward(self, losses: Tensor) -> Tensor:
        """The per-task objectives; must keep the autograd graph of ``losses``."""

    def end_epoch(self) -> None:  # noqa: B027 - a hook, a no-op unless epoch-based
        """Called by ``MTLOptimizer.end_epoch()``; epoch-based weightings override it."""
