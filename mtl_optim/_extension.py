"""The documented extension surface of ``MTLOptimizer``.

A method that needs more than an aggregator or a weighting — per-task optimizer state
(:class:`~mtl_optim.AdaTask`), a different set of tasks each step
(:class:`~mtl_optim.grouping.RandomTaskGrouping`) — subclasses ``MTLOptimizer`` and overrides
these hooks, and nothing else. The pipeline (:mod:`mtl_optim._pipeline`) calls them at fixed
points of every ``backward`` and ``step``; the defaults give plain ``MTLOptimizer`` behaviour.
Task weights are recorded through the optimizer's :class:`~mtl_optim._guard.Guard`
(``self.guard.set_weights`` / ``fold_weights``), never by assigning ``last_weights``.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from .engine import GroupSlice

__all__ = ["Extensible"]


class Extensible:
    """The hooks (see the module docstring); mixed into ``MTLOptimizer``."""

    #: True for methods (AdaTask) that keep state per task and so always need ``J``.
    per_task_state = False
    _pipeline: Any
    _base: Any

    def check_param_group(self, group: dict[str, Any]) -> None:
        """Reject hyperparameters the method cannot honour (raise ``ValueError``)."""

    def task_objectives(self, losses: list[Tensor], values: Tensor) -> tuple[Tensor | None, Tensor]:
        """Pipeline stage 1: ``D = ∂o/∂L`` (or ``None``) and the scalar whose gradient the
        task-specific parameters receive (see :mod:`mtl_optim._pipeline`)."""
        return self._pipeline.objectives(losses, values)

    def combine(self, jacobian: Tensor) -> Tensor:
        """Pipeline stage 4: the shared direction from the ``(K, d)`` gradients (the aggregator's,
        or their sum), recording task weights through :attr:`guard`."""
        return self._pipeline.combine(jacobian)

    def shared_update(self, jacobian: Tensor) -> Tensor:
        """What the shared parameters' ``.grad`` holds after ``backward`` (default:
        :meth:`combine`; AdaTask also keeps the per-task rows for its update)."""
        return self.combine(jacobian)

    def apply_update(self) -> None:
        """Move the parameters (default: the base optimizer's ``step``)."""
        self._base.step()

    def window_reset(self) -> None:
        """Called when an accumulation window ends (``step``, ``zero_grad``, a load)."""

    def extra_state(self) -> dict[str, Any]:
        """Entries a subclass adds to ``state_dict()["mtl"]``."""
        return {}

    def check_extra_state(self, mtl: dict[str, Any], slices: list[GroupSlice]) -> None:
        """Validate a checkpoint's subclass entries against the shared layout ``slices``
        before anything is loaded (raise ``ValueError``)."""

    def load_extra_state(self, mtl: dict[str, Any]) -> None:
        """Load the entries :meth:`extra_state` wrote."""

    def shared_set_changing(self, shared: set[int]) -> dict[int, int] | None:
        """Before the engine adopts a new shared set (``id``s of parameters): returns each
        shared parameter's cohort (see :class:`~mtl_optim.engine.GroupSlice`), or ``None``."""
        return None

    def shared_set_changed(self) -> None:
        """After the engine adopted a new shared set."""
