"""Loss weightings: map the K losses to the K per-task objectives."""

from ._base import Weighting
from ._dwa import DWA
from ._equal import Equal
from ._gls import GLS
from ._igb import IGB
from ._rlw import RLW
from ._scale_invariant import ScaleInvariant
from ._uncertainty import ConstrainedUncertainty, GroupedUncertainty, Uncertainty

__all__ = [
    "DWA",
    "GLS",
    "IGB",
    "RLW",
    "ConstrainedUncertainty",
    "Equal",
    "GroupedUncertainty",
    "ScaleInvariant",
    "Uncertainty",
    "Weighting",
]
