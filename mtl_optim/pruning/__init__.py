"""Pruning multi-task models: DiSparse (per-task importance, arbitrated shared masks).

See docs/methods/pruning.md.
"""

from ._disparse import DiSparse
from ._dynamic import erk_densities

__all__ = ["DiSparse", "erk_densities"]
