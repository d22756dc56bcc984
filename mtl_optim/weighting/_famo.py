"""FAMO: fast adaptive multitask optimization."""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .._validation import check_num_tasks
from ._base import Weighting
from ._epoch_means import pop_state, warn_user
from ._present import num_tasks, present_index

#: Added to :math:`L_i - \ell^*_i` before the logarithm (the official code's constant).
FAMO_EPS = 1e-8


class FAMO(Weighting):
    r"""FAMO (Liu, Liu, Jin, Stone & Liu, "FAMO: Fast Adaptive Multitask Optimization",
    NeurIPS 2023, arXiv 2306.03792).

    State: logits :math:`\xi \in \mathbb R^K` (initially 0) and minimum losses :math:`\ell^*`
    (default 0). **Model step** (:meth:`forward`, then the optimizer): with
    :math:`z = \operatorname{softmax}(\xi)` and :math:`D_i = L_i - \ell^*_i + \epsilon`,

    .. math::
        c = \Bigl(\sum_j \frac{z_j}{D_j}\Bigr)^{-1}, \qquad
        o_i = c\, z_i \log D_i, \qquad
        \sum_i \nabla o_i = \sum_i \frac{c\, z_i}{D_i} \nabla L_i ,

    with :math:`c` and :math:`z` constants: a convex combination of the task gradients (the
    coefficients :math:`c z_i / D_i` sum to 1). The optimizer clips the shared gradient to
    :attr:`max_norm` (1.0) before the step. **Weight step** (:meth:`post_step`, reached through
    ``opt.update_weighting(losses)`` with the losses :math:`L'` of the same batch re-evaluated
    after ``step()``):

    .. math::
        \delta = J_{\operatorname{softmax}}(\xi)^\top (\log D - \log D')
               = z \odot \bigl(\Delta - (z^\top \Delta)\mathbf 1\bigr),
        \quad \Delta = \log D - \log D',

    and :math:`\xi` takes one step of its own Adam (lr ``w_lr``, weight decay ``gamma``) on the
    gradient :math:`\delta` (the paper's plain form is
    :math:`\xi \leftarrow \xi - \beta(\delta + \gamma\xi)`). Tasks whose loss fell fastest lose
    weight.

    :attr:`weights` are :math:`z` (what the official code logs): the coefficients of the log
    objectives up to the common positive factor :math:`c`.

    Decisions (see docs/methods/weightings.md, "FAMO"): ``gamma`` = 0.001 (the paper and the
    repository's NYUv2 / QM9 / CelebA runs; Cityscapes used 0.01), ``w_lr`` = 0.025, Adam on
    :math:`\xi` as the official code, :math:`\epsilon` = 1e-8 added as in the code; a loss with
    :math:`D_i \le 0` (below its :math:`\ell^*_i`) raises ``ValueError``. A :meth:`post_step`
    compares with the losses of the last ``backward``; if no optimizer step happened since (a
    skipped non-finite batch) it warns and leaves :math:`\xi` unchanged; without a ``backward``
    since the last weight step it raises ``RuntimeError``. A loop that never calls
    ``opt.update_weighting`` leaves :math:`\xi = 0` (uniform weights) forever: the second ``step()``
    that follows a step with no weight step in between warns once (``UserWarning``, naming the fix);
    the once-flag is not in the state (a resumed process may warn once more).

    Partial labels (``supports_missing``): with the present tasks :math:`P` the model step uses
    :math:`z_P = \operatorname{softmax}(\xi_P)`, :math:`c = (\sum_{j \in P} z_j / D_j)^{-1}`
    and the objectives :math:`o_i = c z_i \log D_i`, :math:`i \in P` (:attr:`weights` is
    :math:`z_P`). The weight step must get the losses of the same tasks (``update_weighting``
    with the same tasks present, else ``ValueError`` and nothing changes); it computes
    :math:`\delta_P` from :math:`z_P` and steps only the coordinates in :math:`P` with a masked
    Adam: a missing coordinate keeps its value, its moments and its own step count (the bias
    corrections use a per-coordinate count, kept once a step has missed a task; before that the
    inner ``torch.optim.Adam`` runs as usual and its ``step`` is the count of every coordinate).
    Its formula is ``torch.optim.Adam``'s (L2 weight decay added to the gradient), so a
    coordinate's moments equal Adam run on the weight steps in which its task was present.

    State (:meth:`state_dict`): :math:`\xi`, its Adam state, the per-coordinate step counts
    (``None`` until a step missed a task), the pending :math:`\log D` and its present tasks.

    Args:
        num_tasks: :math:`K`.
        gamma: the weight decay :math:`\gamma` of :math:`\xi`'s Adam.
        w_lr: the learning rate :math:`\beta` of :math:`\xi`'s Adam.
        max_norm: the norm the shared gradient is clipped to, or ``None``.
        min_losses: :math:`\ell^*` (K values), default 0.
        eps: :math:`\epsilon`.
        dtype, device: of :math:`\xi` (it must be on the losses' device).
    """

    separable = True
    supports_missing = True

    def __init__(
        self,
        num_tasks: int,
        gamma: float = 0.001,
        w_lr: float = 0.025,
        max_norm: float | None = 1.0,
        *,
        min_losses: Sequence[float] | None = None,
        eps: float = FAMO_EPS,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        self.num_tasks = check_num_tasks(num_tasks)
        if not (math.isfinite(gamma) and gamma >= 0):
            raise ValueError(f"gamma must be finite and >= 0, got {gamma!r}")
        if not (math.isfinite(w_lr) and w_lr > 0):
            raise ValueError(f"w_lr must be finite and positive, got {w_lr!r}")
        if max_norm is not None and not max_norm > 0:
            raise ValueError(f"max_norm must be positive or None, got {max_norm!r}")
        if not eps > 0:
            raise ValueError(f"eps must be positive, got {eps!r}")
        self.gamma, self.w_lr, self.max_norm, self.eps = gamma, w_lr, max_norm, eps
        if min_losses is None:
            self._min_losses: tuple[float, ...] | None = None
            floor = [0.0] * num_tasks
        else:
            floor = [float(v) for v in min_losses]
            if len(floor) != num_tasks or not all(math.isfinite(v) for v in floor):
                raise ValueError(f"min_losses must be {num_tasks} finite numbers: {min_losses!r}")
            self._min_losses = tuple(floor)
        self.min_losses = torch.tensor(floor, dtype=torch.float64, device=device)
        self.logits = torch.zeros(num_tasks, dtype=dtype, device=device, requires_grad=True)
        self._adam = torch.optim.Adam([self.logits], lr=w_lr, weight_decay=gamma)
        self._log_d: Tensor | None = None  # log D of the last forward, awaiting its weight step
        self._present: Tensor | None = None  # that forward's present tasks (None: all)
        self._coord_steps: Tensor | None = None  # per-coordinate Adam steps once one was masked
        self._stepped = False  # whether the optimizer stepped since that forward
        self._missed = False  # a step went by without its weight step (update_weighting)
        self._warned = False

    def _index(self, losses: Tensor) -> Tensor | None:
        """The present task indices of this call (``None``: all), checked against K."""
        index = present_index(self, losses.numel())
        if index is not None and num_tasks(self, losses.numel()) != self.num_tasks:
            raise ValueError(
                f"{self!r} was built for {self.num_tasks} tasks, got {num_tasks(self, 0)}"
            )
        return index

    def _shifted(self, losses: Tensor, index: Tensor | None = None) -> Tensor:
        r""":math:`D = L - \ell^* + \epsilon` (of the tasks ``index``), checked positive."""
        if index is None:
            if losses.numel() != self.num_tasks:
                raise ValueError(
                    f"{self!r} was built for {self.num_tasks} tasks, got {losses.numel()}"
                )
            floor = self.min_losses
        else:
            floor = self.min_losses[index.to(self.min_losses.device)]
        d = losses - floor.to(losses) + self.eps
        if bool((d.detach() <= 0).any()):
            raise ValueError(
                f"{type(self).__name__} needs every loss above its min_losses value, got "
                f"{losses.detach().tolist()}"
            )
        return d

    def forward(self, losses: Tensor) -> Tensor:
        index = self._index(losses)
        d = self._shifted(losses, index)
        logits = self.logits.detach()
        if index is not None:
            logits = logits[index.to(logits.device)]
        z = torch.softmax(logits, dim=0).to(losses.dtype)
        c = 1.0 / (z / d.detach()).sum()
        log_d = torch.log(d)
        self._missed |= self._stepped  # the last step's weight step never came
        self._log_d, self._stepped = log_d.detach().clone(), False
        self._present = None if index is None else index.clone()
        self.weights = z
        return c * z * log_d

    def after_step(self) -> None:
        if self._missed and not self._warned:
            self._warned = True
            warn_user(
                f"{self!r}: step() ran again without opt.update_weighting(losses) after the "
                "previous step, so FAMO's task weights never move from uniform. After every "
                "opt.step(), re-evaluate the same batch's losses and pass them, under "
                "torch.no_grad(), to opt.update_weighting(losses)."
            )
        self._stepped = self._log_d is not None

    def post_step(self, losses: Tensor) -> None:
        if self._log_d is None:
            raise RuntimeError(
                f"{self!r}: update_weighting() needs a backward() and step() since the last "
                "weight step"
            )
        index = self._index(losses)
        if not _same_tasks(index, self._present):
            raise ValueError(
                f"{self!r}: update_weighting() got the losses of tasks {_names(index, self)} but "
                f"the last backward() had tasks {_names(self._present, self)}; re-evaluate the "
                "same batch and pass the losses of the same tasks (None for the same missing "
                "ones)"
            )
        if not self._stepped:
            warnings.warn(
                f"{self!r}: no optimizer step since the last backward(); the weight step is "
                "skipped",
                RuntimeWarning,
                stacklevel=3,
            )
            return
        delta = (self._log_d - torch.log(self._shifted(losses.detach(), index))).to(self.logits)
        if index is None and self._coord_steps is None:
            z = torch.softmax(self.logits.detach(), dim=0)
            self.logits.grad = z * (delta - (z * delta).sum())
            self._adam.step()
            self.logits.grad = None
        else:
            self._masked_adam_step(delta, index)
        self._log_d, self._stepped, self._present = None, False, None

    @torch.no_grad()
    def _masked_adam_step(self, delta: Tensor, index: Tensor | None) -> None:
        r"""One step of :math:`\xi`'s Adam on the coordinates ``index`` only (all if ``None``),
        with per-coordinate step counts (``torch.optim.Adam``'s formula)."""
        xi = self.logits
        idx = torch.arange(self.num_tasks) if index is None else index
        at = idx.to(xi.device)
        z = torch.softmax(xi.detach()[at], dim=0)
        grad = z * (delta - (z * delta).sum())
        group = self._adam.param_groups[0]
        beta1, beta2 = group["betas"]
        lr, eps, decay = group["lr"], group["eps"], group["weight_decay"]
        state = self._adam.state[xi]
        if not state:  # the first weight step: the state torch.optim.Adam would create
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(xi, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(xi, memory_format=torch.preserve_format)
        if self._coord_steps is None:
            done = float(state["step"])
            self._coord_steps = torch.full((self.num_tasks,), done, dtype=torch.float64)
        x = xi.detach()[at]
        if decay != 0:
            grad = grad + decay * x
        m = state["exp_avg"][at].lerp(grad, 1 - beta1)
        v = state["exp_avg_sq"][at] * beta2 + (1 - beta2) * grad * grad
        steps = self._coord_steps[idx] + 1
        step_size = (lr / (1 - beta1**steps)).to(x)
        root = (1 - beta2**steps).sqrt().to(x)
        x = x - step_size * m / (v.sqrt() / root + eps)
        xi[at] = x
        state["exp_avg"][at] = m
        state["exp_avg_sq"][at] = v
        self._coord_steps[idx] = steps

    def state_dict(self) -> dict[str, Any]:
        return {
            "logits": self.logits.detach().clone(),
            "adam": copy.deepcopy(self._adam.state_dict()),
            "log_d": None if self._log_d is None else self._log_d.clone(),
            "stepped": self._stepped,
            "present": None if self._present is None else self._present.clone(),
            "coord_steps": None if self._coord_steps is None else self._coord_steps.clone(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        state = dict(state)
        optional = ("present", "coord_steps")  # absent from states saved before partial labels
        mine = pop_state(state, ("logits", "adam", "log_d", "stepped", *optional), self, optional)
        steps = mine["coord_steps"]
        if steps is not None:
            steps = torch.as_tensor(steps, dtype=torch.float64).cpu().clone()
            if steps.shape != (self.num_tasks,):
                shape = tuple(steps.shape)
                raise ValueError(f"{self!r}: coord_steps of shape {shape} in the state")
        super().load_state_dict(state)
        logits = torch.as_tensor(mine["logits"])
        if logits.shape != self.logits.shape:
            raise ValueError(f"{self!r}: logits of shape {tuple(logits.shape)} in the state")
        with torch.no_grad():
            self.logits.copy_(logits)
        self._adam.load_state_dict(copy.deepcopy(mine["adam"]))
        log_d = mine["log_d"]
        self._log_d = None if log_d is None else log_d.to(self.logits.device, copy=True)
        self._stepped = bool(mine["stepped"])
        present = mine["present"]
        self._present = None if present is None else torch.as_tensor(present).long().cpu().clone()
        self._coord_steps = steps

    def __repr__(self) -> str:
        floor = "" if self._min_losses is None else f", min_losses={list(self._min_losses)!r}"
        return (
            f"{type(self).__name__}({self.num_tasks}, gamma={self.gamma!r}, w_lr={self.w_lr!r}, "
            f"max_norm={self.max_norm!r}{floor})"
        )


def _same_tasks(a: Tensor | None, b: Tensor | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return a.shape == b.shape and bool((a == b).all())


def _names(index: Tensor | None, famo: FAMO) -> str:
    return f"all {famo.num_tasks}" if index is None else str(index.tolist())
