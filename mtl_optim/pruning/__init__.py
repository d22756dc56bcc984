"""Pruning multi-task models: DiSparse (per-task importance, arbitrated shared masks)."""

from ._disparse import DiSparse, erk_densities

__all__ = ["DiSparse", "erk_densities"]
