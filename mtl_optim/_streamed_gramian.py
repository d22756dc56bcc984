r"""Per-task gradients layer by layer, and their Gramian :math:`M = JJ^\top` without ``J``.

Most shared parameters of a multi-task trunk are the weights of ``nn.Linear`` layers. A layer
``y = x Wᵀ + b`` that sees the ``N`` rows ``X`` (``N × in``) of a batch gives task ``i`` the
gradients

.. math::
    \nabla_W L_i = \delta_i^\top X, \qquad \nabla_b L_i = \mathbf 1^\top \delta_i,
    \qquad \delta_i = \partial L_i / \partial y \ (N \times out).

:class:`Plan` finds such layers in the autograd graph: an ``addmm``/``mm`` node whose weight
input is ``W.t()`` of a shared ``W`` and whose bias input is a shared ``b``, where every use of
the parameter has that form (tied weights are fine; a weight also read elsewhere, or under
autocast, is not). The K reverse passes then stop at those layers' outputs and return
:math:`\delta_i`; the weight gradients are not computed there. Every other shared parameter
(convolutions, normalisation layers, embeddings, parameters read directly) is asked from
autograd as usual.

* **Jacobian route** (:func:`fill_jacobian`): :math:`\delta_i^\top X` is written straight into
  row ``i`` of ``J`` (``torch.mm(..., out=)``, the product autograd itself computes, without
  the gradient tensor and the copy into ``J``).
* **Gramian route** (:class:`GramianPass`): for a layer whose batch is small against its
  width, the weight's rows are never formed. With :math:`Q = XX^\top` (``N × N``),

  .. math::
      \langle \nabla_W L_i, \nabla_W L_j \rangle
      = \langle \delta_i \delta_j^\top, X X^\top \rangle = \langle \delta_i, Q \delta_j \rangle,

  about :math:`N^2\,in + K N^2\,out + K^2 N\,out` float64 multiply-adds (exact products of the
  float32 factors) instead of the :math:`K N\,in\,out` of the rows plus their Gramian. Other
  layers form their ``K`` rows one parameter at a time, add their float64 Gramian and drop
  them; other parameters' rows (``K × n``) come from the passes. The combination
  :math:`\sum_i c_i \nabla L_i` then costs one product :math:`(\sum_i c_i \delta_i)^\top X` per
  layer and ``c @ rows`` for the rest: no second reverse pass.

Both equal autograd's per-task gradients up to rounding (tests compare them on MLPs,
transformers, convolutions with BatchNorm, tied weights, embeddings and losses that read a
parameter directly). The trick's Gramian is computed in float64 from the float32 factors, so
it differs from the Gramian of the float32 rows by their rounding (~1e-7 relative), not more.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from ._layer_plan import Plan
from ._linalg import gramian

__all__ = ["GramianPass", "Plan", "fill_jacobian", "prefers_gramian", "streamed_gramian"]

#: largest ``N × N`` float64 matrix ``X Xᵀ`` the Gramian trick may allocate
_TRICK_MAX_ELEMENTS = 1 << 22
#: what one entry of ``J`` costs the Jacobian route besides forming it, in multiply-adds: its
#: share of the float64 Gramian, the finite check, the weighted sum and the write to ``.grad``
#: (fitted to the step times of ``benchmarks/vs_torchjd.py``)
_J_ENTRY_COST = 10
#: ``route="auto"`` also takes the Gramian route when ``J`` would fill more than this share of
#: the memory available (and the Gramian route needs at most half of ``J``'s)
_J_MEMORY_SHARE = 0.25
#: ... but never for a ``J`` below this many bytes, which fits wherever this library runs
_J_MEMORY_FLOOR = 1 << 26


# The plan route="auto" made its decision with, kept for the route it then runs on the same
# losses (one graph walk per backward instead of two); whoever uses it drops it.
_decided: tuple[tuple[Any, ...], tuple[int, ...], torch.dtype, Plan] | None = None


def _plan(losses: Sequence[Tensor], shared: Sequence[Tensor], dtype: torch.dtype) -> Plan:
    """The plan of these losses: the one ``prefers_gramian`` just made for them, or a new one."""
    global _decided
    kept, _decided = _decided, None
    if kept is not None:
        nodes, ids, kept_dtype, plan = kept
        same = len(nodes) == len(losses) and all(
            a is loss.grad_fn for a, loss in zip(nodes, losses)
        )
        if same and kept_dtype == dtype and ids == tuple(id(p) for p in shared):
            return plan
    return Plan(losses, shared, dtype)


def _add_to_grads(params: Sequence[Tensor]) -> Callable[[Sequence[Tensor | None]], None] | None:
    """A sink for :meth:`Plan.passes`: add each pass's gradients of ``params`` to their
    ``.grad`` as autograd's accumulation does (``None`` without ``params``)."""
    if not params:
        return None

    def accumulate(grads: Sequence[Tensor | None]) -> None:
        for p, g in zip(params, grads):
            if g is None:
                continue
            if p.grad is None:
                p.grad = g
            else:
                p.grad.add_(g)

    return accumulate


