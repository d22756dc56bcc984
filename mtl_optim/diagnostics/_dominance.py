r"""Task dominance: which task drives each shared parameter's update (AdaTask paper's AU metric).

For each shared coordinate and task ``i`` let :math:`\Delta_i` be the part of the step
attributable to task ``i``, with :math:`\sum_i \Delta_i` the actual step. Then

.. math::
    AU_i \leftarrow \beta\, AU_i + (1-\beta)\, \Delta_i^2, \qquad
    rAU_i = AU_i / \textstyle\sum_j AU_j,

and a coordinate is *dominated* when some :math:`rAU_i` is close to 1. :math:`\Delta_i` is

* for :class:`~mtl_optim.AdaTask`: task ``i``'s own adaptive step (exact);
* for :class:`~mtl_optim.MTLOptimizer` with an Adam/AdamW base whose shared gradient is the sum
  of the per-task gradients (no aggregator, i.e. equal weighting, or ``Sum``; a loss weighting
  may scale the rows; no clipping):
  :math:`-\frac{\eta}{1-\beta_1^k}\, m_i / (\sqrt{v}/\sqrt{1-\beta_2^k} + \epsilon)` with the
  per-task first moments :math:`m_i` (tracked here; they sum to Adam's ``exp_avg``) and Adam's
  shared second moment :math:`v` — the decomposition under which one task's large gradients
  shrink every other task's step.

The decay :math:`\beta` defaults to the group's :math:`\beta_2` (RMSprop's ``alpha``, else 0.999);
the AdaTask paper does not state its constant.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from .._gradient_info import GradientInfo
from ..adatask import AdaTask
from ..aggregators import Sum
from ..engine import GroupSlice
from ..optimizer import MTLOptimizer

__all__ = ["TaskDominance"]


def _group_beta(group: dict[str, Any]) -> float:
    if "betas" in group:
        return float(group["betas"][1])
    return float(group.get("alpha", 0.999))


def unsupported(optimizer: Any) -> str | None:
    """Why :class:`TaskDominance` cannot attribute ``optimizer``'s updates, or ``None``."""
    if isinstance(optimizer, AdaTask):
        return None
    if not isinstance(optimizer, MTLOptimizer):
        return f"{type(optimizer).__name__} is not an mtl_optim optimizer"
    if not issubclass(optimizer.base_class, torch.optim.Adam):
        return f"the base {optimizer.base_class.__name__} is not Adam/AdamW"
    if not (optimizer.aggregator is None or isinstance(optimizer.aggregator, Sum)):
        return f"the aggregator {type(optimizer.aggregator).__name__} does not sum the tasks"
    if optimizer.route == "gramian":
        return "route='gramian' forms no per-task gradients"
    if optimizer.max_norm is not None:
        return "gradient clipping rescales the step after the per-task attribution"
    return None


