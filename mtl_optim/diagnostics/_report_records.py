r"""The recording half of :class:`~mtl_optim.diagnostics.ImbalanceReport`: the optimizer hooks,
the per-step buffer and the numbers derived from it (the page is drawn in ``_report``).

After every optimizer step the buffer gets one row of :math:`K^2 + 2K` float64 numbers: the task
losses, the task weights the update applied (NaN where the method sets none) and the Gramian
:math:`G = J J^\top` of the per-task gradients of the shared parameters; loss ratios, gradient
norms, cosines and conflict are computed from those rows when read.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, TypeVar

import torch
from torch import Tensor

from .._gradient_info import GradientInfo
from ..adatask import AdaTask
from ..optimizer import MTLOptimizer
from ._dominance import TaskDominance, unsupported

__all__ = ["DOMINATED", "ReportRecords"]

DOMINATED = 0.9  # rAU above this: the coordinate's update is one task's

_Records = TypeVar("_Records", bound="ReportRecords")


def _describe(optimizer: MTLOptimizer) -> str:
    """A short name of the method, e.g. ``AdaTask (Adam)`` or ``NashMTL (SGD)``."""
    parts = [type(m).__name__ for m in (optimizer.aggregator, optimizer.weighting) if m]
    if isinstance(optimizer, AdaTask):
        parts.insert(0, "AdaTask")
    if not parts:
        parts = ["equal weighting"]
    return f"{' + '.join(parts)} ({optimizer.base_class.__name__})"


class ReportRecords:
    """What :class:`~mtl_optim.diagnostics.ImbalanceReport` records: it attaches to the
    optimizer, keeps one row per step and derives the per-step numbers (see its docstring)."""

    def __init__(
        self,
        optimizer: MTLOptimizer,
        *,
        names: Iterable[tuple[str, Tensor]] | None = None,
        task_names: Iterable[str] | None = None,
        label: str | None = None,
        dominance: bool | None = None,
    ) -> None:
        if not isinstance(optimizer, MTLOptimizer):
            raise TypeError(
                "ImbalanceReport reads the per-task gradients of an mtl_optim optimizer "
                f"(MTLOptimizer or AdaTask), got {type(optimizer).__name__}"
            )
        if dominance not in (None, True, False):
            raise TypeError(f"dominance must be None, True or False, got {dominance!r}")
        reason = unsupported(optimizer)
        if dominance is True and reason is not None:
            raise TypeError(f"dominance=True, but task dominance cannot be tracked: {reason}")
        self.task_names = None if task_names is None else [str(n) for n in task_names]
        self.label = label if label is not None else _describe(optimizer)
        self.optimizer: MTLOptimizer | None = optimizer
        track = dominance if dominance is not None else reason is None
        self._tracker = TaskDominance(optimizer, names=names) if track else None
        #: Why there is no dominance heatmap (``None`` when it is tracked).
        self.dominance_note = None if track else (reason or "dominance=False")
        self._rows: Tensor | None = None  # (capacity, 2K + K²) float64: losses, weights, G
        self._n = 0
        self._k: int | None = None
        self._pending: GradientInfo | None = None
        self._layers: dict[str, Any] | None = None  # frozen by detach()
        self._handles = [
            optimizer.register_gradient_hook(self._on_backward, needs_jacobian=True),
            optimizer.register_step_pre_hook(lambda opt, *_: self._on_step()),
        ]

    # --- recording -----------------------------------------------------------------------
    def _on_backward(self, optimizer: MTLOptimizer, info: GradientInfo) -> None:
        if self._k is None:
            k = info.losses.numel()
            if self.task_names is not None and len(self.task_names) != k:
                raise ValueError(f"task_names has {len(self.task_names)} names for {k} tasks")
            self._k = k
        self._pending = info  # J is read at the step, once per accumulation window

    @torch.no_grad()
    def _on_step(self) -> None:
        info, self._pending = self._pending, None
        if info is None:
            return
        losses = info.losses.detach().reshape(-1).to(torch.float64)
        k = losses.numel()
        nan = torch.full((k,), math.nan, dtype=torch.float64, device=losses.device)
        weights = nan if info.weights is None else info.weights.detach().reshape(-1)
        gram = info.gramian
        gram = nan.new_full((k, k), math.nan) if gram is None else gram.detach()
        if info.present is not None:  # partial labels: no loss, and no gradient, is no record
            missing = ~info.present.to(losses.device)
            losses = losses.masked_fill(missing, math.nan)
            empty = missing & (gram.diagonal().to(losses.device) == 0)
            gram = gram.to(losses).masked_fill(empty[:, None] | empty[None, :], math.nan)
        row = torch.cat([losses, weights.to(losses), gram.reshape(-1).to(losses)])
        if self._rows is None or self._n == self._rows.shape[0]:
            grown = row.new_empty(max(64, 2 * self._n), row.numel())
            if self._rows is not None:
                grown[: self._n] = self._rows[: self._n]
            self._rows = grown
        self._rows[self._n] = row  # no host sync: stays on the device until read
        self._n += 1

    def detach(self: _Records) -> _Records:
        """Stop recording: remove the hooks, summarise dominance per layer and drop the
        optimizer, so the report no longer holds the model. Returns ``self``."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._pending = None
        if self._tracker is not None:
            self._layers = self._layer_summary(self._tracker)
            self._tracker.remove()
            self._tracker = None
        self.optimizer = None
        if self._rows is not None:
            self._rows = self._rows[: self._n].cpu().clone()
        return self

    def __getstate__(self) -> dict[str, Any]:
        """Pickling keeps the records, not the optimizer: a copy is a detached report."""
        state = dict(self.__dict__)
        if state["optimizer"] is not None:
            state["_layers"] = None if self._tracker is None else self._layer_summary(self._tracker)
        rows = state["_rows"]
        state.update(optimizer=None, _tracker=None, _handles=[], _pending=None)
        state["_rows"] = None if rows is None else rows[: self._n].cpu().clone()
        return state

    @staticmethod
    def _layer_summary(tracker: TaskDominance) -> dict[str, Any] | None:
        if tracker.au is None:
            return None
        layers = tracker.layers(DOMINATED)
        dominated = (tracker.relative() > DOMINATED).double().mean(1).cpu()
        return {
            "names": list(layers),
            "mean_rau": torch.stack([v["mean_rau"] for v in layers.values()]).double().cpu(),
            "dominated": dominated,
        }

    # --- the records ---------------------------------------------------------------------
    @property
    def steps(self) -> int:
        """How many steps were recorded."""
        return self._n

    @property
    def nbytes(self) -> int:
        """Bytes of the per-step records (grows with steps and K, never with the model)."""
        return 0 if self._rows is None else self._rows.numel() * self._rows.element_size()

    def _block(self, index: int) -> Tensor:
        k = self._k or 0
        if self._rows is None:
            return torch.empty(0, k, dtype=torch.float64)
        return self._rows[: self._n, index * k : (index + 1) * k].cpu()

    @property
    def losses(self) -> Tensor:
        """``(T, K)`` loss values, one row per step."""
        return self._block(0)

    @property
    def loss_ratios(self) -> Tensor:
        r"""``(T, K)``: :math:`L_i(t) / L_i(t_0)`, :math:`t_0` the first recorded step with task
        :math:`i`'s loss (partial labels: NaN where the task had none)."""
        losses = self.losses
        if not len(losses):
            return losses
        seen = ~torch.isnan(losses)
        first = seen.to(torch.int64).argmax(0)  # the first step with a loss (0 if none)
        return losses / losses.gather(0, first[None, :])

    @property
    def weights(self) -> Tensor:
        """``(T, K)`` task weights (``opt.last_weights``); NaN where the method set none."""
        return self._block(1)

    @property
    def gramians(self) -> Tensor:
        """``(T, K, K)`` Gramians of the per-task gradients (NaN where none was formed)."""
        k = self._k or 0
        if self._rows is None:
            return torch.empty(0, k, k, dtype=torch.float64)
        return self._rows[: self._n, 2 * k :].cpu().reshape(-1, k, k)

    @property
    def grad_norms(self) -> Tensor:
        r"""``(T, K)``: :math:`\lVert g_i \rVert = \sqrt{G_{ii}}`."""
        return self.gramians.diagonal(dim1=1, dim2=2).clamp_min(0).sqrt()

    @property
    def cosines(self) -> Tensor:
        """``(T, K, K)`` pairwise cosines (NaN where a gradient is zero)."""
        norms = self.grad_norms
        outer = norms[:, :, None] * norms[:, None, :]
        return torch.where(outer > 0, self.gramians / outer, math.nan)

    @property
    def conflict(self) -> Tensor:
        """``(T,)``: the fraction of task pairs with a negative cosine (NaN with K = 1 or no
        gradients)."""
        cos = self.cosines
        k = cos.shape[-1]
        i, j = torch.triu_indices(k, k, 1)
        pairs = cos[:, i, j]
        known = ~pairs.isnan()
        negative = ((pairs < 0) & known).sum(1).double()
        return torch.where(known.any(1), negative / known.sum(1).clamp_min(1), math.nan)

    def dominance(self) -> dict[str, Any] | None:
        """Per layer mean rAU, ``{"names": [L], "mean_rau": (L, K), "dominated": (K,)}``
        (``dominated``: the share of all shared coordinates with some task's rAU > 0.9), or
        ``None`` where dominance is not tracked or nothing stepped yet."""
        if self._tracker is not None:
            return self._layer_summary(self._tracker)
        return self._layers

    def summary(self) -> dict[str, Any]:
        """Headline numbers: per task the last loss ratio, the median gradient norm relative to
        the mean over tasks and the dominated share; the mean conflict."""
        if self._n == 0:
            raise RuntimeError("nothing recorded yet: the report fills at every opt.step()")
        norms = self.grad_norms
        relative = norms / norms.nanmean(1, keepdim=True)  # NaN: a task without a label
        dom = self.dominance()
        conflict = self.conflict
        return {
            "steps": self._n,
            "tasks": self._task_names(),
            "last_loss_ratio": _last_known(self.loss_ratios).tolist(),
            "median_norm_ratio": relative.nanmedian(0).values.tolist(),
            "mean_conflict": float(conflict.nanmean()) if len(conflict) else math.nan,
            "dominated": None if dom is None else dom["dominated"].tolist(),
        }

    def _task_names(self) -> list[str]:
        return self.task_names or [f"task {i}" for i in range(self._k or 0)]


def _last_known(values: Tensor) -> Tensor:
    """Each column's last non-NaN entry of a ``(T, K)`` tensor (NaN where there is none)."""
    known = ~torch.isnan(values)
    steps = torch.arange(values.shape[0], device=values.device)[:, None]
    last = torch.where(known, steps, -1).amax(0)
    picked = values.gather(0, last.clamp_min(0)[None, :])[0]
    return torch.where(last >= 0, picked, math.nan)
