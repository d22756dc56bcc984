"""Gradient aggregators: callables on the ``(K, d)`` per-task gradient matrix."""

from ._base import Aggregator, GramianWeighting, RowWeighting
from ._cagrad import CAGrad
from ._config import ConFIG
from ._excess_mtl import ExcessMTL
from ._fairgrad import FairGrad
from ._imtlg import IMTLG
from ._mean import Mean
from ._mgda import MGDA
from ._moco import MoCo
from ._nash_mtl import NashMTL
from ._pcgrad import PCGrad
from ._random import Random
from ._sdmgrad import SDMGrad
from ._sum import Sum

__all__ = [
    "IMTLG",
    "MGDA",
    "SDMGrad",
    "Aggregator",
    "CAGrad",
    "ConFIG",
    "ExcessMTL",
    "FairGrad",
    "GramianWeighting",
    "Mean",
    "MoCo",
    "NashMTL",
    "PCGrad",
    "Random",
    "RowWeighting",
    "Sum",
]
