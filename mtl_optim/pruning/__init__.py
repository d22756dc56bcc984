"""Pruning multi-task models: DiSparse (per-task importance, arbitrated shared masks).

See docs/methods/pruning.md.
"""

from ._disparse import DiSparse, erk_densities

__all__ = ["DiSparse", "erk_densities"]
