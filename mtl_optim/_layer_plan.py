r"""Which shared parameters the K reverse passes serve from Linear layers' output gradients.

A :class:`Plan` walks the losses' autograd graph once and finds the ``addmm``/``mm`` nodes
whose weight input is ``W.t()`` of a shared ``W`` (and whose bias input is a shared ``b``),
where every use of the parameter has that form. The reverse passes then stop at those layers'
outputs and return :math:`\delta_i`; :mod:`mtl_optim._streamed_gramian` turns them into rows
of ``J`` or into the Gramian without ``J``. Every other shared parameter is asked from autograd.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.autograd.graph import GradientEdge

__all__ = ["Plan"]

# node name -> (position of the W.t() input, position of the bias input or None, saved input X)
_LINEAR_NODES = {
    "AddmmBackward0": (2, 0, "_saved_mat1"),
    "MmBackward0": (1, None, "_saved_self"),
}


@dataclass(frozen=True)
class _Use:
    consumer: int  # index into Plan.consumers
    bias: bool  # True: the bias input (δ summed to b's shape); False: the weight (δᵀ X)


class Plan:
    """Which shared parameters the reverse passes serve from Linear layers' output gradients.

    ``linear`` maps a parameter's index in ``shared`` to its uses; ``generic`` lists the other
    indices (asked from autograd); ``edges`` holds one :class:`GradientEdge` per Linear node
    (its output), ``inputs`` the layer inputs ``X`` for the weight uses.
    """

    def __init__(self, losses: Sequence[Tensor], shared: Sequence[Tensor], dtype: torch.dtype):
        self.shared = list(shared)
        index = {id(p): i for i, p in enumerate(self.shared)}
        uses: dict[int, list[tuple[Any, int, bool]]] = {}
        seen: set[int] = set()
        nodes: list[Any] = []  # keeps every visited node alive, so that ids stay unique
        stack = [loss.grad_fn for loss in losses]
        while stack:
            node = stack.pop()
            if node is None or id(node) in seen:
                continue
            seen.add(id(node))
            nodes.append(node)
            for pos, (child, _) in enumerate(node.next_functions):
                if child is None:
                    continue
                leaf = _shared_leaf(child, index)
                if leaf is not None:
                    uses.setdefault(leaf[0], []).append((node, pos, leaf[1]))
                elif getattr(child, "variable", None) is None:  # not a leaf: walk on
                    stack.append(child)

        self.consumers: list[Any] = []
        self.inputs: list[Tensor | None] = []
        self.linear: dict[int, list[_Use]] = {}
        self.generic: list[int] = []
        slot: dict[int, int] = {}
        for i, p in enumerate(self.shared):
            found = [_role(node, pos, t, p, dtype) for node, pos, t in uses.get(i, [])]
            if not found or any(role is None for role in found):
                self.generic.append(i)
                continue
            self.linear[i] = []
            for (node, _, _), role in zip(uses[i], found):
                assert role is not None
                if id(node) not in slot:
                    slot[id(node)] = len(self.consumers)
                    self.consumers.append(node)
                    self.inputs.append(None)
                c = slot[id(node)]
                if role[0] == "weight":
                    self.inputs[c] = role[1]
                self.linear[i].append(_Use(c, role[0] == "bias"))
        self.edges = [GradientEdge(node, 0) for node in self.consumers]
        self.offsets = [0]
        for p in self.shared:
            self.offsets.append(self.offsets[-1] + p.numel())

    @property
    def dim(self) -> int:
        return self.offsets[-1]

    def passes(
        self,
        losses: Sequence[Tensor],
        retain_graph: bool,
        extra: Sequence[Tensor] = (),
        sink: Callable[[Sequence[Tensor | None]], None] | None = None,
    ):
        """Run the K reverse passes: yield, per task, its output gradients at the Linear nodes
        (``None`` where the task does not reach one) and its gradients of the generic
        parameters. The same passes also differentiate the tensors ``extra`` (task-specific
        parameters), whose gradients of each task go to ``sink``."""
        # GradientEdges and tensors side by side, which autograd accepts (its hints do not)
        inputs: Any = [*self.edges, *(self.shared[i] for i in self.generic), *extra]
        n_edges, n_shared = len(self.edges), len(self.edges) + len(self.generic)
        last = len(losses) - 1
        for t, loss in enumerate(losses):
            if not inputs or loss.grad_fn is None:
                yield [None] * n_edges, [None] * len(self.generic)
                continue
            grads = torch.autograd.grad(
                loss, inputs, retain_graph=retain_graph or t < last, allow_unused=True
            )
            if sink is not None:
                sink(grads[n_shared:])
            yield list(grads[:n_edges]), list(grads[n_edges:n_shared])

    def write_linear(self, i: int, deltas: Sequence[Tensor | None], out: Tensor) -> None:
        """Write parameter ``i``'s gradient (shaped like it) from one task's output gradients:
        ``δᵀ X`` per weight use, ``δ`` summed to the bias's shape per bias use."""
        p, first = self.shared[i], True
        for use in self.linear[i]:
            delta = deltas[use.consumer]
            if delta is None:
                continue
            x = self.inputs[use.consumer]
            if use.bias:
                part = delta.sum_to_size(p.shape)
                if first:
                    out.copy_(part)
                else:
                    out.add_(part)
            elif x is None:  # a weight use always has its input (see _role)
                raise AssertionError("a Linear weight's input is missing")
            elif first:  # autograd's own product for W.t(): grad.t().mm(mat1), transposed back
                torch.mm(delta.t(), x, out=out)
            else:
                out.add_(torch.mm(delta.t(), x))
            first = False
        if first:
            out.zero_()

    def row_views(self, row: Tensor, i: int) -> Tensor:
        return row[self.offsets[i] : self.offsets[i + 1]].view(self.shared[i].shape)


def _shared_leaf(node: Any, index: dict[int, int]) -> tuple[int, bool] | None:
    """``(parameter index, transposed)`` if ``node`` is a shared parameter's AccumulateGrad,
    or a ``TBackward0`` directly above one."""
    variable = getattr(node, "variable", None)
    if variable is not None:
        i = index.get(id(variable))
        return None if i is None else (i, False)
    if type(node).__name__ == "TBackward0":
        children = [c for c, _ in node.next_functions if c is not None]
        if len(children) == 1:
            variable = getattr(children[0], "variable", None)
            if variable is not None and id(variable) in index:
                return index[id(variable)], True
    return None


def _role(
    node: Any, pos: int, transposed: bool, p: Tensor, dtype: torch.dtype
) -> tuple[str, Tensor | None] | None:
    """``("weight", X)`` or ``("bias", None)`` if this use of ``p`` is a Linear layer's,
    ``None`` otherwise."""
    spec = _LINEAR_NODES.get(type(node).__name__)
    if spec is None or p.dtype != dtype or p.layout != torch.strided:
        return None
    if getattr(p, "_backward_hooks", None):  # p.register_hook: autograd must run the hooks
        return None
    weight_pos, bias_pos, saved = spec
    try:
        if type(node).__name__ == "AddmmBackward0" and (
            node._saved_alpha != 1 or node._saved_beta != 1
        ):
            return None
        if pos == weight_pos and transposed and p.dim() == 2:
            x = getattr(node, saved)
            if isinstance(x, Tensor) and x.dim() == 2 and x.dtype == dtype:
                if x.layout == torch.strided and x.shape[1] == p.shape[1]:
                    return "weight", x
        elif pos == bias_pos and not transposed:
            return "bias", None
    except Exception:  # a saved tensor that cannot be read (released, or behind hooks)
        return None
    return None
