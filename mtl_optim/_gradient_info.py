"""What a gradient hook sees after each ``backward`` (``MTLOptimizer.register_gradient_hook``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from torch import Tensor

from ._host import Host
from .engine import GroupSlice, gramian

__all__ = ["GradientHook", "GradientInfo", "call_hooks"]


@dataclass(frozen=True)
class GradientInfo:
    r"""The per-task quantities one ``opt.backward(losses)`` produced, for hooks.

    Attributes:
        losses: ``(K,)`` detached loss values of this call (averaged across ranks).
        jacobian: ``(K, d)`` per-task gradients :math:`J_{i\cdot} = \nabla_{\theta_s} o_i` of the
            objectives with respect to the shared parameters, unscaled (mixed precision) and
            accumulated since the last ``step``/``zero_grad``; ``None`` where this call formed no
            ``J`` (the Gramian route, ``features=``, or a loop that needs no per-task gradient).
            Read-only: the next ``backward`` reuses the buffer.
        weights: the task weights the update applies (``opt.last_weights``), or ``None``.
        shared: the shared parameters, in ``J``'s column order.
        slices: the column range of ``J`` that each param group's shared parameters own.
        present: partial labels: the ``(K,)`` bool mask of the tasks that had a loss in this
            call (``None`` when every task had one). A missing task's entry of ``losses`` is 0
            and, unless an earlier micro-batch of the window had it, its row of ``jacobian``
            is zero.
    """

    losses: Tensor
    jacobian: Tensor | None
    weights: Tensor | None
    shared: tuple[Tensor, ...]
    slices: tuple[GroupSlice, ...]
    _gramian: Tensor | None = field(default=None, repr=False)
    present: Tensor | None = None

    @property
    def gramian(self) -> Tensor | None:
        r""":math:`G = J J^\top` (``K×K``, float64): given by the Gramian route, else formed from
        ``jacobian`` on first access (``None`` without either)."""
        if self._gramian is None and self.jacobian is not None:
            object.__setattr__(self, "_gramian", gramian(self.jacobian.detach()))
        return self._gramian

    def per_param(self, row: Tensor) -> list[Tensor]:
        """Split a ``(d,)`` vector or ``(K, d)`` matrix in ``J``'s column order into views shaped
        like each shared parameter (``(K, *p.shape)`` for a matrix)."""
        return [v for s in self.slices for v in s.split(row[..., s.start : s.stop])]


#: ``hook(optimizer, info)``, called at the end of every ``backward`` that was not skipped.
GradientHook = Callable[..., None]


def call_hooks(opt: Host, values: Tensor, features: bool) -> None:
    """Hand every registered gradient hook this ``backward``'s :class:`GradientInfo`."""
    if not opt._gradient_hooks or opt.guard.skipping:
        return
    jacobian = None if features else opt._engine.jacobian
    info = GradientInfo(
        losses=values,
        jacobian=None if jacobian is None else opt._pipeline.unscale(jacobian),
        weights=opt.last_weights,
        shared=tuple(opt._engine.shared or ()),
        slices=tuple(opt._engine.slices),
        _gramian=opt._pipeline.gram,
        present=opt._pipeline.batch_present,
    )
    for hook, _ in list(opt._gradient_hooks.values()):
        hook(opt, info)
