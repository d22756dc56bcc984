"""Gradient aggregators: callables on the ``(K, d)`` per-task gradient matrix.

``RowWeighting`` and ``GramianWeighting`` are the deprecated names of
:class:`WeightedAggregator` and :class:`GramianWeightedAggregator` (the word "weighting" is
kept for the loss weightings of :mod:`mtl_optim.weighting`); they still work, with a
``DeprecationWarning``.
"""

import warnings
from typing import Any

from ._aligned_mtl import AlignedMTL
from ._base import Aggregator, GramianWeightedAggregator, WeightedAggregator
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
    "GramianWeightedAggregator",
    "Mean",
    "MoCo",
    "NashMTL",
    "PCGrad",
    "Random",
    "Sum",
    "WeightedAggregator",
]


_DEPRECATED = {
    "RowWeighting": "WeightedAggregator",
    "GramianWeighting": "GramianWeightedAggregator",
}


def __getattr__(name: str) -> Any:
    if name in _DEPRECATED:
        new = _DEPRECATED[name]
        warnings.warn(
            f"mtl_optim.aggregators.{name} is deprecated and will be removed in a future "
            f"release; use mtl_optim.aggregators.{new} (the same class)",
            DeprecationWarning,
            stacklevel=2,
        )
        return globals()[new]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
