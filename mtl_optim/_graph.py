"""The losses a user hands ``opt.backward`` and what their autograd graph reaches.

:func:`as_losses` validates the K losses; :func:`reachable_params` and :func:`walk` follow
``grad_fn`` edges from each loss to the leaves (the parameters) it reaches, which is how the
engine finds the shared parameters, and report whether the losses' graphs meet at a node that
can route a loss's gradient to only part of what it reaches (see ``TaskGradients.setup``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from torch import Tensor

__all__ = ["JOIN", "as_losses", "reachable_params", "walk"]


def as_losses(
    losses: Sequence[Tensor | None] | Tensor,
    num_tasks: int | None,
    differentiable: bool = True,
    missing: bool = False,
) -> list[Tensor]:
    """Validate user losses: K scalar, floating, differentiable tensors (K fixed once known).

    ``differentiable=False`` accepts loss values without a graph (re-evaluated losses);
    ``missing=True`` accepts ``None`` for a task without a label in the batch (kept as
    ``None`` in the returned list, which is then a ``list[Tensor | None]``).
    """
    if isinstance(losses, Tensor):
        if losses.dim() != 1:
            raise ValueError(
                f"losses given as a tensor must be 1-D with one entry per task, got shape "
                f"{tuple(losses.shape)}"
            )
        items: list[Any] = list(losses.unbind())
    elif isinstance(losses, (str, bytes)) or not isinstance(losses, Iterable):
        raise TypeError(
            f"losses must be a sequence of scalar tensors or a 1-D tensor, got "
            f"{type(losses).__name__}"
        )
    else:
        items = list(losses)
    if not items:
        raise ValueError("losses is empty: pass one scalar loss per task")
    for i, loss in enumerate(items):
        if loss is None and missing:
            continue
        if not isinstance(loss, Tensor):
            hint = " (or None for a task without labels in this batch)" if missing else ""
            raise TypeError(f"loss {i} is a {type(loss).__name__}, expected a scalar tensor{hint}")
        if loss.numel() != 1:
            raise ValueError(
                f"loss {i} is not a scalar: shape {tuple(loss.shape)} (reduce it, e.g. .mean())"
            )
        if not loss.is_floating_point():
            raise TypeError(f"loss {i} has dtype {loss.dtype}; losses must be floating point")
        if differentiable and not loss.requires_grad:
            raise ValueError(
                f"loss {i} does not require grad: was it computed under torch.no_grad() or "
                "detached, or does it depend on no parameter?"
            )
    if num_tasks is not None and len(items) != num_tasks:
        raise ValueError(
            f"got {len(items)} losses but this optimizer was first called with {num_tasks}; "
            "the number of tasks is fixed after the first backward"
        )
    out: list[Any] = [None if loss is None else loss.reshape(()) for loss in items]
    return out


def reachable_params(loss: Tensor) -> set[int]:
    """``id`` of every leaf tensor that ``loss``'s autograd graph reaches."""
    return {pid for pid in walk([loss]) if pid != JOIN}


#: Marker yielded by :func:`walk` when the losses' graphs meet at a node whose backward can
#: route a loss's gradient to only part of what the node reaches (so reaching is not using).
JOIN = -1
JOINING_NODES = (
    "CompiledFunction",
    "Stack",
    "Cat",
    "Unbind",
    "Select",
    "Slice",
    "Index",
    "Split",
    "Chunk",
    "Narrow",
    "Gather",
    "Unfold",
)


def walk(losses: Sequence[Tensor]) -> list[int]:
    """For each loss, ``id`` of every leaf its graph reaches (one entry per loss and leaf),
    and :data:`JOIN` once if two losses' graphs meet at a joining node."""
    out: list[int] = []
    owners: dict[int, int] = {}  # node -> the first loss that reached it
    alive = []  # keeps every node's Python wrapper alive so that ids stay unique
    joined = False
    for index, loss in enumerate(losses):
        seen: set[int] = set()
        stack = [loss.grad_fn]
        while stack:
            node = stack.pop()
            if node is None or id(node) in seen:
                continue
            seen.add(id(node))
            alive.append(node)
            if not joined and owners.setdefault(id(node), index) != index:
                joined = type(node).__name__.startswith(JOINING_NODES)
            variable = getattr(node, "variable", None)  # AccumulateGrad nodes hold their leaf
            if variable is not None:
                out.append(id(variable))
            stack.extend(nxt for nxt, _ in node.next_functions)
    if joined:
        out.append(JOIN)
    return out
