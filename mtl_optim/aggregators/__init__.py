"""Gradient aggregators: callables on the ``(K, d)`` per-task gradient matrix."""

from ._aligned_mtl import AlignedMTL
from ._base import Aggregator, GramianWeighting, RowWeighting
from ._cagrad import CAGrad
from ._config import ConFIG
from ._dualproj import DualProj
from ._excess_mtl import ExcessMTL
from ._fairgrad import FairGrad
from ._graddrop import GradDrop
from ._gradvac import GradVac
from ._imtlg import IMTLG
from ._mean import Mean
from ._mgda import MGDA
from ._moco import MoCo
from ._nash_mtl import NashMTL
from ._pcgrad import PCGrad
from ._random import Random
from ._sdmgrad import SDMGrad
from ._sum import Sum
from ._upgrad import UPGrad

__all__ = [
    "IMTLG",
    "MGDA",
    "SDMGrad",
    "UPGrad",
    "AlignedMTL",
    "Aggregator",
    "CAGrad",
    "ConFIG",
    "DualProj",
    "ExcessMTL",
    "FairGrad",
    "GradDrop",
    "GradVac",
    "GramianWeighting",
    "Mean",
    "MoCo",
    "NashMTL",
    "PCGrad",
    "Random",
    "RowWeighting",
    "Sum",
]