class TaskDominance:
    """Accumulates the AU metric of ``optimizer``'s shared parameters after every ``step``.

    For an ``MTLOptimizer`` it registers a gradient hook that makes ``backward`` form the
    per-task gradients ``J`` (K reverse passes where equal weighting would need one) and keeps
    per-task first moments, ``(K, d)``, beside ``AU``.

    Args:
        optimizer: an ``AdaTask``, or an ``MTLOptimizer`` with base Adam/AdamW, no aggregator
            or ``aggregator=Sum()``, the Jacobian route and no gradient clipping.
        beta: EMA decay of AU; ``None`` takes each group's β2.
        names: optional ``(name, param)`` pairs, e.g. ``model.named_parameters()``, to label
            layers in :meth:`layers` and :meth:`plot`.
    """

    def __init__(
        self,
        optimizer: MTLOptimizer,
        beta: float | None = None,
        names: Iterable[tuple[str, Tensor]] | None = None,
    ) -> None:
        reason = unsupported(optimizer)
        if reason is not None:
            raise TypeError(
                "TaskDominance needs AdaTask, or MTLOptimizer with an Adam/AdamW base whose "
                "shared gradient is the sum of the per-task gradients (no aggregator or "
                f"aggregator=Sum(), route='jacobian', no clipping): {reason}"
            )
        if beta is not None and not 0.0 <= beta < 1.0:
            raise ValueError(f"beta must be in [0, 1), got {beta}")
        self.optimizer = optimizer
        self.beta = beta
        self._names = {id(p): n for n, p in names} if names is not None else {}
        self.au: Tensor | None = None  # (K, d), columns in the optimizer's shared order
        self._slices: dict[tuple[int, int], GroupSlice] = {}
        self._moments: Tensor | None = None
        self._jacobian: Tensor | None = None
        self._steps_before: float | None = None
        self._handles: list[Any] = []
        self._active = True
        if isinstance(optimizer, AdaTask):
            self._handles = [optimizer.add_observer(self._from_adatask)]
        else:
            self._handles = [
                optimizer.register_gradient_hook(self._capture, needs_jacobian=True),
                optimizer.register_step_pre_hook(lambda opt, *_: self._count_steps()),
                optimizer.register_step_post_hook(lambda opt, *_: self._adam_attribution()),
            ]

    def _from_adatask(self, s: GroupSlice, updates: Tensor) -> None:
        if self._active:
            self._observe(s, updates)

    def _observe(self, s: GroupSlice, updates: Tensor) -> None:
        self._slices[(s.group, s.start)] = s
        if self.au is None:
            k = updates.shape[0]
            d = sum(p.numel() for p in self.optimizer.shared_params)
            self.au = torch.zeros(k, d, dtype=updates.dtype, device=updates.device)
        beta = (
            self.beta
            if self.beta is not None
            else _group_beta(self.optimizer.param_groups[s.group])
        )
        self.au[:, s.start : s.stop].mul_(beta).addcmul_(updates, updates, value=1 - beta)

    def _capture(self, optimizer: MTLOptimizer, info: GradientInfo) -> None:
        """Gradient hook: the last ``J`` of the window (a reference; the step reads it)."""
        self._jacobian = info.jacobian
        self._slices = {(s.group, s.start): s for s in info.slices}

    def _adam_steps(self) -> float:
        """Adam's step count of the first shared parameter (0 before its first step)."""
        for s in self._slices.values():
            state = self.optimizer.state.get(s.params[0], {})
            return float(state["step"]) if "step" in state else 0.0
        return 0.0

    def _count_steps(self) -> None:
        self._steps_before = self._adam_steps()

    @torch.no_grad()
    def _adam_attribution(self) -> None:
        jac, self._jacobian = self._jacobian, None
        # a step skipped for a non-finite value later in the window leaves Adam's count alone
        if jac is None or self._adam_steps() == self._steps_before:
            return
        if self._moments is None:
            self._moments = torch.zeros_like(jac)
        for s in self._slices.values():
            group = self.optimizer.param_groups[s.group]
            beta1, beta2 = (float(b) for b in group["betas"])
            states = [self.optimizer.state[p] for p in s.params]
            step = float(states[0]["step"])
            v = torch.cat([st["exp_avg_sq"].reshape(-1) for st in states]).to(jac.dtype)
            m = self._moments[:, s.start : s.stop]
            m.lerp_(jac[:, s.start : s.stop], 1 - beta1)
            denom = (v.sqrt() / (1 - beta2**step) ** 0.5).add_(group["eps"])
            step_size = float(group["lr"]) / (1 - beta1**step)
            self._observe(s, m.mul(-step_size).div_(denom))

    def relative(self, eps: float = 1e-30) -> Tensor:
        """rAU, ``(K, d)``: each column sums to 1 (uniform where nothing moved yet)."""
        if self.au is None:
            raise RuntimeError("no step observed yet")
        total = self.au.sum(0, keepdim=True)
        k = self.au.shape[0]
        return torch.where(total > eps, self.au / total.clamp_min(eps), 1.0 / k)

    def layers(self, threshold: float = 0.9) -> dict[str, dict[str, Tensor]]:
        """Per shared parameter: mean rAU per task, and the share of coordinates each task
        dominates (``rAU > threshold``)."""
        rel = self.relative()
        out: dict[str, dict[str, Tensor]] = {}
        for s in sorted(self._slices.values(), key=lambda s: s.start):
            offset = s.start
            for p in s.params:
                block = rel[:, offset : offset + p.numel()]
                name = self._names.get(id(p), f"group{s.group}.{tuple(p.shape)}@{offset}")
                out[name] = {
                    "mean_rau": block.mean(1),
                    "dominated": (block > threshold).to(block.dtype).mean(1),
                }
                offset += p.numel()
        return out

    def remove(self) -> None:
        """Stop tracking; the recorded ``au`` stays readable. The optimizer loses the hooks:
        an ``MTLOptimizer`` no longer forms the per-task gradients they asked for, and
        ``AdaTask`` may run its fused kernels again."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._active = False
        self._jacobian = None

    def plot(self, ax: Any = None, task_names: list[str] | None = None) -> Any:
        """Heatmap of mean rAU (layers × tasks); returns the matplotlib figure."""
        import matplotlib.pyplot as plt  # optional dependency, imported on use

        layers = self.layers()
        data = torch.stack([v["mean_rau"] for v in layers.values()]).cpu().float().numpy()
        if ax is None:
            fig, ax = plt.subplots(figsize=(1.5 + 0.9 * data.shape[1], 1 + 0.35 * len(layers)))
        else:
            fig = ax.figure
        image = ax.imshow(data, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
        k = data.shape[1]
        ax.set_xticks(range(k), task_names or [f"task {i}" for i in range(k)])
        ax.set_yticks(range(len(layers)), list(layers))
        ax.set_title("task dominance (mean rAU)")
        fig.colorbar(image, ax=ax)
        fig.tight_layout()
        return fig
