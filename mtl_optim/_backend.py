"""Small runtime helpers that the optimizers and the Triton kernels share.

This module imports neither Triton nor any method, so every part of the package may use it
(see docs/design.md, "Where helpers live").
"""

from __future__ import annotations

import functools
import importlib.util
import os
from typing import Any

from torch import Tensor

__all__ = ["interpreted", "scalar", "triton_installed"]


@functools.cache
def triton_installed() -> bool:
    """True when the optional ``triton`` package can be imported."""
    return importlib.util.find_spec("triton") is not None


def interpreted() -> bool:
    """True when Triton runs kernels through its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def scalar(x: Any) -> float:
    """A hyperparameter that torch accepts as a float or a 0-d tensor (``lr``, ``betas``), as a
    Python float."""
    return float(x.item()) if isinstance(x, Tensor) else float(x)
