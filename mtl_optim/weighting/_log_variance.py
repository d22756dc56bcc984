"""The learnable log-variances shared by Uncertainty weighting and its variants."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .._validation import check_num_tasks, positive
from ._base import Weighting


class _UncertaintyBase(Weighting):
    r"""Learnable log-variances :math:`s` (one per task or per group) and the shared options.

    Subclasses define the task-to-parameter map in :meth:`task_log_vars`.
    """

    separable = True

    #: The class default (Nash-MTL / IGB ``method-params-lr``); instances override it from ``lr``.
    param_group_options: dict[str, Any] = {"lr": 0.025}

    def __init__(
        self,
        num_tasks: int,
        num_params: int,
        *,
        init: float,
        lr: float | None,
        factors: Sequence[float] | None,
        clip: tuple[float, float] | None,
        dtype: torch.dtype,
        device: torch.device | str | None,
    ) -> None:
        self.num_tasks = check_num_tasks(num_tasks)
        init = float(init)
        if init != init or init in (float("inf"), float("-inf")):
            raise ValueError(f"init must be finite, got {init!r}")
        self.init = init
        self.lr = None if lr is None else positive("lr", lr)
        self.param_group_options = {} if lr is None else {"lr": lr}
        if clip is not None:
            lo, hi = (float(c) for c in clip)
            if not lo < hi:
                raise ValueError(f"clip must be (lo, hi) with lo < hi, got {clip!r}")
            clip = (lo, hi)
        self.clip = clip
        if factors is None:
            self._factors: tuple[float, ...] | None = None
            k = [2.0] * num_tasks
        else:
            k = [positive("every factor", float(f)) for f in factors]
            if len(k) != num_tasks:
                raise ValueError(f"factors has {len(k)} entries, expected {num_tasks}")
            self._factors = tuple(k)
        self.factors = torch.tensor(k, dtype=dtype, device=device)
        self.log_vars = nn.Parameter(torch.full((num_params,), init, dtype=dtype, device=device))

    def parameters(self) -> list[Tensor]:
        return [self.log_vars]

    def _project(self) -> None:
        """Projected-gradient clipping: put :math:`s` back into ``clip`` (in place)."""
        if self.clip is not None:
            with torch.no_grad():
                self.log_vars.clamp_(*self.clip)

    def task_log_vars(self) -> Tensor:
        """The ``(K,)`` log-variance used by each task."""
        return self.log_vars

    def _check(self, losses: Tensor) -> None:
        if losses.numel() != self.num_tasks:
            raise ValueError(f"{self!r} was built for {self.num_tasks} tasks, got {losses.numel()}")
        if losses.device != self.log_vars.device:
            raise ValueError(
                f"{type(self).__name__}: the losses are on {losses.device}, the log-variances on "
                f"{self.log_vars.device}; pass device= to the constructor"
            )

    def _uw_terms(self, losses: Tensor) -> tuple[Tensor, Tensor]:
        r"""``(e^{-s}/k, s)`` per task, after the projection onto ``clip``."""
        self._check(losses)
        self._project()
        s = self.task_log_vars()
        return torch.exp(-s) / self.factors, s

    def _options_repr(self) -> str:
        parts = [f"init={self.init!r}", f"lr={self.lr!r}"]
        if self._factors is not None:
            parts.append(f"factors={list(self._factors)!r}")
        if self.clip is not None:
            parts.append(f"clip={self.clip!r}")
        return ", ".join(parts)
