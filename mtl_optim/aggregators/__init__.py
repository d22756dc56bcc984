"""Gradient aggregators: callables on the ``(K, d)`` per-task gradient matrix."""

from ._base import Aggregator, RowWeighting
from ._mean import Mean
from ._sum import Sum

__all__ = ["Aggregator", "Mean", "RowWeighting", "Sum"]
