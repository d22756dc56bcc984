"""Pure-torch twins of the fused AdaTask kernels: the same numbers from AdaTask's torch rules.

Each twin runs :mod:`mtl_optim.adatask`'s vectorised rule (the reference) on the group and
adds the summed per-task step to the parameters. Parameters are updated in float32 and
rounded once to their dtype, as the kernels do; for float32 parameters this is exactly
AdaTask's torch path.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from mtl_optim.adatask import _adagrad, _adam, _rmsprop

__all__ = ["adagrad_update_reference", "adam_update_reference", "rmsprop_update_reference"]


def _apply(rule: Callable, group: dict, grads: Tensor, params: tuple, state: dict) -> None:
    state.setdefault("step", torch.zeros((), dtype=torch.float32))  # as AdaTask creates it
    work = tuple(p.detach().float() for p in params)  # the params themselves when float32
    steps, alpha = rule(group, grads, work, state, grads.shape[0])
    chunks = steps.sum(0).split([p.numel() for p in params])
    torch._foreach_add_(list(work), [c.view_as(w) for c, w in zip(chunks, work)], alpha=alpha)
    for p, w in zip(params, work):
        if w.data_ptr() != p.data_ptr():
            p.detach().copy_(w)


def adam_update_reference(group: dict, grads: Tensor, params: tuple, state: dict) -> None:
    """Twin of :func:`~mtl_optim.kernels.adam_update` (Adam and AdamW)."""
    _apply(_adam, group, grads, params, state)


def rmsprop_update_reference(group: dict, grads: Tensor, params: tuple, state: dict) -> None:
    """Twin of :func:`~mtl_optim.kernels.rmsprop_update`."""
    _apply(_rmsprop, group, grads, params, state)


def adagrad_update_reference(group: dict, grads: Tensor, params: tuple, state: dict) -> None:
    """Twin of :func:`~mtl_optim.kernels.adagrad_update`."""
    _apply(_adagrad, group, grads, params, state)
