"""What the optimizer's parts may use of the ``MTLOptimizer`` that owns them.

The guard, the pipeline, the checkpoint functions, the loop checks and the gradient hooks each
receive their optimizer typed as :class:`Host`, not as ``MTLOptimizer``: they depend on this
small surface, and the optimizer module depends on them, so the import graph has no circle.
"""

from __future__ import annotations

from typing import Any, Protocol

from torch import Tensor

__all__ = ["Host"]


class Host(Protocol):
    """The members of ``MTLOptimizer`` that its parts read or call."""

    aggregator: Any
    weighting: Any
    param_groups: list[dict[str, Any]]
    guard: Any
    per_task_state: bool
    base_class: type
    _engine: Any
    _scale: Tensor | None
    _base: Any
    _layout: Any
    _pipeline: Any
    _gradient_hooks: Any
    _backward_calls: int
    _warned_plain_backward: bool

    @property
    def route(self) -> str: ...

    @property
    def nonfinite(self) -> str: ...

    @property
    def last_weights(self) -> Tensor | None: ...

    @property
    def _weighting_needs_j(self) -> bool: ...

    @property
    def _hooks_need_jacobian(self) -> bool: ...

    def _new_window(self) -> None: ...

    def _replicas_(self) -> Any: ...

    def _param_layout(self) -> Any: ...

    def _clip(self) -> None: ...

    def shared_set_changing(self, shared: set[int]) -> dict[int, int] | None: ...

    def shared_set_changed(self) -> None: ...

    def task_objectives(self, losses: list[Tensor], values: Tensor) -> Any: ...

    def combine(self, jacobian: Tensor) -> Tensor: ...

    def shared_update(self, jacobian: Tensor) -> Tensor: ...

    def extra_state(self) -> dict[str, Any]: ...

    def check_extra_state(self, mtl: dict[str, Any], slices: list[Any]) -> None: ...

    def load_extra_state(self, mtl: dict[str, Any]) -> None: ...
