"""The ``AdaTask`` optimizer class (see :mod:`mtl_optim.adatask` for the math)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Adagrad, Adam, AdamW, RMSprop

from .._backend import interpreted as _interpreted
from .._backend import triton_installed as _triton_installed
from ..aggregators import WeightedAggregator
from ..engine import GroupSlice
from ..optimizer import MTLOptimizer
from .rules import RULES, chunked_update, per_task_update

__all__ = ["AdaTask"]

_UNSUPPORTED_FLAGS = ("capturable", "differentiable")
# the mtl_optim.kernels function that fuses each rule
_KERNELS = {
    Adam: "adam_update",
    AdamW: "adam_update",
    RMSprop: "rmsprop_update",
    Adagrad: "adagrad_update",
}
_FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _kernel(name: str) -> Callable[..., None]:
    """A fused update of :mod:`mtl_optim.kernels`, imported on first use (Triton is an
    optional dependency)."""
    from ..kernels import adagrad_update, adam_update, rmsprop_update

    kernels = {
        "adam_update": adam_update,
        "rmsprop_update": rmsprop_update,
        "adagrad_update": adagrad_update,
    }
    return kernels[name]


class AdaTask(MTLOptimizer):
    """Task-wise adaptive state for Adam, AdamW, RMSprop or Adagrad (see module docstring).

    Same loop as :class:`~mtl_optim.MTLOptimizer`: ``opt.backward(losses); opt.step()``.
    Shared parameters' ``.grad`` holds :math:`\\sum_i g_i` after ``backward`` (for logging);
    the update itself reads the per-task gradients, so clipping ``.grad`` of shared parameters
    does not change it, and gradients from other ``backward`` calls on shared parameters are
    not used by the shared update.

    ``missing``: what a task passed as ``None`` to ``backward`` (no label in the batch) does
    to its per-task state: ``"freeze"`` (default) leaves its moments and its own step counter
    as they are, ``"zero"`` treats it as a zero gradient (see the module docstring).
    """

    per_task_state = True

    def __init__(
        self,
        params: Any,
        base: type[torch.optim.Optimizer] = Adam,
        *,
        fused: bool | None = None,
        missing: str = "freeze",
        **kwargs: Any,
    ) -> None:
        if base not in RULES:
            names = ", ".join(sorted(b.__name__ for b in RULES))
            got = getattr(base, "__name__", repr(base))
            raise TypeError(f"AdaTask supports base in {{{names}}}, got {got}")
        if fused is not None and not isinstance(fused, bool):
            raise TypeError(f"fused must be None, True or False, got {fused!r}")
        if missing not in ("freeze", "zero"):
            raise ValueError(f"missing must be 'freeze' or 'zero', got {missing!r}")
        self.fused = fused
        self.missing = missing
        # tasks present in the window of _task_grads (None: all), for missing="freeze"
        self._task_present: Tensor | None = None
        self._rule = RULES[base]
        self._kernel = _KERNELS[base]
        # per (group, cohort) of the engine's slices: "step" and (K, n) buffers
        self._task_state: dict[tuple[int, int], dict[str, Tensor]] = {}
        # per-task state of parameters that left the shared set (frozen), by id
        self._parked: dict[int, dict[str, Tensor]] = {}
        self._task_grads: Tensor | None = None
        # an OrderedDict: the RemovableHandle that add_observer returns keeps a weak reference
        self._observer_hooks: OrderedDict[int, Callable[[GroupSlice, Tensor], None]] = OrderedDict()
        super().__init__(params, base, **kwargs)

    def check_param_group(self, group: dict[str, Any]) -> None:
        for flag in _UNSUPPORTED_FLAGS:
            if group.get(flag):
                raise ValueError(f"AdaTask does not support {flag}=True")
        if self.fused:
            for p in group["params"]:
                self._check_fused(p)

    @staticmethod
    def _check_fused(p: Tensor) -> None:
        """``fused=True``: every parameter must be one the Triton kernels can update."""
        if p.dtype not in _FUSED_DTYPES:
            raise ValueError(
                f"AdaTask(fused=True) supports float32, bfloat16 and float16 parameters, got "
                f"{p.dtype}; use fused=False (or None)"
            )
        if not _triton_installed():
            raise RuntimeError(
                "AdaTask(fused=True) needs Triton: pip install 'mtl_optim[kernels]' (or use "
                "fused=None/False)"
            )
        if p.device.type != "cuda" and not _interpreted():
            raise RuntimeError(
                f"AdaTask(fused=True) needs CUDA tensors, got a parameter on {p.device} (set "
                "TRITON_INTERPRET=1 before importing mtl_optim.kernels to run the kernels on CPU "
                "through Triton's interpreter, e.g. in tests)"
            )

    def _fused_for(self, s: GroupSlice, grads: Tensor) -> bool:
        """Run group slice ``s`` through the Triton kernel (see the module docstring)?"""
        if self.fused is False or self._observer_hooks:
            return False
        if self.fused:
            return True
        return (
            grads.is_cuda
            and grads.dtype == torch.float32
            and all(p.is_cuda and p.dtype in _FUSED_DTYPES for p in s.params)
            and _triton_installed()
        )

    def shared_update(self, jacobian: Tensor) -> Tensor:
        agg = self.aggregator
        if agg is None:
            rows = jacobian
        elif isinstance(agg, WeightedAggregator):
            rows = self._pipeline.row_weights(agg, jacobian).unsqueeze(1) * jacobian
        else:
            rows = self._pipeline.transform(agg, jacobian)
        self._task_grads = rows
        self._task_present = self._pipeline.rows_present if self.missing == "freeze" else None
        return rows.sum(0)

    def zero_grad(self, set_to_none: bool = True) -> None:
        # The per-task gradients are AdaTask's .grad of the shared parameters: a second step()
        # without a new backward reuses them, as torch reuses .grad; zero_grad clears them.
        super().zero_grad(set_to_none)
        if self._task_grads is not None and not set_to_none:
            self._task_grads = torch.zeros_like(self._task_grads)
        elif set_to_none:
            self._task_grads = None
            self._task_present = None

    def shared_set_changing(self, shared: set[int]) -> dict[int, int]:
        """Before a new shared set: park the state of parameters that leave it, and give each
        group's newcomers a new cohort (fresh state, own step count); returning parameters get
        their parked state back in a cohort of their own."""
        old: dict[int, tuple[GroupSlice, int]] = {}
        for s in self._engine.slices:
            for p, offset in zip(s.params, _offsets(s)):
                old[id(p)] = (s, offset)
        for pid, (s, offset) in old.items():
            state = self._task_state.get((s.group, s.cohort))
            if pid not in shared and state is not None:
                n = s.params[[id(q) for q in s.params].index(pid)].numel()
                self._parked[pid] = _columns(state, offset, n)
        cohorts: dict[int, int] = {}
        self._relayout: dict[int, tuple[GroupSlice, int] | dict[str, Tensor]] = {}
        for gi, group in enumerate(self.param_groups):
            used = [s.cohort for s in self._engine.slices if s.group == gi]
            fresh = max(used, default=-1) + 1
            for p in group["params"]:
                pid = id(p)
                if pid not in shared or not p.requires_grad:
                    continue
                if pid in old:
                    cohorts[pid] = old[pid][0].cohort
                    self._relayout[pid] = old[pid]
                elif pid in self._parked:
                    fresh += 1
                    cohorts[pid] = fresh
                    self._relayout[pid] = self._parked.pop(pid)
                else:
                    cohorts[pid] = max(used, default=-1) + 1
        return cohorts

    def shared_set_changed(self) -> None:
        """Rebuild each slice's state from the kept columns (see ``shared_set_changing``)."""
        rebuilt: dict[tuple[int, int], dict[str, Tensor]] = {}
        for s in self._engine.slices:
            pieces = []
            for p in s.params:
                src = self._relayout.get(id(p))
                if isinstance(src, tuple):
                    old, offset = src
                    state = self._task_state.get((old.group, old.cohort))
                    src = None if state is None else _columns(state, offset, p.numel())
                pieces.append(src)
            if all(piece is None for piece in pieces):
                continue  # newcomers only: state starts fresh at the first step
            kept = [piece for piece in pieces if piece is not None]
            ages = {tuple(piece["step"].reshape(-1).tolist()) for piece in kept}
            if len(kept) < len(pieces) or len(ages) > 1:
                raise RuntimeError("internal error: a cohort mixes parameters of different ages")
            rebuilt[(s.group, s.cohort)] = {
                key: kept[0]["step"].clone()
                if key == "step"
                else torch.cat([piece[key] for piece in kept], dim=1)
                for key in kept[0]
            }
        self._task_state = rebuilt
        self._relayout = {}
        self._task_grads = None

    def apply_update(self) -> None:
        shared = self._engine.shared or []
        saved = [p.grad for p in shared]
        for p in shared:  # the base updates the task-specific parameters only
            p.grad = None
        try:
            self._base.step()
        finally:
            for p, g in zip(shared, saved):
                p.grad = g
        rows = self._task_grads
        if rows is None:  # no backward reached the shared parameters in this window
            return
        k = rows.shape[0]
        for s in self._engine.slices:
            group = self.param_groups[s.group]
            state = self._task_state.setdefault(
                (s.group, s.cohort), {"step": torch.zeros((), dtype=torch.float32)}
            )
            grads = rows[:, s.start : s.stop]
            if self._task_present is not None or state["step"].dim() == 1:
                # partial labels: each task's own counter, missing tasks frozen
                steps = per_task_update(
                    self._rule, group, grads, s.params, state, self._task_present
                )
                for observe in list(self._observer_hooks.values()):
                    observe(s, steps)
                continue
            if self._fused_for(s, grads):
                _kernel(self._kernel)(group, grads, s.params, state)
                continue
            if self._observer_hooks or not all(p.is_contiguous() for p in s.params):
                steps, alpha = self._rule(group, grads, s.params, state, k)
                update = steps.sum(0)
                views = [v.to(p.dtype) for v, p in zip(s.split(update), s.params)]
                torch._foreach_add_(list(s.params), views, alpha=alpha)
                for observe in list(self._observer_hooks.values()):
                    observe(s, steps if alpha == 1.0 else steps * alpha)
                continue
            chunked_update(self._rule, group, grads, s.params, state, k)

    def __repr__(self) -> str:
        head, _, base = super().__repr__().partition("\n")
        return f"{head[:-1]}, fused={self.fused})\n{base}"

    def task_state(self, param: Tensor) -> dict[str, Tensor]:
        """Per-task state of one shared parameter: ``(K, *param.shape)`` views and ``step``."""
        for s in self._engine.slices:
            for p, offset in zip(s.params, _offsets(s)):
                if p is param:
                    state = self._task_state.get((s.group, s.cohort), {})
                    k, n = self._engine.num_tasks, p.numel()
                    assert k is not None
                    return {
                        key: v if key == "step" else v[:, offset : offset + n].view(k, *p.shape)
                        for key, v in state.items()
                    }
        raise KeyError("not a shared parameter of this optimizer (or no backward yet)")

    def extra_state(self) -> dict[str, Any]:
        # cohort 0 (every slice, unless the trainable set changed) is keyed by the group index
        index = {id(p): i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}
        return {
            "task_state": {
                (gi if c == 0 else (gi, c)): dict(st) for (gi, c), st in self._task_state.items()
            },
            "parked": {index[pid]: dict(st) for pid, st in self._parked.items() if pid in index},
        }

    def check_extra_state(self, mtl: dict[str, Any], slices: list[GroupSlice]) -> None:
        k = mtl["num_tasks"]
        widths = {(s.group, s.cohort): s.stop - s.start for s in slices}
        for key, st in mtl.get("task_state", {}).items():
            where = key if isinstance(key, tuple) else (key, 0)
            for name, v in st.items():
                if name != "step" and tuple(v.shape) != (k, widths.get(where)):
                    raise ValueError(
                        f"task state {name!r} of group {where[0]} has shape {tuple(v.shape)}, "
                        f"expected ({k}, {widths.get(where)})"
                    )

    def load_extra_state(self, mtl: dict[str, Any]) -> None:
        flat = [p for g in self.param_groups for p in g["params"]]

        def copy(st: dict[str, Tensor], device: torch.device) -> dict[str, Tensor]:
            return {
                key: v.clone() if key == "step" else v.to(device=device, copy=True)
                for key, v in st.items()
            }

        loaded: dict[tuple[int, int], dict[str, Tensor]] = {}
        for key, st in mtl.get("task_state", {}).items():
            gi, cohort = key if isinstance(key, tuple) else (key, 0)
            loaded[(gi, cohort)] = copy(st, self.param_groups[gi]["params"][0].device)
        self._task_state = loaded
        self._parked = {
            id(flat[i]): copy(st, flat[i].device) for i, st in mtl.get("parked", {}).items()
        }
        self._task_grads = None

    def add_observer(
        self, observer: Callable[[GroupSlice, Tensor], None]
    ) -> torch.utils.hooks.RemovableHandle:
        """Call ``observer(slice, U)`` after each step with the ``(K, n)`` per-task updates.

        While an observer is attached the torch rules run (only they form the per-task steps);
        ``handle.remove()`` detaches it and lets the fused kernels run again."""
        handle = torch.utils.hooks.RemovableHandle(self._observer_hooks)
        self._observer_hooks[handle.id] = observer
        return handle


def _columns(state: dict[str, Tensor], offset: int, n: int) -> dict[str, Tensor]:
    """Copies of columns ``[offset, offset + n)`` of a slice's per-task state, with its step."""
    return {
        key: v.clone() if key == "step" else v[:, offset : offset + n].clone()
        for key, v in state.items()
    }


def _offsets(s: GroupSlice) -> list[int]:
    out, offset = [], 0
    for p in s.params:
        out.append(offset)
        offset += p.numel()
    return out
