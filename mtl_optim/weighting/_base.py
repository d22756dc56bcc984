"""Base class of the loss weightings.

A weighting maps the K task losses to the K per-task objectives that the engine
differentiates, e.g. ``w_i * L_i``. It sees losses only, never gradients.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import Tensor

from .._method import Method, clone_state


class Weighting(Method, ABC):
    """``W(losses) -> objectives``, both ``(K,)`` tensors; ``W.weights`` the last weights."""

    weights: Tensor | None = None
    #: If set, the optimizer clips the shared parameters' gradient to this norm before each
    #: step (FAMO's official step does).
    max_norm: float | None = None
    #: True for weightings that look at the per-task gradients (GradNorm, DB-MTL): the
    #: optimizer then computes ``J`` (of the objectives) and passes it through :meth:`observe`.
    needs_jacobian: bool = False
    #: True when objective ``o_i`` depends on loss ``L_i`` only (``∂o/∂L`` is diagonal); the
    #: optimizer then gets ``∂o/∂L`` from one reverse pass instead of K.
    separable: bool = False
    #: True when the weighting can form weights over the tasks present in a batch (partial
    #: labels: ``opt.backward`` got ``None`` for some tasks). The optimizer then calls
    #: :meth:`forward` (and :meth:`observe`, :meth:`post_step`) on the ``(m,)`` losses (``(m, d)``
    #: gradients) of the present tasks, with :attr:`present` set, and expects ``(m,)``
    #: objectives; :attr:`weights` may then hold ``m`` entries (the optimizer reports zeros for
    #: the missing tasks). A weighting that cannot leaves this False, and a batch with a
    #: missing task raises ``ValueError`` before anything changes.
    supports_missing: bool = False
    #: While the optimizer calls the weighting with the present tasks only: their ``(m,)``
    #: indices among the K tasks, increasing (a CPU ``int64`` tensor). ``None`` when every
    #: task is present.
    present: Tensor | None = None
    #: K, the number of tasks, while :attr:`present` is set (to size state that has one entry
    #: per task when the first call already misses a task); ``None`` otherwise.
    all_tasks: int | None = None
    #: The optimizer snapshots :meth:`state_dict` at the start of each step's window and
    #: restores it when the step is skipped (non-finite values). A method whose state changes
    #: only in :meth:`after_step` may set this to False to save the copy.
    rollback: bool = True
    #: Epoch-based weightings (DWA, IGB, IGB-RL, GradNorm and STCH while they wait for their
    #: first epoch, the grouped/constrained uncertainty weightings) see their epochs only through
    #: ``opt.end_epoch()``; a loop that never calls it leaves them at their first-epoch weights
    #: forever. They warn once (``UserWarning``) when this many batches (``opt.backward`` calls)
    #: pass without ``opt.end_epoch()``: far longer than an epoch of the usual multi-task
    #: benchmarks (a few hundred to about a thousand batches). Raise it for longer epochs, or
    #: set it to ``None`` to turn the check off (on the instance or the class).
    end_epoch_warning_after: int | None = 10_000
    #: Options of the param group that ``MTLOptimizer`` creates for :meth:`parameters`
    #: (e.g. ``{"lr": 0.025}``); the base optimizer's defaults fill the rest.
    param_group_options: dict[str, Any] = {}

    def parameters(self) -> list[Tensor]:
        """Learnable parameters; ``MTLOptimizer`` registers them in their own param group."""
        return []

    def state_dict(self) -> dict[str, Any]:
        params = self.parameters()
        return {"parameters": [p.detach().clone() for p in params]} if params else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        state = dict(state)
        saved = state.pop("parameters", [])
        params = self.parameters()
        if len(saved) != len(params):
            raise ValueError(f"{self!r} has {len(params)} parameters, the state has {len(saved)}")
        with torch.no_grad():
            for p, v in zip(params, saved):
                p.copy_(v)
        super().load_state_dict(state)

    def __call__(self, losses: Tensor) -> Tensor:
        if losses.dim() != 1:
            raise ValueError(f"expected a (K,) tensor of losses, got shape {tuple(losses.shape)}")
        return self.forward(losses)

    @abstractmethod
    def forward(self, losses: Tensor) -> Tensor:
        """The per-task objectives; must keep the autograd graph of ``losses``."""

    def end_epoch(self) -> None:  # noqa: B027 - a hook, a no-op unless epoch-based
        """Called by ``MTLOptimizer.end_epoch()``; epoch-based weightings override it."""

    # --- hooks the optimizer calls; all no-ops unless a method needs them ------------------
    def snapshot(self) -> Any:
        """What :meth:`restore` needs to undo the next steps' state changes (for a skipped
        step; see :attr:`rollback`). Default: a copy of :meth:`state_dict`."""
        return clone_state(self.state_dict())

    def restore(self, snapshot: Any) -> None:
        """Return to the state :meth:`snapshot` saw."""
        self.load_state_dict(snapshot)

    def attach(self, optimizer: Any) -> None:  # noqa: B027
        """Called once by the ``MTLOptimizer`` that owns this weighting (e.g. to read its lr)."""

    def observe(self, jacobian: Tensor) -> Tensor:
        r"""See the per-task gradients of the objectives, ``J_{i\cdot} = \nabla o_i``.

        Called only when :attr:`needs_jacobian` is true, on the gradients of the shared
        parameters (or at ``features``), after every ``backward``. Returns the ``(K, d)`` matrix
        that the aggregator combines (default: ``J`` unchanged); a method may set gradients of
        its own learnable parameters here (GradNorm).
        """
        return jacobian

    def after_step(self) -> None:  # noqa: B027
        """Called after every parameter update the optimizer really made (not after skips)."""

    def post_step(self, losses: Tensor) -> None:  # noqa: B027
        """The losses ``(K,)`` of the same batch re-evaluated after the step (FAMO's update).

        Reached through ``MTLOptimizer.update_weighting(losses)``.
        """
