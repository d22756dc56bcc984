"""Distillation from single-task teachers into the multi-task model.

The methods, their papers and our decisions: docs/methods/distillation.md.

Every module returns the ``(K,)`` per-task distillation terms, to add to the K task losses
(``opt.backward(torch.stack(losses) + kd(features, x))``); its ``parameters()`` are the
adaptors only, for an optimizer group of their own.
"""

from ._adaptor import AdaptorDistillation
from ._scd import SequentialCooperativeDistillation
from ._universal import UniversalRepresentationLoss

__all__ = [
    "AdaptorDistillation",
    "SequentialCooperativeDistillation",
    "UniversalRepresentationLoss",
]
