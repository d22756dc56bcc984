r"""MoCo: multi-objective gradient correction with tracked task gradients."""

from __future__ import annotations

import math
from typing import Any, Literal, cast, get_args

import torch
from torch import Tensor

from .._linalg import gramian
from ._base import Aggregator
from ._partial import mass_restrict, on, present_tasks, scatter
from ._simplex import simplex_projection

Normalization = Literal["none", "l2", "loss"]
LambdaUpdate = Literal["projection", "softmax"]
_NORMALIZATIONS = get_args(Normalization)
_LAMBDA_UPDATES = get_args(LambdaUpdate)
_NORM_EPS = 1e-8  # LibMTL's guard in g / (‖g‖ + eps)


class MoCo(Aggregator):
    r"""MoCo: MGDA on tracked (bias-corrected) gradients, with a single-step weight update.

    Fernando et al., *Mitigating Gradient Bias in Multi-objective Learning: A Provably
    Convergent Approach*, ICLR 2023, arXiv `2210.12624 <https://arxiv.org/abs/2210.12624>`_
    (Algorithm 1); defaults of LibMTL's ``MoCo`` (from the authors' code). At call
    :math:`t = 1, 2, \dots`, with the task gradients :math:`h_{t,i}` (rows of ``J``),

    .. math::
        y_{t,i} &= y_{t-1,i} - \beta_t\,(y_{t-1,i} - h_{t,i}),
            \qquad \beta_t = \beta / t^{\sigma_\beta}, \\
        \lambda_t &= \Pi_\Delta\big(\lambda_{t-1} - \gamma_t\,(Y_t Y_t^\top + \rho I)\,
            \lambda_{t-1}\big), \qquad \gamma_t = \gamma / t^{\sigma_\gamma}, \\
        d_t &= Y_t^\top \lambda_t ,

    from :math:`y_0 = 0` and :math:`\lambda_0 = \mathbf 1/K`, where :math:`Y_t` stacks the
    tracking variables :math:`y_{t,i}` and :math:`\Pi_\Delta` is the Euclidean projection onto
    the simplex. So the first call returns :math:`\beta\,J^\top\lambda_1` (raw gradients).
    :meth:`transform` returns the rows :math:`\lambda_{t,i}\,y_{t,i}` (they sum to
    :math:`d_t`); :meth:`forward` and :meth:`transform` each advance the state by one step.

    **Variants.** The defaults follow the paper's algorithm: raw gradients
    (``normalization="none"``) and the projection. LibMTL (the only public code) differs in
    two ways, both offered: it tracks :math:`h_{t,i} = L_i\, g_i / (\lVert g_i\rVert + 10^{-8})`
    with the current loss values :math:`L_i` (``normalization="loss"``; the optimizer hands the
    losses over, see :attr:`needs_losses`; a direct call needs :meth:`set_losses` first) and
    replaces :math:`\Pi_\Delta` by a softmax (``lambda_update="softmax"``), so
    ``MoCo(normalization="loss", lambda_update="softmax")`` is LibMTL's MoCo.
    ``normalization="l2"`` tracks :math:`g_i / (\lVert g_i\rVert + 10^{-8})`. The paper's
    projection of :math:`y` onto a bounded set is the identity in practice and is omitted.

    **State.** :math:`Y` (``K×d``, in ``J``'s dtype promoted to at least float32, on ``J``'s
    device: one more copy of ``J``), :math:`\lambda` (float64) and :math:`t`, all in
    :meth:`state_dict`; ``K`` and ``d`` are fixed by the first call. No host sync: the weight
    update runs on the float64 Gramian of :math:`Y` on its device.

    **Partial labels.** With only m of the K tasks present (the rows are theirs), only the
    present tasks' trackers :math:`y_i` move, each with its own step count: task :math:`i`'s
    tracking step is :math:`\beta / n_i^{\sigma_\beta}` with :math:`n_i` the number of calls in
    which it was present, so a task that was missing neither decays nor falls behind in its
    schedule (with every task always present, :math:`n_i = t`). The weights of the present
    tasks, rescaled to sum to 1, take one step of the m-task update (with the call counter
    :math:`t` in :math:`\gamma_t`), and are written back rescaled to their former total, so
    the missing tasks' weights are unchanged and :math:`\lambda` stays on the K-simplex
    (present weights that are all 0 are read as uniform and stay 0). The direction is that of
    the m-task step, :math:`\sum_{i\in P}\lambda'_i y_i` with :math:`\sum_{i\in P}
    \lambda'_i = 1`. ``normalization="loss"`` takes the present tasks' losses (the m values,
    or the K values read at the present tasks). The per-task counts enter :meth:`state_dict`
    under ``"task_steps"`` once a task has been missing.

    Args:
        beta: the tracking step :math:`\beta \in (0, 1]` (LibMTL default 0.5).
        beta_sigma: its decay exponent :math:`\sigma_\beta \ge 0` (0.5).
        gamma: the weight step :math:`\gamma > 0` (0.1).
        gamma_sigma: its decay exponent :math:`\sigma_\gamma \ge 0` (0.5).
        rho: the :math:`\ell_2` regularisation :math:`\rho \ge 0` of the weight update (0).
        normalization: ``"none"``, ``"l2"`` or ``"loss"`` (see above).
        lambda_update: ``"projection"`` (paper) or ``"softmax"`` (LibMTL).
    """

    def __init__(
        self,
        beta: float = 0.5,
        beta_sigma: float = 0.5,
        gamma: float = 0.1,
        gamma_sigma: float = 0.5,
        rho: float = 0.0,
        *,
        normalization: Normalization = "none",
        lambda_update: LambdaUpdate = "projection",
    ) -> None:
        if not 0 < beta <= 1:
            raise ValueError(f"beta must be in (0, 1], got {beta!r}")
        if not (gamma > 0 and math.isfinite(gamma)):
            raise ValueError(f"gamma must be a finite positive number, got {gamma!r}")
        for name, value in (("beta_sigma", beta_sigma), ("gamma_sigma", gamma_sigma), ("rho", rho)):
            if not (value >= 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a finite non-negative number, got {value!r}")
        if normalization not in _NORMALIZATIONS:
            raise ValueError(
                f"normalization must be one of {_NORMALIZATIONS}, got {normalization!r}"
            )
        if lambda_update not in _LAMBDA_UPDATES:
            raise ValueError(
                f"lambda_update must be one of {_LAMBDA_UPDATES}, got {lambda_update!r}"
            )
        self.beta = float(beta)
        self.beta_sigma = float(beta_sigma)
        self.gamma = float(gamma)
        self.gamma_sigma = float(gamma_sigma)
        self.rho = float(rho)
        self.normalization = normalization
        self.lambda_update = lambda_update
        self.needs_losses = normalization == "loss"
        self._losses: Tensor | None = None
        self._y: Tensor | None = None
        self._lambda: Tensor | None = None
        self._step = 0
        self._task_steps: Tensor | None = None  # (K,) int64 on the CPU, once a task was missing

    def set_losses(self, losses: Tensor) -> None:
        self._losses = losses.detach()

    def forward(self, jacobian: Tensor) -> Tensor:
        return self.transform(jacobian).sum(dim=0)

    def transform(self, jacobian: Tensor) -> Tensor:
        k, d = jacobian.shape
        dtype = torch.promote_types(jacobian.dtype, torch.float32)
        h = jacobian.detach().to(dtype)
        index, num_tasks = present_tasks(self, k)
        if self._y is None:
            full_y = torch.zeros(num_tasks, d, dtype=dtype, device=h.device)
            full_lam = torch.full(
                (num_tasks,), 1.0 / num_tasks, dtype=torch.float64, device=h.device
            )
        elif self._y.shape != (num_tasks, d):
            raise ValueError(
                f"MoCo was first called with J of shape {tuple(self._y.shape)}, now "
                f"{(num_tasks, d)}"
            )
        else:
            full_y, full_lam = self._y.to(h.device), cast(Tensor, self._lambda).to(h.device)
        if index is None:
            y, lam, mass = full_y, full_lam, None
        else:
            y = full_y.index_select(0, on(index, h.device))
            if self._y is None:  # a fresh m-task start: uniform weights, their share of K
                lam = torch.full((k,), 1.0 / k, dtype=torch.float64, device=h.device)
                mass = torch.tensor(k / num_tasks, dtype=torch.float64, device=h.device)
            else:
                lam, mass = mass_restrict(full_lam, index, 1.0)
        if self.normalization != "none":
            h = h / (h.norm(dim=1, keepdim=True) + _NORM_EPS)
        if self.normalization == "loss":
            losses = self._losses
            if index is not None and losses is not None and losses.shape == (num_tasks,):
                losses = losses[on(index, losses.device)]
            if losses is None or losses.shape != (k,):
                raise ValueError(
                    "MoCo(normalization='loss') needs this batch's K loss values: use it "
                    "through MTLOptimizer, or call set_losses(losses) first"
                )
            h = h * losses.to(h)[:, None]
        t = self._step + 1
        if self._task_steps is None and index is None:
            y = y - (self.beta / t**self.beta_sigma) * (y - h)
            task_steps = None
        else:
            steps = self._task_steps
            if steps is None:
                steps = torch.full((num_tasks,), self._step, dtype=torch.int64)
            counts = (steps if index is None else steps[index]) + 1
            betas = [self.beta / n**self.beta_sigma for n in counts.tolist()]
            if len(set(betas)) == 1:
                y = y - betas[0] * (y - h)
            else:
                y = y - torch.tensor(betas, dtype=y.dtype, device=y.device)[:, None] * (y - h)
            task_steps = steps + 1 if index is None else scatter(steps, index, counts)
        gamma_t = self.gamma / t**self.gamma_sigma
        lam = lam - gamma_t * (gramian(y) @ lam + self.rho * lam)
        lam = simplex_projection(lam) if self.lambda_update == "projection" else lam.softmax(0)
        if index is None:
            self._y, self._lambda = y, lam
        else:
            self._y = scatter(full_y, index, y)
            self._lambda = scatter(full_lam, index, cast(Tensor, mass) * lam)
        self._step, self._task_steps = t, task_steps
        return (lam.to(dtype)[:, None] * y).to(jacobian.dtype)

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "y": None if self._y is None else self._y.detach().clone(),
            "lambda": None if self._lambda is None else self._lambda.detach().clone(),
            "step": self._step,
        }
        if self._task_steps is not None:
            state["task_steps"] = self._task_steps.clone()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not {"y", "lambda", "step"} <= set(state) <= {"y", "lambda", "step", "task_steps"}:
            raise ValueError(
                "MoCo state must have the keys 'y', 'lambda' and 'step' (and 'task_steps' "
                f"once a task was missing), got {sorted(state)}"
            )
        y, lam = state["y"], state["lambda"]
        if (y is None) != (lam is None):
            raise ValueError("MoCo state: 'y' and 'lambda' must both be set or both be None")
        task_steps = state.get("task_steps")
        self._y = None if y is None else y.detach().clone()
        self._lambda = None if lam is None else lam.detach().to(torch.float64).clone()
        self._step = int(state["step"])
        self._task_steps = (
            None if task_steps is None else torch.as_tensor(task_steps, dtype=torch.int64).cpu()
        )

    def __repr__(self) -> str:
        return (
            f"MoCo(beta={self.beta}, beta_sigma={self.beta_sigma}, gamma={self.gamma}, "
            f"gamma_sigma={self.gamma_sigma}, rho={self.rho}, "
            f"normalization={self.normalization!r}, lambda_update={self.lambda_update!r})"
        )
