"""AdaTask's update rules in plain torch: the reference the fused Triton kernels are tested
against, and the path that runs on CPU (and wherever the kernels do not apply).

A rule updates one param group's per-task state from its ``(K, n)`` gradient rows and returns
the per-task steps ``U`` and a factor ``alpha`` such that the parameters move by
``alpha * U.sum(0)``. :func:`chunked_update` applies a rule to cache-sized column chunks,
which gives the same numbers as one pass. The math of each rule is in
:mod:`mtl_optim.adatask`'s docstring.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.optim import Adagrad, Adam, AdamW, RMSprop

from .._backend import scalar as _scalar

__all__ = [
    "CHUNK_ELEMENTS",
    "RULES",
    "Rule",
    "adagrad",
    "adam",
    "chunked_update",
    "per_task_update",
    "rmsprop",
]

# A rule updates one group's per-task state from its (K, n) gradient rows and returns
# (per-task steps U, alpha) such that the parameters move by alpha * U.sum(0).
Rule = Callable[[dict, Tensor, tuple, dict, int], tuple[Tensor, float]]


def _flat(params: tuple[Tensor, ...]) -> Tensor:
    return torch.cat([p.detach().reshape(-1) for p in params])


def _buffer(state: dict, key: str, like: Tensor, fill: float = 0.0) -> Tensor:
    if isinstance(state, (_Columns, _Row)):
        return state.buffer(key, like, fill)
    if key not in state:
        state[key] = torch.full(like.shape, fill, dtype=like.dtype, device=like.device)
    return state[key]


#: Columns per chunk of the torch path: the ``(K, cols)`` temporaries of a rule stay around
#: 1 MiB, in cache, instead of ``K × n`` fresh allocations per op (which cost more than the
#: arithmetic on CPU: ``benchmarks/results/kernels-cpu.md``).
CHUNK_ELEMENTS = 2**18


class _Columns(dict):
    """A rule's view of columns ``[a, b)`` of a group's per-task state.

    ``step`` is a private copy (each chunk advances its own; the optimizer advances the real
    one once); buffers are created full width in the group state and returned as views.
    """

    def __init__(self, state: dict, a: int, b: int) -> None:
        super().__init__(step=state["step"].clone())
        self.parent, self.a, self.b = state, a, b

    def buffer(self, key: str, like: Tensor, fill: float) -> Tensor:
        if key not in self.parent:
            n = self.parent["_width"]
            self.parent[key] = torch.full(
                (like.shape[0], n), fill, dtype=like.dtype, device=like.device
            )
        return self.parent[key][:, self.a : self.b]


class _Row(dict):
    """A rule's view of one task's row of a group's per-task state (partial labels).

    ``step`` is the task's own counter, a 0-d view into the ``(K,)`` step tensor (the rule
    advances it in place); buffers are created ``(K, width)`` in the group state and returned
    as ``(1, width)`` views of row ``i``.
    """

    def __init__(self, state: dict, i: int, width: int) -> None:
        super().__init__(step=state["step"][i])
        self.parent, self.i, self.width = state, i, width

    def buffer(self, key: str, like: Tensor, fill: float) -> Tensor:
        if key not in self.parent:
            k = self.parent["step"].shape[0]
            self.parent[key] = torch.full(
                (k, self.width), fill, dtype=like.dtype, device=like.device
            )
        return self.parent[key][self.i : self.i + 1]


def per_task_update(
    rule: Rule,
    group: dict,
    grads: Tensor,
    params: tuple[Tensor, ...],
    state: dict,
    present: Tensor | None,
) -> Tensor:
    r"""One step of a param group where tasks may be missing (partial labels); returns the
    ``(K, n)`` per-task steps (zero rows for missing tasks), already applied to ``params``.

    Each present task :math:`i` runs the rule on its own row with its own step counter
    :math:`k_i` (``state["step"]`` becomes a ``(K,)`` tensor), so its moments are the base
    optimizer's run on the batches where task :math:`i` was present; a missing task's moments
    and counter do not move. L2 weight decay is shared among the :math:`m` present tasks
    (:math:`\lambda	heta/m` each); decoupled weight decay is applied once.
    """
    k, width = grads.shape
    if state["step"].dim() == 0:  # from one shared counter to one per task
        state["step"] = state["step"].reshape(1).repeat(k)
    rows = range(k) if present is None else present.nonzero().flatten().tolist()
    sub = group
    wd = group.get("weight_decay", 0)
    if wd != 0 and group.get("decoupled_weight_decay", False):
        torch._foreach_mul_(list(params), 1 - _scalar(group["lr"]) * wd)
        sub = {**group, "weight_decay": 0}
    steps = grads.new_zeros(k, width)
    with torch.no_grad():
        for i in rows:
            step, alpha = rule(sub, grads[i : i + 1], params, _Row(state, i, width), len(rows))
            steps[i] = step[0] * alpha if alpha != 1.0 else step[0]
        update = steps.sum(0)
        offsets = [0]
        for p in params:
            offsets.append(offsets[-1] + p.numel())
        adds = [update[o : o + p.numel()].view_as(p).to(p.dtype) for o, p in zip(offsets, params)]
        torch._foreach_add_(list(params), adds)
    return steps


def _chunks(params: tuple[Tensor, ...], k: int) -> list[tuple[int, int, tuple[Tensor, ...]]]:
    """Column ranges of about ``CHUNK_ELEMENTS / K`` columns, with flat views of the
    parameter elements they cover (parameters must be contiguous)."""
    size = max(1, CHUNK_ELEMENTS // max(k, 1))
    flat = [p.detach().view(-1) for p in params]
    total = sum(f.numel() for f in flat)
    out = []
    for a in range(0, total, size):
        b = min(a + size, total)
        views, offset = [], 0
        for f in flat:
            lo, hi = max(a, offset), min(b, offset + f.numel())
            if lo < hi:
                views.append(f[lo - offset : hi - offset])
            offset += f.numel()
        out.append((a, b, tuple(views)))
    return out


def _l2(group: dict, grads: Tensor, params: tuple, k: int) -> Tensor:
    wd = group["weight_decay"]
    return grads if wd == 0 else grads.add(_flat(params).to(grads.dtype), alpha=wd / k)


def adam(group: dict, grads: Tensor, params: tuple, state: dict, k: int) -> tuple[Tensor, float]:
    beta1, beta2 = (_scalar(b) for b in group["betas"])
    lr, eps, wd = _scalar(group["lr"]), group["eps"], group["weight_decay"]
    grads = -grads if group["maximize"] else grads
    step = _scalar(state["step"].add_(1))
    if wd != 0 and group.get("decoupled_weight_decay", False):
        torch._foreach_mul_(list(params), 1 - lr * wd)
    else:
        grads = _l2(group, grads, params, k)
    exp_avg = _buffer(state, "exp_avg", grads)
    exp_avg_sq = _buffer(state, "exp_avg_sq", grads)
    exp_avg.lerp_(grads, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grads, grads, value=1 - beta2)
    step_size = lr / (1 - beta1**step)
    bias_correction2_sqrt = (1 - beta2**step) ** 0.5
    if group["amsgrad"]:
        max_sq = _buffer(state, "max_exp_avg_sq", grads)
        torch.maximum(max_sq, exp_avg_sq, out=max_sq)
        exp_avg_sq = max_sq
    denom = exp_avg_sq.sqrt().div_(bias_correction2_sqrt).add_(eps)
    return exp_avg.mul(-step_size).div_(denom), 1.0


def rmsprop(group: dict, grads: Tensor, params: tuple, state: dict, k: int) -> tuple[Tensor, float]:
    alpha, lr, eps = group["alpha"], _scalar(group["lr"]), group["eps"]
    grads = -grads if group["maximize"] else grads
    state["step"].add_(1)
    grads = _l2(group, grads, params, k)
    square_avg = _buffer(state, "square_avg", grads)
    square_avg.mul_(alpha).addcmul_(grads, grads, value=1 - alpha)
    if group["centered"]:
        grad_avg = _buffer(state, "grad_avg", grads)
        grad_avg.lerp_(grads, 1 - alpha)
        avg = square_avg.addcmul(grad_avg, grad_avg, value=-1).sqrt_()
    else:
        avg = square_avg.sqrt()
    avg = avg.add_(eps)
    if group["momentum"] > 0:
        buf = _buffer(state, "momentum_buffer", grads)
        buf.mul_(group["momentum"]).addcdiv_(grads, avg)
        return buf, -lr
    return grads.mul(-lr).div_(avg), 1.0


def adagrad(group: dict, grads: Tensor, params: tuple, state: dict, k: int) -> tuple[Tensor, float]:
    lr, eps = _scalar(group["lr"]), group["eps"]
    step = _scalar(state["step"].add_(1))
    grads = -grads if group["maximize"] else grads
    grads = _l2(group, grads, params, k)
    clr = lr / (1 + (step - 1) * group["lr_decay"])
    acc = _buffer(state, "sum", grads, group["initial_accumulator_value"])
    acc.addcmul_(grads, grads, value=1)
    std = acc.sqrt().add_(eps)
    return grads.mul(-clr).div_(std), 1.0


def chunked_update(
    rule: Rule, group: dict, grads: Tensor, params: tuple[Tensor, ...], state: dict, k: int
) -> None:
    """One torch-path step of a param group, rule applied to cache-sized column chunks.

    Elementwise rules give the same numbers chunk by chunk; ``state["step"]`` advances once.
    The parameters must be contiguous.
    """
    state["_width"] = grads.shape[1]
    try:
        with torch.no_grad():
            for a, b, views in _chunks(params, k):
                steps, alpha = rule(group, grads[:, a:b], views, _Columns(state, a, b), k)
                update = steps.sum(0)
                offsets = [0]
                for v in views:
                    offsets.append(offsets[-1] + v.numel())
                adds = [update[o : o + v.numel()].to(v.dtype) for o, v in zip(offsets, views)]
                torch._foreach_add_(list(views), adds, alpha=alpha)
    finally:
        del state["_width"]
    state["step"].add_(1)


RULES: dict[type, Rule] = {Adam: adam, AdamW: adam, RMSprop: rmsprop, Adagrad: adagrad}
