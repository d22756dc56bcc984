r"""The Gramian :math:`M = JJ^\top` of the per-task gradients without ever holding ``J``.

``J`` is ``K × d`` (d = number of shared parameters); this computes ``M`` while holding at most
``K ×`` (the gradients at the outputs of the operations that consume the shared parameters,
i.e. activation-sized tensors) plus ``K ×`` (the parameters of one block) at a time.

How. Every path in the autograd graph from a loss to a shared parameter ``p`` ends in a
*chain*: nodes with a single differentiable input that lead to ``p``'s ``AccumulateGrad``
(``p`` itself, ``p.t()``, ``p.view(...)``, ``2 * p``...). The last node before the chain is a
*consumer* (``addmm``, ``convolution``, ``embedding``, ``layer_norm``...), which mixes ``p``
with other inputs; its outputs are activations.

1. K reverse passes (``torch.autograd.grad`` with ``GradientEdge`` inputs) give each task's
   gradient at every consumer's outputs: ``δ_i``.
2. Per block of consumers that share parameters, the consumer's backward node is applied to the
   stacked ``δ`` (vmapped over tasks) to get the gradient flowing into each chain, and one
   batched reverse pass down the chains gives the block's ``(K, n_block)`` Jacobian, whose
   Gramian is added to ``M`` before the next block is formed.

The result equals ``J Jᵀ`` up to rounding (tests compare them on MLPs, convolutions with
BatchNorm, tied weights, embeddings and losses that read a parameter directly). Compute is
about two of the engine's K-pass Jacobians; the memory saving is ``d`` versus the activation
size, large for wide layers and small batches.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import torch
from torch import Tensor
from torch.autograd.graph import GradientEdge

__all__ = ["streamed_gramian"]


@torch.no_grad()
def streamed_gramian(losses: Sequence[Tensor], shared: Sequence[Tensor]) -> Tensor:
    """``(K, K)`` float64 Gramian of the gradients of ``losses`` w.r.t. ``shared``.

    The autograd graph is kept, so that the caller can run the weighted backward afterwards.
    """
    k = len(losses)
    device = shared[0].device if shared else losses[0].device
    gram = torch.zeros(k, k, dtype=torch.float64, device=device)
    graph = _Graph(losses, {id(p) for p in shared})
    if not graph.consumers and not graph.root_entries:
        return gram

    # 1. each task's gradient at every consumer output (K passes, activation-sized results).
    edges = [GradientEdge(node, nr) for node in graph.consumers for nr in range(_n_out(node))]
    deltas: list[list[Tensor]] = [[] for _ in edges]
    for loss in losses:
        if edges:
            grads = torch.autograd.grad(loss, edges, retain_graph=True, allow_unused=True)
        else:
            grads = ()
        for slot, (edge, g) in enumerate(zip(edges, grads)):
            deltas[slot].append(_zeros_for(edge) if g is None else g)
    stacked = {(id(e.node), e.output_nr): torch.stack(d) for e, d in zip(edges, deltas)}

    # 2. per block: into the chains, down to the parameters, Gramian of the block.
    for block in graph.blocks():
        entries: dict[tuple[int, int], tuple[Any, Tensor]] = {}
        for node in block.consumers:
            grads_in = [stacked.pop((id(node), nr)) for nr in range(_n_out(node))]
            outs = _apply_node(node, grads_in, k)
            for j, (child, nr) in enumerate(node.next_functions):
                out = outs[j]  # None: no gradient flows to this input (a zero contribution)
                if child is None or out is None or not graph.is_chain(child):
                    continue
                _add_entry(entries, child, nr, out)
        for node, nr, rows in block.roots:
            _add_entry(entries, node, nr, rows.to(device))
        params = block.params
        outputs = [GradientEdge(node, nr) for node, _ in entries.values()]
        grad_outputs = [g for _, g in entries.values()]
        jac = torch.autograd.grad(
            outputs,
            params,
            grad_outputs=grad_outputs,
            retain_graph=True,
            allow_unused=True,
            is_grads_batched=True,
        )
        for g in jac:
            if g is not None:
                rows = g.reshape(k, -1).to(torch.float64)
                gram += rows @ rows.T
        del jac, entries
    return gram


def _n_out(node: Any) -> int:
    return len(node._input_metadata)


def _zeros_for(edge: GradientEdge) -> Tensor:
    meta = edge.node._input_metadata[edge.output_nr]
    return torch.zeros(meta.shape, dtype=meta.dtype, device=meta.device)


def _add_entry(entries: dict, node: Any, nr: int, rows: Tensor) -> None:
    key = (id(node), nr)
    if key in entries:
        entries[key] = (node, entries[key][1] + rows)
    else:
        entries[key] = (node, rows)


def _apply_node(node: Any, grads: list[Tensor], k: int) -> tuple[Tensor | None, ...]:
    """Run a backward node on K stacked output gradients (vmapped; a loop if vmap fails)."""
    present: list[bool] = []
    metas = [None if c is None else c._input_metadata[nr] for c, nr in node.next_functions]

    def call(*g: Tensor) -> tuple[Tensor, ...]:  # vmap outputs must be tensors, not None
        outs = [_conform(o, m) for o, m in zip(node(*g), metas)]
        present[:] = [o is not None for o in outs]
        return tuple(o if o is not None else g[0].new_zeros(()) for o in outs)

    try:
        outs = torch.vmap(call)(*grads)
        return tuple(o if keep else None for o, keep in zip(outs, present))
    except Exception:  # an op without a batching rule: one call per task
        per_task = [
            [_conform(o, m) for o, m in zip(node(*(g[i] for g in grads)), metas)] for i in range(k)
        ]
        stacked: list[Tensor | None] = []
        for j in range(len(per_task[0])):
            col = [row[j] for row in per_task]
            stacked.append(None if col[0] is None else torch.stack(cast(list[Tensor], col)))
        return tuple(stacked)


def _conform(grad: Tensor | None, meta: Any) -> Tensor | None:
    """What autograd does between nodes: sum broadcast dimensions away, cast the dtype."""
    if grad is None or meta is None:
        return None
    if tuple(grad.shape) != tuple(meta.shape):
        grad = grad.sum_to_size(meta.shape)
    return grad if grad.dtype == meta.dtype else grad.to(meta.dtype)


class _Block:
    def __init__(self) -> None:
        self.consumers: list[Any] = []
        self.roots: list[tuple[Any, int, Tensor]] = []
        self.params: list[Tensor] = []


class _Graph:
    """Consumers, chains and parameter blocks of the graph below ``losses``."""

    def __init__(self, losses: Sequence[Tensor], shared_ids: set[int]) -> None:
        self.shared_ids = shared_ids
        self._chain: dict[int, Any] = {}  # id(node) -> the AccumulateGrad it leads to, or None
        self.consumers: list[Any] = []
        self.root_entries: list[tuple[Any, int, int]] = []  # (node, output_nr, task)
        seen: set[int] = set()
        k = len(losses)
        self._k = k
        for i, loss in enumerate(losses):
            root = loss.grad_fn
            if root is None:
                continue
            if self.is_chain(root):
                self.root_entries.append((root, loss.output_nr, i))
                continue
            stack = [root]
            while stack:
                node = stack.pop()
                if id(node) in seen:
                    continue
                seen.add(id(node))
                children = [c for c, _ in node.next_functions if c is not None]
                if any(self.is_chain(c) for c in children):
                    self.consumers.append(node)
                stack.extend(c for c in children if not self.is_chain(c))

    def _leaf(self, node: Any) -> Any:
        """The shared ``AccumulateGrad`` a chain node leads to, or ``None`` if not a chain."""
        key = id(node)
        if key in self._chain:
            return self._chain[key]
        self._chain[key] = None  # guards cycles (there are none in autograd graphs)
        variable = getattr(node, "variable", None)
        if variable is not None:
            leaf = node if id(variable) in self.shared_ids else None
        else:
            children = [c for c, _ in node.next_functions if c is not None]
            leaf = self._leaf(children[0]) if len(children) == 1 else None
        self._chain[key] = leaf
        return leaf

    def is_chain(self, node: Any) -> bool:
        return self._leaf(node) is not None

    def blocks(self) -> list[_Block]:
        """Consumers and root entries grouped so that no parameter is split across blocks."""
        parent: dict[tuple[str, int], tuple[str, int]] = {}

        def find(x: tuple[str, int]) -> tuple[str, int]:
            while parent.setdefault(x, x) != x:
                parent[x] = parent[parent[x]]
                x = parent[x]
            return x

        def union(a: tuple[str, int], b: tuple[str, int]) -> None:
            parent[find(a)] = find(b)

        items: list[tuple[str, Any, list[Any]]] = []
        for node in self.consumers:
            leaves = [self._leaf(c) for c, _ in node.next_functions if c is not None]
            items.append(("consumer", node, [leaf for leaf in leaves if leaf is not None]))
        for entry in self.root_entries:
            items.append(("root", entry, [self._leaf(entry[0])]))
        for idx, (_, _, leaves) in enumerate(items):
            for leaf in leaves:
                union(("item", idx), ("param", id(leaf)))
        groups: dict[tuple[str, int], _Block] = {}
        params_seen: dict[tuple[str, int], set[int]] = {}
        for idx, (kind, obj, leaves) in enumerate(items):
            key = find(("item", idx))
            block = groups.setdefault(key, _Block())
            seen = params_seen.setdefault(key, set())
            if kind == "consumer":
                block.consumers.append(obj)
            else:
                node, nr, task = obj
                rows = torch.zeros(self._k, dtype=torch.float64)
                rows[task] = 1.0
                meta = node._input_metadata[nr]
                rows = rows.to(meta.dtype).reshape(self._k, *meta.shape)
                block.roots.append((node, nr, rows))
            for leaf in leaves:
                if id(leaf.variable) not in seen:
                    seen.add(id(leaf.variable))
                    block.params.append(leaf.variable)
        return list(groups.values())
