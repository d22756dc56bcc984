"""Loss weightings: map the K losses to the K per-task objectives."""

from ._base import Weighting
from ._constrained_uncertainty import ConstrainedUncertainty
from ._dbmtl import DBMTL
from ._dwa import DWA
from ._equal import Equal
from ._famo import FAMO
from ._gls import GLS
from ._gradnorm import GradNorm
from ._grouped_uncertainty import GroupedUncertainty
from ._igb import IGB
from ._igb_rl import IGBRL
from ._rlw import RLW
from ._scale_invariant import ScaleInvariant
from ._stch import STCH
from ._uncertainty import Uncertainty

__all__ = [
    "DBMTL",
    "DWA",
    "FAMO",
    "GLS",
    "IGB",
    "IGBRL",
    "RLW",
    "STCH",
    "ConstrainedUncertainty",
    "Equal",
    "GradNorm",
    "GroupedUncertainty",
    "ScaleInvariant",
    "Uncertainty",
    "Weighting",
]
