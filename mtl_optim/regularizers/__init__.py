"""Regularisers that relate the tasks: saliency relations, cross-task and pairwise consistency.

Each is an ``nn.Module`` whose ``forward`` returns a scalar term (or, with ``per_task=True``
where offered, the ``(K,)`` per-task split). Add it to the objective outside the task
combination, ``(lam * reg(...)).backward(retain_graph=True)`` before ``opt.backward(losses)``
(``MTLOptimizer`` keeps gradients already present at the start of a step's window), or hand the
per-task terms to the optimizer with the losses. Their own parameters go to the optimizer in
the param groups each module offers (``param_group()`` / ``param_groups()``). See
docs/methods/regularizers.md.
"""

from ._cross_task import CrossTaskConsistency, TaskTransferNet, masked_cross_entropy, masked_l1
from ._pairwise import PairwiseTaskConsistency
from ._saliency import SaliencyRelation

__all__ = [
    "CrossTaskConsistency",
    "PairwiseTaskConsistency",
    "SaliencyRelation",
    "TaskTransferNet",
    "masked_cross_entropy",
    "masked_l1",
]
