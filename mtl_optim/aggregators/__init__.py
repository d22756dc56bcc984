"""Gradient aggregators: callables on the ``(K, d)`` per-task gradient matrix."""

from ._base import Aggregator, RowWeighting
from ._mean import Mean
from ._mgda import MGDA
from ._nash_mtl import NashMTL
from ._pcgrad import PCGrad
from ._sum import Sum

__all__ = ["MGDA", "Aggregator", "Mean", "NashMTL", "PCGrad", "RowWeighting", "Sum"]
