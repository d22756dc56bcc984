"""The *features* route of ``MTLOptimizer.backward`` (``features=z``, MGDA-UB style): the
aggregator combines the tasks' gradients at the shared representation ``z`` and the parameters
above ``z`` receive the vector-Jacobian product of that combination. Used by
:class:`~mtl_optim._pipeline.Pipeline`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ._distributed import Replicas
from ._host import Host
from ._linalg import gramian
from .aggregators import GramianWeightedAggregator
from .engine import reachable_params

__all__ = ["check_features", "combine_across_ranks", "features_route"]


def check_features(opt: Host, features: Tensor | Sequence[Tensor], replicas: Replicas) -> list:
    """``features=`` as a list of tensors in the graph, or a ValueError (nothing moved)."""
    features = [features] if isinstance(features, Tensor) else list(features)
    if not features or not all(isinstance(z, Tensor) and z.requires_grad for z in features):
        raise ValueError(
            "features must be the shared representation: tensor(s) inside the autograd "
            "graph between the shared trunk and the task heads"
        )
    if replicas.active and (
        not (opt.aggregator is None or isinstance(opt.aggregator, GramianWeightedAggregator))
        or opt._weighting_needs_j
    ):
        raise ValueError(
            "across processes, features= needs an aggregator that depends only on the "
            "Gramian (each rank's representation holds different samples, so only the "
            "summed Gramian is global) and a weighting that does not look at gradients"
        )
    if opt.per_task_state:
        raise ValueError(
            f"{type(opt).__name__} needs per-task gradients of the shared "
            "parameters; features= is not supported"
        )
    return features


def features_route(
    pipe: Any, losses: list[Tensor], mix: Tensor | None, heads_loss: Tensor, zs: list[Tensor]
) -> None:
    opt = pipe._opt
    if pipe._upstream is None:
        pipe._upstream = set().union(*(reachable_params(z) for z in zs))
    params = [p for g in opt.param_groups for p in g["params"] if p.requires_grad]
    above = [p for p in params if id(p) in pipe._upstream]
    heads = pipe.heads(heads_loss, [p for p in params if id(p) not in pipe._upstream])
    grads_z = opt._engine.representation(losses, zs)
    pipe.rows_present = pipe.batch_present
    replicas = opt._replicas_()
    # across ranks grads_z differs per rank: it is checked through the summed Gramian
    if not opt.guard.check(heads if replicas.active else [*heads, grads_z], "gradient"):
        return
    grads_z = pipe.unscale(grads_z)
    if mix is not None:
        grads_z = mix.to(grads_z.dtype) @ grads_z
    if opt._weighting_needs_j:
        grads_z = pipe.observe(grads_z)
    if replicas.active and opt.aggregator is not None:
        combined = combine_across_ranks(pipe, grads_z, replicas)
        if combined is None:
            return
        combined = pipe.rescale(combined)
    else:
        combined = pipe.rescale(opt.combine(grads_z))
    sizes = [z.numel() for z in zs]
    grad_tensors = [c.view_as(z).to(z.dtype) for c, z in zip(combined.split(sizes), zs)]
    torch.autograd.backward(zs, grad_tensors=grad_tensors, inputs=above)
    pipe.mean_grads(above)
    opt.guard.check([p.grad for p in above if p.grad is not None], "gradient")


def combine_across_ranks(pipe: Any, grads_z: Tensor, replicas: Replicas) -> Tensor | None:
    r"""MGDA-UB across processes. The representation of the whole batch is the ranks'
    blocks side by side, and a rank's block of :math:`\nabla_z L` is its local gradient
    divided by the number of ranks R, so the whole batch's Gramian is
    :math:`\sum_r G_r G_r^\top / R^2` (one all-reduce of ``K×K``). Each rank applies the
    weights to its own block; the parameters' gradients are then averaged."""
    opt = pipe._opt
    gram = gramian(grads_z.detach())
    replicas.sum_([gram])  # a NaN on any rank reaches every rank: all skip together
    gram = gram / replicas.size**2
    if not opt.guard.check([gram], "gradient"):
        return None
    w = pipe.gramian_weights(opt.aggregator, gram)
    opt.guard.fold_weights(w)
    return w.to(grads_z.dtype) @ grads_z
