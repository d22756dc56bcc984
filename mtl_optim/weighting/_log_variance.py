"""The learnable log-variances shared by Uncertainty weighting and its variants."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .._validation import check_num_tasks, positive
from ._base import Weighting
from ._present import num_tasks, present_index


class _UncertaintyBase(Weighting):
    r"""Learnable log-variances :math:`s` (one per task or per group) and the shared options.

    Every :math:`s_j` is its own 0-d ``nn.Parameter`` (:meth:`parameters`), so that with partial
    labels a parameter whose tasks are all missing stays out of the objectives' graph: its
    ``.grad`` stays ``None`` and the base optimizer leaves it and its state alone (no momentum,
    no weight decay). :attr:`log_vars` is their values as one tensor.

    Subclasses define the task-to-parameter map in :meth:`task_params`.
    """

    separable = True
    supports_missing = True

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
        self._log_vars = [
            nn.Parameter(torch.tensor(init, dtype=dtype, device=device)) for _ in range(num_params)
        ]

    def parameters(self) -> list[Tensor]:
        """The log-variances, one 0-d parameter each (per task, or per group)."""
        return list(self._log_vars)

    @property
    def log_vars(self) -> Tensor:
        """The values of the log-variances as one ``(n,)`` tensor: a detached copy (changing it
        in place does not reach the parameters; assign to ``log_vars`` instead)."""
        return torch.stack([p.detach() for p in self._log_vars])

    @log_vars.setter
    def log_vars(self, values: Tensor) -> None:
        values = torch.as_tensor(values)
        if values.shape != (len(self._log_vars),):
            raise ValueError(
                f"{self!r} has {len(self._log_vars)} log-variances, got shape {tuple(values.shape)}"
            )
        with torch.no_grad():
            for p, v in zip(self._log_vars, values):
                p.copy_(v)

    def _project(self) -> None:
        """Projected-gradient clipping: put :math:`s` back into ``clip`` (in place)."""
        if self.clip is not None:
            with torch.no_grad():
                for p in self._log_vars:
                    p.clamp_(*self.clip)

    def task_params(self, index: Tensor | None = None) -> list[Tensor]:
        """The parameter of each task (of the tasks ``index``, if given)."""
        tasks = range(self.num_tasks) if index is None else index.tolist()
        return [self._log_vars[i] for i in tasks]

    def task_log_vars(self, index: Tensor | None = None) -> Tensor:
        """The ``(K,)`` log-variance used by each task (``(m,)``: of the tasks ``index``)."""
        return torch.stack(self.task_params(index))

    def _check(self, losses: Tensor) -> Tensor | None:
        """Check the losses; the present task indices (``None``: every task)."""
        index = present_index(self, losses.numel())
        k = losses.numel() if index is None else num_tasks(self, losses.numel())
        if k != self.num_tasks:
            raise ValueError(f"{self!r} was built for {self.num_tasks} tasks, got {k}")
        device = self._log_vars[0].device
        if losses.device != device:
            raise ValueError(
                f"{type(self).__name__}: the losses are on {losses.device}, the log-variances on "
                f"{device}; pass device= to the constructor"
            )
        return index

    def _uw_terms(self, losses: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        r"""``(e^{-s}/k, s, index)`` per task (per present task), after the projection onto
        ``clip``. Only the parameters of present tasks enter the graph."""
        index = self._check(losses)
        self._project()
        s = self.task_log_vars(index)
        factors = self.factors if index is None else self.factors[index.to(self.factors.device)]
        return torch.exp(-s) / factors, s, index

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state.get("parameters")
        n = len(self._log_vars)
        if (
            isinstance(saved, list | tuple)
            and len(saved) == 1
            and torch.as_tensor(saved[0]).shape == (n,)
        ):  # saved by an earlier version, with one (n,) tensor: one value per parameter
            state = {**state, "parameters": list(torch.as_tensor(saved[0]).unbind())}
        super().load_state_dict(state)

    def _options_repr(self) -> str:
        parts = [f"init={self.init!r}", f"lr={self.lr!r}"]
        if self._factors is not None:
            parts.append(f"factors={list(self._factors)!r}")
        if self.clip is not None:
            parts.append(f"clip={self.clip!r}")
        return ", ".join(parts)
