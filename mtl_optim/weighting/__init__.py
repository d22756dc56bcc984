"""Loss weightings: map the K losses to the K per-task objectives."""

from ._base import Weighting
from ._dwa import DWA
from ._equal import Equal
from ._igb import IGB
from ._rlw import RLW
from ._scale_invariant import ScaleInvariant

__all__ = ["DWA", "IGB", "RLW", "Equal", "ScaleInvariant", "Weighting"]
