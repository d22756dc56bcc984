"""GradNorm: learn the task weights so that the weighted gradient norms train at equal rates."""

from __future__ import annotations

import math
from typing import Any, Literal, get_args

import torch
from torch import Tensor, nn

from .._linalg import LOG_EPS
from .._validation import check_nonnegative, check_num_tasks
from ._base import Weighting
from ._epoch_means import EpochMeans, pop_state
from ._present import num_tasks, present_index

Initial = Literal["first", "epoch"]
_INITIAL = get_args(Initial)


class GradNorm(Weighting):
    r"""GradNorm (Chen, Badrinarayanan, Lee & Rabinovich, "GradNorm: Gradient Normalization for
    Adaptive Loss Balancing in Deep Multitask Networks", ICML 2018, arXiv 1711.02257).

    The objectives are :math:`o_i = w_i L_i` with learnable weights :math:`w` (constants for the
    model's gradient). The optimizer hands :meth:`observe` the rows :math:`J_i = \nabla(w_i L_i)`
    of the shared parameters (or at ``features=``), and

    .. math::
        G_i = \lVert J_i \rVert, \quad \bar G = \tfrac1K \textstyle\sum_j G_j, \quad
        \tilde L_i = \frac{L_i}{L_i(0)}, \quad r_i = \frac{\tilde L_i}{\frac1K\sum_j \tilde L_j},

    .. math::
        L_{\mathrm{grad}} = \sum_i \bigl| G_i - \operatorname{sg}(\bar G\, r_i^{\alpha}) \bigr|,
        \qquad
        \frac{\partial L_{\mathrm{grad}}}{\partial w_i} =
        \operatorname{sign}\bigl(G_i - \bar G r_i^{\alpha}\bigr)\,
        \operatorname{sign}(w_i)\, \lVert \nabla L_i \rVert ,

    (``sg``: stop-gradient) is what :meth:`observe` writes into ``w.grad``, analytically, with
    :math:`\lVert \nabla L_i \rVert = G_i / |w_i|` (0 for a weight of exactly 0, whose row
    carries no information). The model's own gradient is untouched (``J`` is returned as is, so
    an aggregator may still combine it). The base optimizer then steps :math:`w` with the model
    (its own param group, options ``{"lr": lr}``), and :meth:`after_step` renormalises
    :math:`w \leftarrow K w / \sum_j w_j`.

    :math:`G_i` is measured on every shared parameter the optimizer differentiates; the paper's
    choice, the last shared layer :math:`W`, is ``MTLOptimizer(..., shared=last_layer_params)``
    (the rest of the trunk then gets :math:`\nabla\sum_i w_i L_i`, as in the paper), and
    LibMTL's representation gradient is ``opt.backward(losses, features=z)``.

    Initial losses :math:`L_i(0)`: ``initial="first"`` (default, the paper) takes the losses of
    the first call; ``initial="epoch"`` (LibMTL) takes the mean losses of the first epoch (closed
    by ``opt.end_epoch()``) and keeps :math:`w = 1` untrained during it.

    Deviations: LibMTL parametrises :math:`w = K \operatorname{softmax}(\hat w)`; we learn
    :math:`w` directly with the paper's renormalisation, so :math:`w` is not forced positive (use
    ``clip``). ``clip=(lo, hi)`` (TAG's CelebA version: [0.1, 10] with :math:`\alpha` = 0.1)
    clamps :math:`w` before the renormalisation. :math:`L_i(0)` and the mean ratio are floored at
    ``eps`` (a zero initial loss would make the ratio infinite); a negative loss raises
    ``ValueError``. With several ``backward`` calls before a ``step``, ``w.grad`` comes from the
    accumulated rows and the loss ratios of the last call. A weight sum :math:`\le 0` at the
    renormalisation raises ``RuntimeError`` (lower ``lr`` or use ``clip``).

    Partial labels (``supports_missing``): the objectives are :math:`w_i L_i` for the present
    tasks :math:`P`. :math:`L_i(0)` is recorded at task :math:`i`'s first appearance (the loss of
    that batch with ``initial="first"``; with ``initial="epoch"`` the mean over the first epoch's
    batches in which it was present, or, for a task absent all that epoch, the loss of its first
    batch after it; NaN in :attr:`initial_losses` until then). :meth:`observe` balances over
    :math:`P` (:math:`\bar G` and the mean loss ratio over :math:`P`) and writes the gradient of
    the present weights (0 for the others); :meth:`after_step` puts back the value the weight of
    a task absent from every ``backward`` since the last step had before the step (the base
    optimizer's state of that coordinate has seen a zero gradient) and renormalises the others,
    :math:`w_S \leftarrow |S|\, w_S / \sum_{j \in S} w_j` over the tasks :math:`S` present in
    some ``backward`` of the step, so :math:`\sum_P w_i = m` for a step of one batch.

    State (:meth:`state_dict`): :math:`w`, :math:`L(0)` and the first-epoch accumulator; the
    optimizer state of :math:`w` is in the optimizer's state dict.

    Args:
        num_tasks: :math:`K`; the weights must exist before the optimizer is built.
        alpha: the restoring-force strength :math:`\alpha` (LibMTL default 1.5).
        lr: the learning rate of :math:`w`'s param group; ``None``: the optimizer's (LibMTL).
        initial: ``"first"`` or ``"epoch"``, where :math:`L(0)` comes from.
        clip: ``(lo, hi)`` bounds on :math:`w` (``0 < lo < hi``), or ``None``.
        eps: the floor under :math:`L(0)` and the mean loss ratio.
        dtype, device: of :math:`w` (it must be on the losses' device).
    """

    needs_jacobian = True
    separable = True
    supports_missing = True

    def __init__(
        self,
        num_tasks: int,
        alpha: float = 1.5,
        lr: float | None = None,
        *,
        initial: Initial = "first",
        clip: tuple[float, float] | None = None,
        eps: float = LOG_EPS,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        self.num_tasks = check_num_tasks(num_tasks)
        if not (math.isfinite(alpha) and alpha >= 0):
            raise ValueError(f"alpha must be finite and >= 0, got {alpha!r}")
        self.alpha = alpha
        if lr is not None and not lr > 0:
            raise ValueError(f"lr must be positive or None, got {lr!r}")
        self.lr = lr
        self.param_group_options = {} if lr is None else {"lr": lr}
        if initial not in _INITIAL:
            raise ValueError(f"initial must be one of {_INITIAL}, got {initial!r}")
        self.initial = initial
        if clip is not None:
            lo, hi = (float(c) for c in clip)
            if not 0 < lo < hi:
                raise ValueError(f"clip must be (lo, hi) with 0 < lo < hi, got {clip!r}")
            clip = (lo, hi)
        self.clip = clip
        if not eps > 0:
            raise ValueError(f"eps must be positive, got {eps!r}")
        self.eps = eps
        self.loss_weights = nn.Parameter(torch.ones(num_tasks, dtype=dtype, device=device))
        self.initial_losses: Tensor | None = None
        self._epoch = EpochMeans()
        self._losses: Tensor | None = None
        self._present: Tensor | None = None  # the present tasks of the last forward (None: all)
        self._seen: Tensor | None = None  # tasks present in some call since the last step
        self._before: Tensor | None = None  # w before the step (for the absent tasks)

    def parameters(self) -> list[Tensor]:
        return [self.loss_weights]

    def forward(self, losses: Tensor) -> Tensor:
        index = present_index(self, losses.numel())
        k = losses.numel() if index is None else num_tasks(self, losses.numel())
        if k != self.num_tasks:
            raise ValueError(f"{self!r} was built for {self.num_tasks} tasks, got {k}")
        check_nonnegative(losses, type(self).__name__)
        values = losses.detach().to(torch.float64)
        if index is None:
            if self.initial_losses is None:
                if self.initial == "first":
                    self.initial_losses = values.clone()
                else:
                    self._epoch.add(values, self)
            elif bool(torch.isnan(self.initial_losses).any()):  # first appearances
                self._record_initial(values, torch.arange(k))
        else:
            if self.initial_losses is None and self.initial == "first":
                self.initial_losses = torch.full((k,), float("nan"), dtype=torch.float64)
            if self.initial_losses is None:
                self._epoch.add(values, self, index, k)
            else:
                self._record_initial(values, index)
        self._losses, self._present = values, index
        seen = torch.ones(k, dtype=torch.bool)
        if index is not None:
            seen = torch.zeros(k, dtype=torch.bool)
            seen[index] = True
        self._seen = seen if self._seen is None else self._seen | seen
        w = self.loss_weights.detach()
        if index is None:
            self.weights = w.to(losses.dtype).clone()
        else:
            self._before = w.clone()
            self.weights = w[index.to(w.device)].to(losses.dtype).clone()
        return self.weights * losses

    def _record_initial(self, values: Tensor, index: Tensor) -> None:
        """Set :math:`L_i(0)` of the tasks ``index`` that have none yet to ``values``."""
        assert self.initial_losses is not None
        first = self.initial_losses
        at = index.to(first.device)
        unset = torch.isnan(first[at])
        if bool(unset.any()):
            first = first.clone()
            first[at[unset]] = values.to(first)[unset]
            self.initial_losses = first

    def observe(self, jacobian: Tensor) -> Tensor:
        if self.initial_losses is None or self._losses is None:  # "epoch": still in epoch 0
            return jacobian
        index = self._present
        w = self.loss_weights.detach().to(torch.float64)
        initial = self.initial_losses.to(self._losses.device)
        if index is not None:
            w, initial = w[index.to(w.device)], initial[index.to(initial.device)]
        if jacobian.shape[0] != w.numel():
            raise ValueError(
                f"{self!r}: {jacobian.shape[0]} gradient rows for {w.numel()} present tasks"
            )
        norms = torch.linalg.vector_norm(jacobian.detach(), dim=1, dtype=torch.float64)
        ratio = self._losses / initial.clamp(min=self.eps)
        r = ratio / ratio.mean().clamp(min=self.eps)
        target = norms.mean() * r.pow(self.alpha)
        d_norm = torch.where(w != 0, norms / w, torch.zeros_like(w))  # sign(w_i) ||grad L_i||
        grad = torch.sign(norms - target) * d_norm
        if index is None:
            self.loss_weights.grad = grad.to(self.loss_weights)
        else:
            full = torch.zeros_like(self.loss_weights)
            full[index.to(full.device)] = grad.to(full)
            self.loss_weights.grad = full
        return jacobian

    def after_step(self) -> None:
        seen, before = self._seen, self._before
        self._seen, self._before = None, None
        if self.initial_losses is None:
            return
        with torch.no_grad():
            w = self.loss_weights
            if self.clip is not None:
                w.clamp_(*self.clip)
            if seen is None or bool(seen.all()):
                total = w.sum()
                count = self.num_tasks
            else:
                at = seen.to(w.device)
                if before is not None:  # the absent tasks' weights do not move
                    w.copy_(torch.where(at, w, before.to(w)))
                total = w[at].sum()
                count = int(seen.sum())
            if not total > 0:
                raise RuntimeError(
                    f"{self!r}: the task weights sum to {total.item()} <= 0 and cannot be "
                    "renormalised; lower lr or pass clip=(lo, hi)"
                )
            if count == self.num_tasks:
                w.mul_(self.num_tasks / total)
            else:
                w.copy_(torch.where(at, w * (count / total), w))

    def restore(self, snapshot: Any) -> None:
        super().restore(snapshot)
        self._seen, self._before = None, None  # the skipped step's calls do not count

    def end_epoch(self) -> None:
        if self.initial == "epoch" and self.initial_losses is None:
            self.initial_losses = self._epoch.close()  # NaN for a task the epoch never saw

    def state_dict(self) -> dict[str, Any]:
        first = None if self.initial_losses is None else self.initial_losses.clone()
        return {**super().state_dict(), "initial_losses": first, **self._epoch.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        state = dict(state)
        mine = pop_state(state, ("initial_losses", *EpochMeans.KEYS), self)
        super().load_state_dict(state)
        first = mine["initial_losses"]
        self.initial_losses = None if first is None else torch.as_tensor(first).double().clone()
        self._epoch.load_state_dict(mine)

    def __repr__(self) -> str:
        clip = "" if self.clip is None else f", clip={self.clip!r}"
        return (
            f"{type(self).__name__}({self.num_tasks}, alpha={self.alpha!r}, lr={self.lr!r}, "
            f"initial={self.initial!r}{clip})"
        )
