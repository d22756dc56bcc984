"""``MTLOptimizer``: any torch optimizer, driven by a multi-task gradient method."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence
from typing import Any, Literal

import torch
from torch import Tensor
from torch.optim import Optimizer

from ._checkpoint import load as _load_checkpoint
from ._checkpoint import save as _save_checkpoint
from ._distributed import Replicas
from ._extension import Extensible
from ._gradient_info import GradientHook, call_hooks
from ._guard import Guard, NonFiniteError
from ._loop import check_plain_backward, needs_closure, step_with_closure
from ._missing import Batch, post_step, refuse_unsupported, warn_empty
from ._pipeline import Pipeline
from ._sharded import make_engine
from .aggregators import Aggregator, GramianWeightedAggregator
from .engine import GroupSlice, as_losses
from .weighting import Weighting

__all__ = ["MTLOptimizer", "NonFiniteError"]


_DELEGATED = ("param_groups", "state", "defaults")


def _delegate(name: str) -> property:
    def get(self: MTLOptimizer) -> Any:
        base = self.__dict__.get("_base")
        return self.__dict__[f"_pre_{name}"] if base is None else getattr(base, name)

    def set_(self: MTLOptimizer, value: Any) -> None:
        base = self.__dict__.get("_base")
        if base is None:
            self.__dict__[f"_pre_{name}"] = value
        else:
            setattr(base, name, value)

    return property(get, set_)


class MTLOptimizer(Extensible, Optimizer):
    r"""Wrap any ``torch.optim.Optimizer`` so that it trains one model on K task losses.

    ``opt.backward(losses)`` replaces ``sum(losses).backward()``:

    * a ``weighting`` ``W`` first maps the losses to per-task objectives
      :math:`o = W(L)` (default: :math:`o = L`);
    * task-specific parameters receive :math:`\nabla \sum_i o_i` in one reverse pass;
    * shared parameters receive the ``aggregator``'s combination
      :math:`A(J)` of the per-task gradients :math:`J_{i\cdot} = \nabla_{\theta_s} o_i`.
      Without an aggregator no per-task gradient is computed and the shared parameters get
      :math:`\nabla_{\theta_s}\sum_i o_i` from the same single pass.

    Then ``opt.step()`` clips the shared gradient if the aggregator or weighting sets
    ``max_norm`` and lets ``base`` update every parameter.

    **Accumulation.** Per-task gradients accumulate over several ``backward`` calls before a
    ``step`` and are combined on the accumulated matrix, so a method that is nonlinear in
    :math:`J` sees the gradients of the whole accumulated batch; each micro-batch enters
    weighted by its own :math:`\partial o/\partial L`, and the aggregator's state and the
    weighting's random draws are rewound to the window start before every call, so they
    advance once per step. Gradients already present on shared parameters when a window starts
    (e.g. from a regulariser's own ``backward``) are kept and added to.

    **Distributed training.** With ``torch.distributed`` initialised and more than one rank,
    every rank averages the loss values, the per-task gradient matrix (one all-reduce; the
    Gramian in the Gramian route, the summed Gramian of representation gradients with
    ``features=``) and the task-specific gradients, and takes the method state (RNG, learned
    agents) from rank 0 at the first ``backward``, so all ranks compute the same update. With
    ``DistributedDataParallel``, run forward and ``backward`` under ``model.no_sync()``.

    **Partial labels.** ``opt.backward([l0, None, l2])``: ``None`` marks a task without a label
    in the batch. It leaves the objective; the weighting and the aggregator work over the
    present tasks only (weights 0 for the others, no rescaling by :math:`K/m`), its head keeps
    ``.grad = None`` and no state of it moves (see docs/methods/partial-labels.md).

    **Mixed precision.** ``opt.backward(losses, scaler=grad_scaler)``, then
    ``scaler.step(opt); scaler.update()``: methods see unscaled gradients and losses.

    Args:
        params: parameters or param-group dicts, as for any torch optimizer. A group may carry
            ``"shared": True`` to mark its parameters as shared.
        base: the ``torch.optim.Optimizer`` subclass that performs the update.
        aggregator: a :mod:`mtl_optim.aggregators` instance, or ``None``.
        weighting: a :mod:`mtl_optim.weighting` instance, or ``None``.
        shared: the shared parameters. ``None`` detects them at the first ``backward`` (and
            again when ``requires_grad`` flags or param groups change): a parameter that two
            or more losses reach in the autograd graph is shared; where the graph joins the
            tasks (stacked losses, a compiled model) the per-task gradients settle it once.
        route: ``"jacobian"`` stores the ``(K, d)`` per-task gradients ``J`` and combines
            them. ``"gramian"`` (Gramian aggregators only) never stores ``J``: Linear layers give
            :math:`\langle \delta_i, XX^\top\delta_j\rangle` from inputs and output gradients,
            and the weights combine the kept output gradients without a second backward (each
            ``backward`` of a window is combined on its own). ``"auto"`` (default) takes the
            Gramian route where it is legal (a Gramian aggregator, no per-task state or ``J``
            consumer, one process, a window's first ``backward``) and cheaper, or ``J`` would
            not fit a quarter of the free memory; else the Jacobian route, bit for bit (the
            crossover: docs/design.md, "Routes").
        process_group: the ``torch.distributed`` group to average over; ``None`` = the default
            group when one is initialised (see "Distributed training" above).
        nonfinite: ``"skip"`` (default) turns the next ``step`` into a no-op with a warning when
            a loss or gradient is NaN/Inf, leaving parameters and all state untouched;
            ``"raise"`` raises :class:`NonFiniteError` from ``backward``.
        **base_kwargs: hyperparameters for ``base`` (``lr``, ``betas``, ...).
    """

    param_groups = _delegate("param_groups")
    state = _delegate("state")
    defaults = _delegate("defaults")

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        base: type[Optimizer] = torch.optim.Adam,
        *,
        aggregator: Aggregator | None = None,
        weighting: Weighting | None = None,
        shared: Iterable[Tensor] | None = None,
        nonfinite: Literal["skip", "raise"] = "skip",
        route: Literal["auto", "jacobian", "gramian"] = "auto",
        process_group: Any = None,
        **base_kwargs: Any,
    ) -> None:
        if not (isinstance(base, type) and issubclass(base, Optimizer)):
            raise TypeError(f"base must be a torch.optim.Optimizer subclass, got {base!r}")
        if issubclass(base, MTLOptimizer):
            raise TypeError("base must be a plain torch optimizer, not an MTLOptimizer")
        if aggregator is not None and not isinstance(aggregator, Aggregator):
            raise TypeError(
                f"aggregator must be an mtl_optim.aggregators instance, got {aggregator!r}"
            )
        if weighting is not None and not isinstance(weighting, Weighting):
            raise TypeError(f"weighting must be an mtl_optim.weighting instance, got {weighting!r}")
        if nonfinite not in ("skip", "raise"):
            raise ValueError(f"nonfinite must be 'skip' or 'raise', got {nonfinite!r}")
        if route not in ("auto", "jacobian", "gramian"):
            raise ValueError(f"route must be 'auto', 'jacobian' or 'gramian', got {route!r}")
        if route == "gramian" and not isinstance(aggregator, GramianWeightedAggregator):
            raise ValueError(
                "route='gramian' needs an aggregator that depends only on the Gramian "
                f"(a GramianWeightedAggregator, e.g. MGDA, NashMTL, IMTLG), got {aggregator!r}"
            )
        if route == "gramian" and (self.per_task_state or (weighting and weighting.needs_jacobian)):
            raise ValueError(
                f"route='gramian' cannot serve {type(self).__name__} with {weighting!r}: it "
                "needs the per-task gradients themselves"
            )
        super().__init__(params, {})
        self._base = base(self.param_groups, **base_kwargs)
        if weighting is not None:  # learnable weightings (uncertainty) train with the model
            known = {id(p) for g in self.param_groups for p in g["params"]}
            extra = [p for p in weighting.parameters() if id(p) not in known]
            if extra:
                self._base.add_param_group({"params": extra, **weighting.param_group_options})
        for group in self.param_groups:
            self.check_param_group(group)
        self.base_class = base
        self.aggregator = aggregator
        self.weighting = weighting
        if weighting is not None:
            weighting.attach(self)
        self.nonfinite = nonfinite
        self.route = route
        self.process_group = process_group
        #: the one owner of the skip state, the rollback and ``last_weights``
        self.guard = Guard(self)
        self._pipeline = Pipeline(self)
        self._replicas: Replicas | None = None  # resolved at the first backward
        self._scale: Tensor | None = None  # the GradScaler's scale during a backward call
        self._shared_arg = None if shared is None else list(shared)
        self._engine = make_engine(self.param_groups)  # FSDP2-sharded params: own engine
        self._layout: tuple | None = None  # see _param_layout
        self._backward_calls = 0  # opt.backward calls since zero_grad (see step)
        self._warned_plain_backward = False
        # an OrderedDict: RemovableHandle keeps a weak reference to it
        self._gradient_hooks: OrderedDict[int, tuple[GradientHook, bool]] = OrderedDict()

    # --- torch.optim.Optimizer protocol ------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        # torch's Optimizer pickles only defaults/state/param_groups; ours live in the base.
        return dict(self.__dict__)

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if "_base" not in self.__dict__:  # during Optimizer.__init__: the base adds defaults
            super().add_param_group(param_group)
            return
        self.check_param_group(param_group)
        self._base.add_param_group(param_group)  # the next backward finds the shared set anew

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        self._new_window()
        self._backward_calls = 0

    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's ``state_dict`` plus an ``"mtl"`` entry: the identities of the
        base and the methods (checked on load), K, the shared set, and the methods' state."""
        return _save_checkpoint(self, super().state_dict())

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a checkpoint of the same optimizer, atomically.

        Everything is checked before anything changes — the base optimizer class, this
        optimizer's class, the aggregator's and weighting's classes, K, the param groups and the
        per-task state's shapes — and if loading a method's state still fails, the base
        optimizer's and every method's state are put back as they were before the call.
        """
        _load_checkpoint(self, state_dict)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Tensor | None:  # type: ignore[override]
        """Update the parameters with ``base`` (a no-op after a skipped non-finite batch)."""
        if closure is not None and needs_closure(self.base_class):
            return step_with_closure(self, closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        check_plain_backward(self)
        if not self.guard.skipping and not self._pipeline.nothing_present:
            self._clip()
            self.apply_update()
            if self.weighting is not None:
                self.weighting.after_step()
        self._new_window()
        return loss

    def __repr__(self) -> str:
        parts = [f"base={self.base_class.__name__}"]
        if self.aggregator is not None:
            parts.append(f"aggregator={self.aggregator!r}")
        if self.weighting is not None:
            parts.append(f"weighting={self.weighting!r}")
        return f"{type(self).__name__}({', '.join(parts)})\n{self._base!r}"

    # --- public MTL API ----------------------------------------------------------------
    @property
    def num_tasks(self) -> int | None:
        return self._engine.num_tasks

    @property
    def shared_params(self) -> list[Tensor]:
        """The shared parameters (empty until the first ``backward`` detects them)."""
        return list(self._engine.shared or [])

    @property
    def shared_slices(self) -> tuple[GroupSlice, ...]:
        """Each param group's shared parameters and their columns of ``J`` (in ``J``'s order)."""
        return tuple(self._engine.slices)

    @property
    def last_weights(self) -> Tensor | None:
        """The K task weights the last ``backward`` applied (``None`` where the method has
        none), for logging."""
        return self.guard.last_weights

    @property
    def max_norm(self) -> float | None:
        """The norm the shared gradient is clipped to before each step (aggregator or weighting)."""
        methods = (self.aggregator, self.weighting)
        norms = [float(m.max_norm) for m in methods if m is not None and m.max_norm is not None]
        return min(norms) if norms else None

    def register_gradient_hook(
        self, hook: GradientHook, *, needs_jacobian: bool = True
    ) -> torch.utils.hooks.RemovableHandle:
        """Call ``hook(optimizer, info)`` at the end of every ``backward`` that is not skipped.

        ``info`` is a :class:`~mtl_optim.GradientInfo`: the loss values, the per-task gradient
        matrix ``J`` of the shared parameters (when this call formed one), its Gramian, the task
        weights and the shared parameters. This is the extension point for tools that read
        per-task gradients (diagnostics, pruning) without a backward pass of their own.

        ``needs_jacobian=True`` makes ``backward`` form ``J`` even where the method alone needs
        no per-task gradient (no aggregator, or a loss weighting only): K reverse passes instead
        of one, and the shared parameters then receive the sum of ``J``'s rows, equal to the
        single-pass gradient up to floating-point rounding. The Gramian route and ``features=``
        never form ``J``; there ``info.jacobian`` is ``None`` (the Gramian route still gives
        ``info.gramian``). Returns a handle whose ``remove()`` unregisters the hook.
        """
        handle = torch.utils.hooks.RemovableHandle(self._gradient_hooks)
        self._gradient_hooks[handle.id] = (hook, bool(needs_jacobian))
        return handle

    def end_epoch(self) -> None:
        """Tell epoch-based methods (IGB, DWA) that an epoch ended."""
        if self.weighting is not None:
            self.weighting.end_epoch()

    @torch.no_grad()
    def update_weighting(self, losses: Sequence[Tensor | None] | Tensor) -> None:
        """Hand the weighting the losses of the same batch re-evaluated after ``step()``.

        FAMO's weight update needs them (see docs/methods/weightings.md); for every other
        weighting this is a no-op. Call it after ``step()``, with the K losses of the batch
        that ``backward`` saw::

            opt.backward(model_losses(x, ys)); opt.step()
            with torch.no_grad():
                opt.update_weighting(model_losses(x, ys))

        Non-finite losses are ignored with a warning (or raise, per ``nonfinite``). With
        partial labels, pass ``None`` where ``backward`` did.
        """
        if self.weighting is not None:
            post_step(self, as_losses(losses, self.num_tasks, False, missing=True))

    def backward(
        self,
        losses: Sequence[Tensor | None] | Tensor,
        *,
        features: Tensor | Sequence[Tensor] | None = None,
        scaler: Any = None,
    ) -> None:
        """Differentiate the K task losses as the method needs and fill every ``.grad``.

        Args:
            losses: K scalar tensors (a sequence or a 1-D tensor); K is fixed after the first
                call. ``None`` in the sequence marks a task without labels in this batch
                (partial labels; see the class docstring).
            features: the shared representation ``z`` (a tensor or tuple of tensors). Given,
                the aggregator combines the per-task gradients at ``z`` (MGDA-UB style) and the
                parameters above ``z`` receive the vector-Jacobian product of that combination.
            scaler: a ``torch.amp.GradScaler`` for mixed precision. Pass the *unscaled*
                losses; the reverse passes run on ``scaler.scale(loss)``, every method sees
                unscaled per-task gradients and loss values, and ``.grad`` is left scaled, as
                after ``scaler.scale(loss).backward()``, so the usual
                ``scaler.step(opt); scaler.update()`` follows. An overflow (Inf/NaN from the
                scaling) is left in ``.grad`` for the scaler to find, without a warning, and the
                step is skipped, as GradScaler does.
        """
        joined = isinstance(losses, Tensor)  # one stacked tensor: the graph joins the tasks
        items = as_losses(losses, self._engine.num_tasks, missing=True)
        self._scale = None
        self._backward_calls += 1
        if self.guard.skipping:  # this window already saw a non-finite value
            return
        replicas = self._replicas_()
        self._engine.validate(self, features)
        if features is not None:  # validated before any state moves
            features = self._pipeline.check_features(features, replicas)
        refuse_unsupported(self, items)
        batch = Batch(self, items, replicas)  # every rank weights with the same losses
        if batch.empty:
            self._pipeline.saw_empty = True
            return warn_empty(self)
        losses, values = batch.losses, batch.values
        if not self.guard.check([values], "loss"):
            return
        if not self._engine.ready:
            self._engine.replicas = replicas
            self._engine.setup(losses, self.param_groups, self._shared_arg, joined)
            self._layout = self._param_layout()
            replicas.broadcast_state([self.aggregator, self.weighting])
        elif self._param_layout() != self._layout:
            refuse_unsupported(self, items, redetect=True)
            self._pipeline.redetect(losses, joined, self._shared_arg)
        if scaler is not None and scaler.is_enabled():
            one = torch.ones((), dtype=torch.float32, device=losses[0].device)
            self._scale = scaler.scale(one)
            losses = [scaler.scale(loss) for loss in losses]
        self._pipeline.run(losses, values, features, batch.present)
        call_hooks(self, values, features is not None)

    # --- internals -------------------------------------------------------------------
    def _new_window(self) -> None:
        self._engine.reset()
        self._pipeline.new_window()
        self.guard.new_window()
        self.window_reset()

    def _param_layout(self) -> tuple[tuple[tuple[int, bool], ...], ...]:
        """Which tensors each group trains now: re-detection runs when this changes."""
        return tuple(
            tuple((id(p), p.requires_grad) for p in g["params"]) for g in self.param_groups
        )

    def _replicas_(self) -> Replicas:
        if self._replicas is None:
            self._replicas = Replicas(self.process_group)
        return self._replicas

    @property
    def _hooks_need_jacobian(self) -> bool:
        return any(needs for _, needs in self._gradient_hooks.values())

    @property
    def _weighting_needs_j(self) -> bool:
        return self.weighting is not None and self.weighting.needs_jacobian

    def _clip(self) -> None:
        max_norm = self.max_norm
        if max_norm is not None and self._engine.ready:
            torch.nn.utils.clip_grad_norm_(self._engine.shared or [], max_norm)