@torch.no_grad()
def fill_jacobian(
    losses: Sequence[Tensor],
    shared: Sequence[Tensor],
    out: Tensor,
    retain_graph: bool,
    heads: Sequence[Tensor] = (),
) -> None:
    r"""The Jacobian route's K reverse passes: row ``i`` of ``out`` (``K × d``) gets
    :math:`\nabla L_i`; Linear weights straight from :math:`\delta_i^\top X`.

    ``heads``: task-specific parameters that each loss reaches at most once; the same passes
    add :math:`\nabla \sum_i L_i` to their ``.grad`` (what one ``backward`` of the sum would
    leave there), which saves that reverse pass."""
    plan = _plan(losses, shared, out.dtype)
    passes = plan.passes(losses, retain_graph, heads, _add_to_grads(heads))
    for t, (deltas, grads) in enumerate(passes):
        row = out[t]
        for i, g in zip(plan.generic, grads):
            view = row[plan.offsets[i] : plan.offsets[i + 1]]
            if g is None:
                view.zero_()
            else:  # a sparse gradient (nn.Embedding(sparse=True)) is densified into its row
                view.copy_((g.to_dense() if g.is_sparse else g).reshape(-1))
        for i in plan.linear:
            plan.write_linear(i, deltas, plan.row_views(row, i))


