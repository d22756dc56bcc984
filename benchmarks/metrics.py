r"""Per-task losses and metrics, and Δm, the relative change against single-task learning.

.. math::
    \Delta m = \frac{100}{K} \sum_{k=1}^{K} (-1)^{\delta_k}\,
        \frac{M_{m,k} - M_{b,k}}{M_{b,k}}

over the K metrics, with :math:`\delta_k = 1` when higher is better for metric :math:`k` and
:math:`b` the single-task (STL) baseline (see docs/benchmarks.md, "Δm"; Maninis et al., CVPR 2019,
as used by
Nash-MTL, FAMO and AdaTask). Lower is better; 0 means "as good as STL on average".
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch.nn import functional as F

from .data import Task

__all__ = ["accuracy", "auc", "delta_m", "task_loss", "task_metric"]


def task_loss(task: Task, output: Tensor, target: Tensor) -> Tensor:
    """BCE with logits (binary), cross-entropy (multiclass) or MSE (regression)."""
    if task.kind == "binary":
        return F.binary_cross_entropy_with_logits(output, target.to(output.dtype))
    if task.kind == "multiclass":
        return F.cross_entropy(output, target)
    return F.mse_loss(output, target)


def accuracy(logits: Tensor, labels: Tensor) -> float:
    """Top-1 accuracy in percent."""
    return (logits.argmax(1) == labels).double().mean().item() * 100.0


def auc(scores: Tensor, labels: Tensor) -> float:
    r"""Area under the ROC curve by the Mann–Whitney statistic with tied scores ranked by
    their average rank: :math:`(\sum_{y=1} r - n_1(n_1+1)/2) / (n_1 n_0)`."""
    scores, labels = scores.detach().double().flatten(), labels.flatten().bool()
    n1 = int(labels.sum())
    n0 = labels.numel() - n1
    if n1 == 0 or n0 == 0:
        raise ValueError("AUC needs both positive and negative labels")
    _, inverse, counts = torch.unique(scores, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()
    average_rank = ends - (counts.double() - 1) / 2  # ranks start at 1
    rank_sum = average_rank[inverse][labels].sum().item()
    return (rank_sum - n1 * (n1 + 1) / 2) / (n1 * n0)


def task_metric(task: Task, output: Tensor, target: Tensor) -> float:
    """The task's metric (:attr:`Task.metric`): AUC, accuracy %, or MAE in original units."""
    if task.kind == "binary":
        return auc(output, target)
    if task.kind == "multiclass":
        return accuracy(output, target)
    return (output.detach().double() - target.double()).abs().mean().item() * task.scale


def delta_m(
    values: Sequence[float], baseline: Sequence[float], higher_better: Sequence[bool]
) -> float:
    """Δm in percent of ``values`` against ``baseline`` (one entry per metric; lower is better)."""
    if not len(values) == len(baseline) == len(higher_better) > 0:
        raise ValueError(
            f"need as many values ({len(values)}), baseline values ({len(baseline)}) and "
            f"directions ({len(higher_better)}), at least one"
        )
    terms = []
    for m, b, hb in zip(values, baseline, higher_better):
        if b == 0:
            raise ValueError("a baseline metric of 0 has no relative change")
        terms.append((-1 if hb else 1) * (m - b) / b)
    return 100.0 * sum(terms) / len(terms)
