r"""Pure-torch twins of the fused AdaTask kernels, written straight from the update rules.

Each twin takes what its kernel takes (a torch param group, the ``(K, n)`` per-task gradient
rows of the group, its parameters and its per-task state) and computes the same step with
plain tensor operations on whole ``(K, n)`` blocks: task :math:`i`'s moments follow torch's
rule for the base optimizer on row :math:`i`, and the parameters move by the sum of the K
per-task steps. Coupled (L2) weight decay adds :math:`\lambda\theta / K` to every row, so
the K rows together decay once; decoupled (AdamW) decay multiplies the parameters by
:math:`1 - \eta\lambda` once. Parameters are updated in float32 and rounded once to their
dtype, as the kernels do.

The twins share no code with :class:`mtl_optim.AdaTask`'s torch path: they are an independent
statement of the same rules, so the kernel tests check the kernels against the mathematics,
and AdaTask's own tests check its torch path against torch.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._backend import scalar

__all__ = ["adagrad_update_reference", "adam_update_reference", "rmsprop_update_reference"]


def _work(params: tuple[Tensor, ...]) -> Tensor:
    """The group's parameters as one float32 vector, in the column order of the gradients."""
    return torch.cat([p.detach().reshape(-1).float() for p in params])


def _write(params: tuple[Tensor, ...], work: Tensor) -> None:
    offset = 0
    for p in params:
        p.detach().copy_(work[offset : offset + p.numel()].view(p.shape))
        offset += p.numel()


def _buffer(state: dict, key: str, like: Tensor, fill: float = 0.0) -> Tensor:
    if key not in state:
        state[key] = torch.full_like(like, fill, dtype=torch.float32)
    return state[key]


def _begin(group: dict, grads: Tensor, params: tuple, state: dict) -> tuple[Tensor, Tensor, int]:
    """Advances the step counter; returns the float32 parameters, the (signed) gradient rows
    and the new step."""
    step = state.setdefault("step", torch.zeros((), dtype=torch.float32))
    step.add_(1)
    grads = grads.float()
    return _work(params), (-grads if group["maximize"] else grads), int(step.item())


def _l2(group: dict, grads: Tensor, work: Tensor) -> Tensor:
    """Coupled weight decay, split evenly over the K rows."""
    wd = group["weight_decay"]
    return grads if wd == 0 else grads + (wd / grads.shape[0]) * work


def adam_update_reference(group: dict, grads: Tensor, params: tuple, state: dict) -> None:
    """Twin of :func:`~mtl_optim.kernels.adam_update` (Adam and AdamW)."""
    work, grads, step = _begin(group, grads, params, state)
    beta1, beta2 = (scalar(b) for b in group["betas"])
    lr, wd = scalar(group["lr"]), group["weight_decay"]
    if wd != 0 and group.get("decoupled_weight_decay", False):
        work = work * (1 - lr * wd)
    else:
        grads = _l2(group, grads, work)
    exp_avg = _buffer(state, "exp_avg", grads)
    exp_avg_sq = _buffer(state, "exp_avg_sq", grads)
    exp_avg.mul_(beta1).add_(grads, alpha=1 - beta1)
    exp_avg_sq.mul_(beta2).add_(grads * grads, alpha=1 - beta2)
    second = exp_avg_sq
    if group["amsgrad"]:
        second = _buffer(state, "max_exp_avg_sq", grads)
        second.copy_(torch.maximum(second, exp_avg_sq))
    denom = second.sqrt() / (1 - beta2**step) ** 0.5 + group["eps"]
    steps = -(lr / (1 - beta1**step)) * exp_avg / denom
    _write(params, work + steps.sum(0))


def rmsprop_update_reference(group: dict, grads: Tensor, params: tuple, state: dict) -> None:
    """Twin of :func:`~mtl_optim.kernels.rmsprop_update`."""
    work, grads, _ = _begin(group, grads, params, state)
    alpha, lr = group["alpha"], scalar(group["lr"])
    grads = _l2(group, grads, work)
    square_avg = _buffer(state, "square_avg", grads)
    square_avg.mul_(alpha).add_(grads * grads, alpha=1 - alpha)
    if group["centered"]:
        grad_avg = _buffer(state, "grad_avg", grads)
        grad_avg.mul_(alpha).add_(grads, alpha=1 - alpha)
        avg = (square_avg - grad_avg * grad_avg).sqrt() + group["eps"]
    else:
        avg = square_avg.sqrt() + group["eps"]
    if group["momentum"] > 0:
        buf = _buffer(state, "momentum_buffer", grads)
        buf.mul_(group["momentum"]).add_(grads / avg)
        steps = -lr * buf
    else:
        steps = -lr * grads / avg
    _write(params, work + steps.sum(0))


def adagrad_update_reference(group: dict, grads: Tensor, params: tuple, state: dict) -> None:
    """Twin of :func:`~mtl_optim.kernels.adagrad_update`."""
    work, grads, step = _begin(group, grads, params, state)
    grads = _l2(group, grads, work)
    clr = scalar(group["lr"]) / (1 + (step - 1) * group["lr_decay"])
    acc = _buffer(state, "sum", grads, group["initial_accumulator_value"])
    acc.add_(grads * grads)
    steps = -clr * grads / (acc.sqrt() + group["eps"])
    _write(params, work + steps.sum(0))
