r"""DiSparse's dynamic sparse training: Erdős–Rényi-kernel densities and the RigL-like
prune-and-grow schedule run from the optimizer's step hooks (see
:class:`~mtl_optim.pruning.DiSparse`)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor
from torch.utils.hooks import RemovableHandle

from .._gradient_info import GradientInfo
from ._masks import _check_density, _top
from ._scores import TaskScores

__all__ = ["DynamicSparse", "erk_densities"]


def erk_densities(shapes: dict[str, torch.Size], density: float, power: float = 0.9) -> dict:
    r"""Erdős–Rényi-kernel densities (RigL): :math:`d_l = \min(1, \epsilon\, r_l)` with
    :math:`r_l = (\sum_i n_i / \prod_i n_i)^{p}` over the dimensions :math:`n_i` of layer
    :math:`l`, and :math:`\epsilon` chosen so that :math:`\sum_l d_l |l| = d \sum_l |l|`;
    layers whose :math:`\epsilon r_l` exceeds 1 are made dense (the largest first) and
    :math:`\epsilon` re-solved. Returns ``{name: density}``."""
    if not 0 < density <= 1:
        raise ValueError(f"density must be in (0, 1], got {density!r}")
    sizes = {n: math.prod(s) for n, s in shapes.items()}
    raw = {n: (sum(s) / sizes[n]) ** power for n, s in shapes.items()}
    total = sum(sizes.values())
    dense: set[str] = set()
    while True:
        budget = density * total - sum(sizes[n] for n in dense)
        divisor = sum(raw[n] * sizes[n] for n in raw if n not in dense)
        eps = budget / divisor if divisor > 0 else 0.0
        over = [n for n in raw if n not in dense and eps * raw[n] > 1]
        if not over:
            break
        top = max(raw[n] for n in over)
        dense |= {n for n in over if raw[n] == top}
    return {n: 1.0 if n in dense else eps * raw[n] for n in raw}


class DynamicSparse(TaskScores):
    """Dynamic sparse training of :class:`~mtl_optim.pruning.DiSparse`. The attributes are set
    by the subclass's constructor."""

    _schedule: dict[str, Any] | None
    _targets: dict[str, int] | None
    _handles: list[RemovableHandle]
    _grad_handle: RemovableHandle | None
    _grads: list[dict[str, Tensor]] | None

    # --- dynamic sparse training ------------------------------------------------------------
    def dynamic(
        self,
        optimizer: Any,
        density: float,
        total_steps: int,
        *,
        every: int = 50,
        end: float = 0.75,
        prune_rate: float = 0.5,
        erk_power: float = 0.9,
        seed: int = 0,
    ) -> None:
        r"""Start dynamic sparse training: ERK densities, random masks, and the schedule.

        Call ``optimizer.step()`` as usual; DiSparse updates the masks from the optimizer's
        step hooks (after the step of every ``every``-th iteration), reading the per-task
        gradients of that iteration's backward through a gradient hook registered for that
        iteration only. Resuming: :meth:`load_state_dict`, then :meth:`attach`.

        Args:
            optimizer: the training ``MTLOptimizer``.
            density: the target global density in (0, 1].
            total_steps: the number of optimizer steps of the run.
            every: :math:`\Delta T`, steps between mask updates (official 50).
            end: the fraction of ``total_steps`` after which the masks are fixed (0.75).
            prune_rate: :math:`p`, the initial prune fraction, decayed by cosine (0.5).
            erk_power: the power of the ERK densities (0.9).
            seed: seeds the random initial masks.
        """
        _check_density(density)
        for name, value, low in (("total_steps", total_steps, 1), ("every", every, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        if not 0 < end <= 1:
            raise ValueError(f"end must be in (0, 1], got {end!r}")
        if not 0 <= prune_rate < 1:
            raise ValueError(f"prune_rate must be in [0, 1), got {prune_rate!r}")
        if not erk_power >= 0:
            raise ValueError(f"erk_power must be >= 0, got {erk_power!r}")
        shapes = {lyr.name: self.weight(lyr).shape for lyr in self.layers}
        dens = erk_densities(shapes, float(density), float(erk_power))
        self._targets = {
            lyr.name: min(lyr.numel, max(1, round(dens[lyr.name] * lyr.numel)))
            for lyr in self.layers
        }
        gen = torch.Generator().manual_seed(seed)
        masks = {}
        for lyr in self.layers:
            w = self.weight(lyr)
            keep = torch.randperm(lyr.numel, generator=gen)[: self._targets[lyr.name]]
            m = torch.zeros(lyr.numel, dtype=torch.bool)
            m[keep] = True
            masks[lyr.name] = m.view(w.shape).to(w.device)
        self.apply(masks)
        self._schedule = {
            "every": every,
            "end_step": max(1, int(end * total_steps)),
            "prune_rate": float(prune_rate),
            "step": 0,
            "finished": False,
        }
        self.attach(optimizer)

    def attach(self, optimizer: Any) -> None:
        """Register the dynamic schedule's step hooks on ``optimizer`` (after :meth:`dynamic`
        built the schedule or :meth:`load_state_dict` restored it)."""
        if self._schedule is None:
            raise ValueError("no dynamic schedule: call dynamic() (or load a state that has one)")
        self.detach()
        self._optimizer = optimizer
        self._handles = [
            optimizer.register_step_pre_hook(lambda *_: self._before_step()),
            optimizer.register_step_post_hook(lambda *_: self._after_step()),
        ]
        self._arm()

    def detach(self) -> None:
        """Remove the hooks that :meth:`attach` registered."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self._disarm()

    def _update_due(self, step: int) -> bool:
        sch = self._schedule
        return (
            sch is not None
            and not sch["finished"]
            and step % sch["every"] == 0
            and (step < sch["end_step"])
        )

    def _arm(self) -> None:
        """Before an update iteration: dense (straight-through) gradients and the hook."""
        sch = self._schedule
        if sch is None or not self._handles or not self._update_due(sch["step"] + 1):
            return
        for lyr in self.layers:
            pm = self._mask_module(lyr)
            if pm is not None:
                pm.straight_through = True
        if self._grad_handle is None:
            self._grad_handle = self._optimizer.register_gradient_hook(
                self._record, needs_jacobian=True
            )

    def _disarm(self) -> None:
        for lyr in self.layers:
            pm = self._mask_module(lyr)
            if pm is not None:
                pm.straight_through = False
        if self._grad_handle is not None:
            self._grad_handle.remove()
            self._grad_handle = None

    def _record(self, _: Any, info: GradientInfo) -> None:
        # accumulation: J and the heads' .grad hold the window so far; the last call wins
        self._grads = self._per_task_grads(info)

    @torch.no_grad()
    def _before_step(self) -> None:
        """The optimizer step moves only kept weights (the grads were dense for the grow)."""
        if self._grad_handle is None:
            return
        for lyr in self.layers:
            pm, w = self._mask_module(lyr), self.weight(lyr)
            if pm is not None and w.grad is not None:
                w.grad.mul_(pm.mask)

    @torch.no_grad()
    def _after_step(self) -> None:
        sch = self._schedule
        assert sch is not None
        if sch["finished"]:
            return
        sch["step"] += 1
        t = sch["step"]
        if t >= sch["end_step"]:
            self._final_prune()
            sch["finished"] = True
            self._disarm()
            return
        if self._update_due(t):
            if self._grads is None:  # this step saw no backward: update at the next one
                sch["step"] -= 1
                return
            self._disarm()
            self._update(t)
            self._grads = None
        self._arm()

    @torch.no_grad()
    def _update(self, t: int) -> None:
        sch, targets, grads = self._schedule, self._targets, self._grads
        assert sch is not None and targets is not None and grads is not None
        p_t = 0.5 * sch["prune_rate"] * (1 + math.cos(math.pi * t / sch["end_step"]))
        for lyr in self.layers:
            pm = self._mask_of(lyr)
            w = self.weight(lyr)
            old = pm.mask.clone()
            n = targets[lyr.name]
            keep = _top(torch.where(old, w.abs(), -1.0), round(n * (1 - p_t)))
            tasks = range(self.num_tasks) if lyr.task is None else [lyr.task]
            grow = torch.zeros_like(old)
            for k in tasks:
                score = torch.where(keep, -1.0, grads[k][lyr.name].to(w.dtype))
                grow |= _top(score, n - int(keep.sum()))
            new = keep | grow
            w.masked_fill_(new & ~old, 0)  # grown weights start at 0
            w.masked_fill_(~new, 0)
            pm.mask.copy_(new)

    @torch.no_grad()
    def _final_prune(self) -> None:
        assert self._targets is not None
        for lyr in self.layers:
            pm, w = self._mask_of(lyr), self.weight(lyr)
            new = _top(torch.where(pm.mask, w.abs(), -1.0), self._targets[lyr.name])
            w.masked_fill_(~new, 0)
            pm.mask.copy_(new)
