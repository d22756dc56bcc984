"""Diagnostics of task imbalance during multi-task training.

* :class:`TaskDominance` — which task drives each shared parameter's update (AdaTask's AU
  metric), per coordinate and per layer.
* :class:`ImbalanceReport` — per-step loss ratios, task weights, per-task gradient norms and
  conflicts, and task dominance, recorded from the optimizer's gradient hook and rendered as
  one page (PNG or HTML).
"""

from ._dominance import TaskDominance
from ._report import ImbalanceReport

__all__ = ["ImbalanceReport", "TaskDominance"]
