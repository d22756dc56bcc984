r"""Saliency-regularised task relations: SRDML (Bai & Zhao, KDD 2022).

Bai & Zhao, *Saliency-Regularized Deep Multi-Task Learning*, KDD 2022, arXiv
`2207.01117 <https://arxiv.org/abs/2207.01117>`_; official TensorFlow code ``BaiTheBest/SRDML``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any, Literal, get_args

import torch
from torch import Tensor, nn

__all__ = ["SaliencyRelation"]

Distance = Literal["l1", "sq_l2"]
Pool = Literal["sum", "mean", "none"]
Reduction = Literal["mean", "sum"]
OutputReduction = Literal["sum", "mean", "max"]
DISTANCES = get_args(Distance)
POOLS = get_args(Pool)
REDUCTIONS = get_args(Reduction)
OUTPUT_REDUCTIONS = get_args(OutputReduction)
#: Added to :math:`S = \sum_{u<v} c_{uv}` before dividing (the official code has no guard).
NORM_EPS = 1e-12

OutputReduce = OutputReduction | Callable[[Tensor], Tensor]


def _number(name: str, value: Any, *, positive: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {value!r}")
    ok = math.isfinite(value) and (value > 0 if positive else value >= 0)
    if not ok:
        raise ValueError(
            f"{name} must be finite and {'> 0' if positive else '>= 0'}, got {value!r}"
        )
    return float(value)


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
    return value


class SaliencyRelation(nn.Module):
    r"""SRDML's saliency regulariser with learned pairwise task relations.

    Bai & Zhao, *Saliency-Regularized Deep Multi-Task Learning*, KDD 2022, arXiv
    `2207.01117 <https://arxiv.org/abs/2207.01117>`_. Two C¹ functions that vanish at 0 are
    equal if and only if their input gradients are equal (the paper's Theorem 1), so tasks are
    related through the distance between their *saliencies*, the gradients of each task's
    prediction with respect to the last shared feature map :math:`A = h(x)`.

    For every sample :math:`e` and task :math:`t` with per-sample prediction :math:`f_t(A_e)`
    (a scalar; a map-valued output is first reduced per sample by ``output_reduce``), the
    saliency is pooled Grad-CAM style over the positions of :math:`A` (``pool="sum"``, the
    official :math:`Z = 1`, i.e. a sum, not a mean):

    .. math::
        \alpha_t(x_e) = \sum_{h,w} \frac{\partial f_t(A_e)}{\partial A_{e,:,h,w}}
            \in \mathbb R^{C},

    and, with learnable non-negative pair weights :math:`c_{ij}` (:attr:`pair_weights`, the
    entries :math:`i<j`) normalised to :math:`\omega_{ij} = c_{ij} / (S + 10^{-12})`,
    :math:`S = \sum_{u<v} c_{uv}`,

    .. math::
        d_{ij} = \operatorname{mean}_e \lVert \alpha_i(x_e) - \alpha_j(x_e) \rVert_1, \qquad
        R = \sum_{i<j} \omega_{ij}\, d_{ij}.

    The objective is :math:`\sum_t L_t + \mu R` (official :math:`\mu = 0.1`). ``per_task=True``
    returns :math:`R_i = \tfrac12 \sum_{j \ne i} \omega_{ij} d_{ij}` instead, with
    :math:`\sum_i R_i = R`. The gradient of :math:`\mu R` with respect to :math:`c`, which
    autograd computes in the same backward as the network's, is the official analytic one,
    :math:`\mu\,(D_{ij}/S - \sum_{u<v} c_{uv} D_{uv} / S^2)`: pairs closer than the
    :math:`\omega`-weighted mean distance gain weight. The saliencies are taken with
    ``create_graph=True``, so the backward is second order.

    **Training** :math:`c`. :attr:`pair_weights` is an ``nn.Parameter``; give it to the
    optimizer in its own param group, :meth:`param_group` (``{"params": [c], "lr": lr}``, the
    same options mechanism as the uncertainty weighting's ``param_group_options``)::

        reg = SaliencyRelation(num_tasks=K)
        opt = MTLOptimizer([{"params": model.parameters()}, reg.param_group()], torch.optim.Adam)
        z = model.trunk(x); outs = [head(z) for head in model.heads]
        opt.zero_grad()
        (mu * reg(z, outs)).backward(retain_graph=True)  # the regulariser, outside the tasks
        opt.backward([loss(o, y) for o, y in zip(outs, ys)])
        opt.step()

    ``MTLOptimizer`` keeps gradients already on the parameters when its window starts, so the
    regulariser's gradient is added to the method's combination of the task gradients and no
    aggregator or weighting sees it. Alternatively ``opt.backward(torch.stack(losses) + mu *
    reg(z, outs, per_task=True))`` hands the per-task terms to the method (as the distillation
    modules do); then pass ``shared=`` to the optimizer, since every task reaches :math:`c` and
    shared-parameter detection would otherwise treat it as shared. The projection
    :math:`c \leftarrow \max(c, 0)` of the official code runs in place at the start of every
    :meth:`forward` (:meth:`project_`), so no call after ``step`` is needed; :meth:`relations`
    shows the projected values.

    **Inspection.** :meth:`relations` returns the detached symmetric :math:`K \times K` matrix
    of :math:`\omega` with a zero diagonal (upper triangle summing to 1), ready for
    ``mtl_optim.grouping.plot_affinity``.

    Decisions (differences from the official code):

    * ``reduction="mean"`` averages the pair distances over the batch, like the task losses;
      the official code sums them (strength proportional to the batch size):
      ``reduction="sum"`` reproduces it, as does :math:`\mu_{ours} = \mu_{official}\,|B|`.
    * :math:`c` keeps persistent optimizer state in its own param group (lr ``1e-3``); the
      official code re-wraps it every step, restarting its Adam moments.
    * If every :math:`c_{ij}` has been clipped to 0, they are re-initialised to ``init``
      (uniform relations) with a warning; the official code divides by zero.
    * ``dist="l1"`` is the official distance; ``"sq_l2"`` (the squared Euclidean distance, the
      quantity of the paper's generalisation bound) is ours. Other distances in the paper
      could not be checked.
    * Map-valued outputs (the paper defines scalar outputs) are reduced per sample by
      ``output_reduce``: ``"sum"`` (default), ``"mean"``, ``"max"`` (the top logit, Grad-CAM's
      usual choice for a classifier) or a callable ``(N, ...) -> (N,)``.

    Notes:
        Per-sample saliencies come from one backward per task of :math:`\sum_e f_t(A_e)`; this
        equals the per-sample gradients only if samples do not interact in the heads (no
        train-mode BatchNorm there). With piecewise-linear heads (ReLU, linear)
        :math:`\nabla_A f_t` is piecewise constant in :math:`A`, so :math:`R` sends zero
        gradient to the trunk almost everywhere and trains the heads and :math:`c` only; with
        linear heads :math:`\alpha_t` is the head's weight vector and :math:`R` is the classic
        shallow multi-task regulariser :math:`\sum \omega_{ij}\lVert w_i - w_j\rVert_1`.

    Args:
        num_tasks: :math:`K \ge 2`.
        dist: ``"l1"`` or ``"sq_l2"``.
        pool: ``"sum"`` (official) or ``"mean"`` over the positions (dimensions after the
            channel dimension 1) of :math:`A`, or ``"none"`` (the flattened gradient).
        reduction: ``"mean"`` or ``"sum"`` over the samples.
        init: the initial :math:`c_{ij}` (> 0; the official 1).
        lr: the learning rate in :meth:`param_group` (official Adam 1e-3); ``None``: the
            optimizer's.
        output_reduce: see above.
        dtype, device: of :attr:`pair_weights`.
    """

    _rows: Tensor
    _cols: Tensor

    def __init__(
        self,
        num_tasks: int,
        *,
        dist: Distance = "l1",
        pool: Pool = "sum",
        reduction: Reduction = "mean",
        init: float = 1.0,
        lr: float | None = 1e-3,
        output_reduce: OutputReduce = "sum",
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if isinstance(num_tasks, bool) or not isinstance(num_tasks, int):
            raise TypeError(f"num_tasks must be an int >= 2, got {num_tasks!r}")
        if num_tasks < 2:
            raise ValueError(
                f"num_tasks must be an int >= 2 (relations are pairs), got {num_tasks}"
            )
        self.num_tasks = num_tasks
        self.dist = _choice("dist", dist, DISTANCES)
        self.pool = _choice("pool", pool, POOLS)
        self.reduction = _choice("reduction", reduction, REDUCTIONS)
        self.init = _number("init", init, positive=True)
        self.lr = None if lr is None else _number("lr", lr, positive=True)
        if not callable(output_reduce):
            _choice("output_reduce", output_reduce, OUTPUT_REDUCTIONS)
        self.output_reduce = output_reduce
        rows, cols = torch.triu_indices(num_tasks, num_tasks, 1, device=device)
        self.register_buffer("_rows", rows, persistent=False)
        self.register_buffer("_cols", cols, persistent=False)
        #: :math:`c_{ij}` for :math:`i<j`, in ``torch.triu_indices(K, K, 1)`` order.
        self.pair_weights = nn.Parameter(
            torch.full((rows.numel(),), self.init, dtype=dtype, device=device)
        )

    @property
    def param_group_options(self) -> dict[str, Any]:
        """Options for :attr:`pair_weights`' param group (``{"lr": lr}``, or empty)."""
        return {} if self.lr is None else {"lr": self.lr}

    def param_group(self) -> dict[str, Any]:
        """``{"params": [pair_weights], **param_group_options}`` for the optimizer."""
        return {"params": [self.pair_weights], **self.param_group_options}

    @torch.no_grad()
    def project_(self) -> None:
        r""":math:`c \leftarrow \max(c, 0)` in place; all zero: back to ``init`` with a warning.

        The parameter is written only when something changes (a write would invalidate a
        graph built on it that is still waiting for its backward)."""
        c = self.pair_weights
        if bool((c < 0).any()):
            c.clamp_(min=0)
        if not bool(c.any()):
            warnings.warn(
                "SaliencyRelation: every pair weight was clipped to 0; re-initialised to "
                f"uniform relations (init={self.init})",
                RuntimeWarning,
                stacklevel=3,
            )
            c.fill_(self.init)

    def omega(self) -> Tensor:
        r"""The normalised pair weights :math:`\omega_{ij} = c_{ij} / (S + 10^{-12})` (in the
        graph of :attr:`pair_weights`), in ``triu_indices`` order. Call after
        :meth:`project_` (``forward`` does)."""
        c = self.pair_weights
        return c / (c.sum() + NORM_EPS)

    @torch.no_grad()
    def relations(self) -> Tensor:
        r"""The symmetric :math:`K \times K` matrix of :math:`\omega` (detached, zero diagonal,
        upper triangle summing to 1), of the projected :math:`c` (nothing is written)."""
        c = self.pair_weights.detach().clamp(min=0)
        if not bool(c.any()):
            c = torch.full_like(c, self.init)
        w = c / (c.sum() + NORM_EPS)
        out = w.new_zeros(self.num_tasks, self.num_tasks)
        out[self._rows, self._cols] = w
        out[self._cols, self._rows] = w
        return out

    def _reduce_output(self, out: Tensor, n: int, t: int) -> Tensor:
        if out.dim() == 0 or out.shape[0] != n:
            raise ValueError(
                f"output {t} has shape {tuple(out.shape)}; expected one prediction per sample "
                f"(first dimension {n}, the batch of the features)"
            )
        if callable(self.output_reduce):
            red = self.output_reduce(out)
            if red.shape != (n,):
                raise ValueError(
                    f"output_reduce returned shape {tuple(red.shape)} for output {t}, "
                    f"expected ({n},)"
                )
            return red
        if out.dim() == 1:
            return out
        flat = out.flatten(1)
        if self.output_reduce == "sum":
            return flat.sum(1)
        if self.output_reduce == "mean":
            return flat.mean(1)
        return flat.max(1).values

    def saliency(self, features: Tensor, outputs: Sequence[Tensor]) -> Tensor:
        r"""The pooled saliencies :math:`\alpha_t(x_e)`, shape ``(K, N, C')`` (in the graph).

        Args:
            features: the shared map :math:`A`, ``(N, C, ...)``, inside the autograd graph.
            outputs: the K per-sample predictions computed from ``features``.
        """
        if not isinstance(features, Tensor) or not features.requires_grad:
            raise ValueError(
                "features must be the shared feature map inside the autograd graph (a tensor "
                "that requires grad, from which the outputs are computed)"
            )
        if features.dim() < 2:
            raise ValueError(f"features must be (N, C, ...), got shape {tuple(features.shape)}")
        if isinstance(outputs, Tensor) or len(outputs) != self.num_tasks:
            got = "a tensor" if isinstance(outputs, Tensor) else f"{len(outputs)} outputs"
            raise ValueError(f"expected a sequence of {self.num_tasks} outputs, got {got}")
        n = features.shape[0]
        pooled = []
        for t, out in enumerate(outputs):
            f = self._reduce_output(out, n, t)
            (grad,) = torch.autograd.grad(f.sum(), features, create_graph=True, allow_unused=True)
            if grad is None:
                raise ValueError(f"output {t} does not depend on features")
            if self.pool == "none" or grad.dim() == 2:
                pooled.append(grad.flatten(1))
            elif self.pool == "sum":
                pooled.append(grad.flatten(2).sum(2))
            else:
                pooled.append(grad.flatten(2).mean(2))
        return torch.stack(pooled)

    def distances(self, features: Tensor, outputs: Sequence[Tensor]) -> Tensor:
        r"""The per-pair distances :math:`d_{ij}` (``(K(K-1)/2,)``, ``triu_indices`` order,
        reduced over the batch by ``reduction``; in the graph)."""
        alpha = self.saliency(features, outputs)
        diff = alpha[self._rows] - alpha[self._cols]
        per_sample = diff.abs().sum(-1) if self.dist == "l1" else diff.pow(2).sum(-1)
        return per_sample.mean(1) if self.reduction == "mean" else per_sample.sum(1)

    def forward(
        self, features: Tensor, outputs: Sequence[Tensor], *, per_task: bool = False
    ) -> Tensor:
        r""":math:`R` (a scalar), or with ``per_task=True`` the ``(K,)`` terms :math:`R_i`.

        Args:
            features: the shared map :math:`A` (``(N, C, ...)``), inside the graph.
            outputs: the K per-sample predictions computed from ``features``.
            per_task: return :math:`R_i = \tfrac12\sum_{j\ne i}\omega_{ij} d_{ij}`.
        """
        self.project_()
        d = self.distances(features, outputs)
        pair = self.omega().to(d.dtype) * d
        if not per_task:
            return pair.sum()
        half = 0.5 * pair
        terms = d.new_zeros(self.num_tasks)
        return terms.index_add(0, self._rows, half).index_add(0, self._cols, half)

    def extra_repr(self) -> str:
        reduce = self.output_reduce if isinstance(self.output_reduce, str) else "<callable>"
        return (
            f"num_tasks={self.num_tasks}, dist={self.dist!r}, pool={self.pool!r}, "
            f"reduction={self.reduction!r}, init={self.init}, lr={self.lr}, "
            f"output_reduce={reduce!r}"
        )
