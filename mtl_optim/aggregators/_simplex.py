"""Euclidean projection onto the probability simplex, shared by the simplex solvers."""

from __future__ import annotations

import numpy as np


def project_to_simplex(v: np.ndarray) -> np.ndarray:
    """Euclidean projection onto the probability simplex by sorting."""
    desc = np.sort(v)[::-1]
    cumsum = np.cumsum(desc) - 1.0
    ranks = np.arange(1, v.size + 1)
    rho = np.nonzero(desc - cumsum / ranks > 0)[0][-1]
    return np.maximum(v - cumsum[rho] / (rho + 1), 0.0)