class GramianPass:
    """The Gramian of the K tasks' gradients of ``shared``, and what combines them later.

    After construction :attr:`gram` holds the ``(K, K)`` float64 Gramian; :meth:`combined`
    gives :math:`\\sum_i c_i \\nabla L_i` per parameter and :meth:`jacobian_into` the rows
    themselves, both from what the pass kept: the Linear layers' output gradients and inputs
    (activation-sized) and the other parameters' ``K`` rows. ``retain_graph=False`` frees the
    autograd graph in the last pass, as a plain ``backward`` does.
    """

    @torch.no_grad()
    def __init__(
        self,
        losses: Sequence[Tensor],
        shared: Sequence[Tensor],
        dtype: torch.dtype,
        retain_graph: bool = False,
        heads: Sequence[Tensor] = (),
    ) -> None:
        plan = self.plan = _plan(losses, shared, dtype)
        k = self.num_tasks = len(losses)
        device = self.device = shared[0].device if shared else losses[0].device
        self.dtype = dtype
        sizes = [plan.shared[i].numel() for i in plan.generic]
        self.rows = torch.empty(k, sum(sizes), dtype=dtype, device=device)
        per_task: list[list[Tensor | None]] = []
        passes = plan.passes(losses, retain_graph, heads, _add_to_grads(heads))
        for t, (deltas, grads) in enumerate(passes):
            per_task.append(deltas)
            offset = 0
            for g, n in zip(grads, sizes):
                view = self.rows[t, offset : offset + n]
                if g is None:
                    view.zero_()
                else:
                    view.copy_((g.to_dense() if g.is_sparse else g).reshape(-1))
                offset += n
        self.deltas: list[Tensor] = []  # (K, N, out) per Linear node
        for c, edge in enumerate(plan.edges):
            found = [d[c] for d in per_task]
            like = next((d for d in found if d is not None), None)
            if like is None:
                meta = edge.node._input_metadata[0]
                like = torch.zeros(meta.shape, dtype=meta.dtype, device=meta.device)
            self.deltas.append(
                torch.stack([torch.zeros_like(like) if d is None else d for d in found])
            )

        gram = torch.zeros(k, k, dtype=torch.float64, device=device)
        if sizes:
            gram += gramian(self.rows)
        for i in plan.linear:
            gram += self._gramian_of(i)
        self.gram = 0.5 * (gram + gram.T)

    def _gramian_of(self, i: int) -> Tensor:
        """Parameter ``i``'s contribution to the Gramian: by the trick where it is cheaper,
        else from its ``K`` rows, formed here and dropped."""
        plan, k = self.plan, self.num_tasks
        p, uses = plan.shared[i], plan.linear[i]
        if _trick_cost(plan, i, k) is not None:
            deltas = torch.cat([self.deltas[u.consumer] for u in uses], dim=1)
            x = torch.cat([plan.inputs[u.consumer] for u in uses], dim=0)  # type: ignore[misc]
            x64, d64 = x.to(torch.float64), deltas.to(torch.float64)
            q = x64 @ x64.T  # (N, N)
            r = torch.matmul(q, d64)  # (K, N, out): Q δ_j
            return d64.reshape(k, -1) @ r.reshape(k, -1).T
        block = torch.empty(k, *p.shape, dtype=self.dtype, device=self.device)
        for t in range(k):
            plan.write_linear(i, [d[t] for d in self.deltas], block[t])
        return gramian(block.reshape(k, -1))

    @torch.no_grad()
    def combined(self, coeff: Tensor) -> list[Tensor | None]:
        """:math:`\\sum_i c_i \\nabla_p L_i` for every shared parameter ``p`` (``None`` where no
        task reaches it), from the kept factors."""
        plan = self.plan
        c = coeff.to(device=self.device, dtype=self.dtype)
        out: list[Tensor | None] = [None] * len(plan.shared)
        if plan.generic:
            flat = c @ self.rows
            offset = 0
            for i in plan.generic:
                n = plan.shared[i].numel()
                out[i] = flat[offset : offset + n].view(plan.shared[i].shape)
                offset += n
        mixed = [torch.tensordot(c, d, dims=1) for d in self.deltas]  # Σ_i c_i δ_i per node
        for i in plan.linear:
            grad = torch.empty_like(plan.shared[i])
            plan.write_linear(i, mixed, grad)
            out[i] = grad
        return out

    @torch.no_grad()
    def jacobian_into(self, out: Tensor) -> None:
        """Write the K rows (``K × d``, the layout of ``shared``) into ``out``."""
        plan = self.plan
        offset = 0
        for i in plan.generic:
            n = plan.shared[i].numel()
            out[:, plan.offsets[i] : plan.offsets[i + 1]].copy_(self.rows[:, offset : offset + n])
            offset += n
        for t in range(self.num_tasks):
            deltas = [d[t] for d in self.deltas]
            for i in plan.linear:
                plan.write_linear(i, deltas, plan.row_views(out[t], i))


def _rows(plan: Plan, i: int) -> int:
    """The number of input rows ``N`` a Linear weight sees (over all its uses)."""
    rows = 0
    for use in plan.linear[i]:
        x = plan.inputs[use.consumer]
        rows += 0 if x is None else x.shape[0]
    return rows


