"""mtl_optim: drop-in PyTorch optimizers for multi-task learning.

``MTLOptimizer`` wraps any torch optimizer and drives it with a gradient aggregator and/or a loss
weighting; ``AdaTask`` keeps task-wise adaptive state. See docs/getting-started.md.
"""

from . import aggregators, diagnostics, distill, grouping, pruning, regularizers, weighting
from ._gradient_info import GradientInfo
from .adatask import AdaTask
from .optimizer import MTLOptimizer, NonFiniteError

__all__ = [
    "AdaTask",
    "GradientInfo",
    "MTLOptimizer",
    "NonFiniteError",
    "aggregators",
    "diagnostics",
    "distill",
    "grouping",
    "pruning",
    "regularizers",
    "weighting",
]
__version__ = "0.1.0.dev0"
