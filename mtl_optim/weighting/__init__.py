"""Loss weightings: map the K losses to the K per-task objectives."""

from ._base import Weighting
from ._equal import Equal

__all__ = ["Equal", "Weighting"]