def _trick_cost(plan: Plan, i: int, k: int) -> int | None:
    """Float64 multiply-adds of the Gramian trick for Linear weight ``i``, if it is cheaper
    (counted twice, float64) than forming the ``K`` rows and their Gramian; else ``None``."""
    p, uses = plan.shared[i], plan.linear[i]
    if any(u.bias for u in uses):
        return None
    n, (out_dim, in_dim) = _rows(plan, i), p.shape
    trick = n * n * in_dim + k * n * n * out_dim + k * k * n * out_dim
    rows = k * n * in_dim * out_dim + k * k * in_dim * out_dim
    return trick if 2 * trick < rows and n * n <= _TRICK_MAX_ELEMENTS else None


def route_costs(plan: Plan, k: int) -> tuple[int, int]:
    """Estimated multiply-adds of the Jacobian and the Gramian route where they differ.

    Jacobian route: ``K·N·in·out`` per Linear weight for its rows, plus
    ``_J_ENTRY_COST·K·d`` for handling ``J``. Gramian route: per Linear weight, twice the
    trick's float64 count or its rows and their Gramian, plus ``N·in·out`` for the
    combination; other parameters' rows cost what they cost in ``J``. The passes down to the
    layers are the same in both and left out.
    """
    jacobian = _J_ENTRY_COST * k * plan.dim
    gram = 0
    for i in plan.linear:
        p = plan.shared[i]
        if any(u.bias for u in plan.linear[i]):  # a bias: its rows are cheap either way
            jacobian += k * p.numel()
            gram += (k + 1 + _J_ENTRY_COST * k) * p.numel()
            continue
        trick, n = _trick_cost(plan, i, k), _rows(plan, i)
        jacobian += k * n * p.numel()
        if trick is not None:
            gram += 2 * trick + n * p.numel()
        else:
            gram += (k + 1) * n * p.numel() + _J_ENTRY_COST * k * p.numel()
    gram += _J_ENTRY_COST * k * sum(plan.shared[i].numel() for i in plan.generic)
    return jacobian, gram


def _available_bytes(device: torch.device) -> int | None:
    """Memory free for tensors on ``device`` (``MemAvailable`` on Linux for the CPU)."""
    try:
        if device.type == "cuda":
            return torch.cuda.mem_get_info(device)[0]
        if device.type == "cpu":
            with open("/proc/meminfo") as status:
                for line in status:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
    except (OSError, RuntimeError, ValueError):
        pass
    return None


def prefers_gramian(
    losses: Sequence[Tensor], shared: Sequence[Tensor], dtype: torch.dtype | None
) -> bool:
    """``route="auto"``'s rule: the Gramian route when its estimated cost
    (:func:`route_costs`) is lower, or when ``J`` would take more than ``_J_MEMORY_SHARE`` of
    the available memory while the Gramian route needs at most half as much."""
    if not shared or dtype is None:
        return False
    global _decided
    plan = Plan(losses, shared, dtype)
    _decided = (tuple(loss.grad_fn for loss in losses), tuple(id(p) for p in shared), dtype, plan)
    k = len(losses)
    jacobian, gram = route_costs(plan, k)
    if gram < jacobian:
        return True
    itemsize = dtype.itemsize
    j_bytes = k * plan.dim * itemsize
    if j_bytes < _J_MEMORY_FLOOR:
        return False
    available = _available_bytes(shared[0].device)
    if available is None or j_bytes <= _J_MEMORY_SHARE * available:
        return False
    generic = sum(plan.shared[i].numel() for i in plan.generic)
    formed = max(
        (plan.shared[i].numel() for i in plan.linear if _trick_cost(plan, i, k) is None),
        default=0,
    )
    outputs = sum(math.prod(e.node._input_metadata[0].shape) for e in plan.edges)
    return k * (generic + formed + outputs) * itemsize <= j_bytes / 2


def streamed_gramian(losses: Sequence[Tensor], shared: Sequence[Tensor]) -> Tensor:
    """``(K, K)`` float64 Gramian of the gradients of ``losses`` w.r.t. ``shared``; the
    autograd graph is kept."""
    dtype = torch.float32
    for p in shared:
        dtype = torch.promote_types(dtype, p.dtype)
    with torch.no_grad():
        return GramianPass(losses, shared, dtype, retain_graph=True).gram
