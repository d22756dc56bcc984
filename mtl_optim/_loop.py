"""How the optimizer meets the user's loop: closure-based bases and the plain-backward check."""

from __future__ import annotations

import inspect
import warnings
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from ._guard import NonFiniteError
from ._host import Host

__all__ = ["check_plain_backward", "needs_closure", "step_with_closure"]


def needs_closure(base: type[Optimizer]) -> bool:
    """Does ``base.step`` require a closure (L-BFGS re-evaluates the objective)?"""
    parameter = inspect.signature(base.step).parameters.get("closure")
    return parameter is not None and parameter.default is inspect.Parameter.empty


def step_with_closure(opt: Host, closure: Any) -> Tensor | None:
    """Bases that re-evaluate the objective inside ``step`` (L-BFGS): the closure must call
    ``opt.zero_grad()`` and ``opt.backward(losses)`` and return the total loss; every
    evaluation then gets the method's gradient, clipped as in a plain step."""

    def evaluate() -> Any:
        opt._new_window()
        with torch.enable_grad():
            loss = closure()
        check_plain_backward(opt)
        if opt.guard.skipping:
            raise NonFiniteError(
                "non-finite loss or gradient inside an L-BFGS closure: a line search "
                "cannot skip an evaluation; fix the batch or lower the learning rate"
            )
        opt._clip()
        return loss

    loss = opt._base.step(evaluate)
    if opt.weighting is not None:
        opt.weighting.after_step()
    opt._new_window()
    return loss


def check_plain_backward(opt: Host) -> None:
    """``loss.backward(); opt.step()`` with a method set skips the method: say so, once."""
    if opt._backward_calls or opt._warned_plain_backward or not has_method(opt):
        # opt.backward since the last zero_grad: a second step() on the same gradients is
        # torch semantics, not misuse
        return
    if any(p.grad is not None for g in opt.param_groups for p in g["params"]):
        opt._warned_plain_backward = True
        warnings.warn(
            f"{type(opt).__name__}.step() found gradients but no opt.backward(losses) call "
            "since the last step: the multi-task method was not applied (shared parameters "
            f"{'were not updated' if opt.per_task_state else 'got the plain summed gradient'}"
            "). Call opt.backward(losses) instead of loss.backward()",
            UserWarning,
            stacklevel=4,
        )


def has_method(opt: Host) -> bool:
    """Is a multi-task method set (so that a plain ``loss.backward()`` would bypass it)?"""
    return opt.aggregator is not None or opt.weighting is not None or opt.per_task_state
