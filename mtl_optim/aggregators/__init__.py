"""Gradient aggregators: callables on the ``(K, d)`` per-task gradient matrix."""

from ._base import Aggregator, GramianWeighting, RowWeighting
from ._cagrad import CAGrad
from ._imtlg import IMTLG
from ._mean import Mean
from ._mgda import MGDA
from ._nash_mtl import NashMTL
from ._pcgrad import PCGrad
from ._random import Random
from ._sum import Sum

__all__ = [
    "IMTLG",
    "MGDA",
    "Aggregator",
    "CAGrad",
    "GramianWeighting",
    "Mean",
    "NashMTL",
    "PCGrad",
    "Random",
    "RowWeighting",
    "Sum",
]
