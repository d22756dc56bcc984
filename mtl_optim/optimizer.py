"""``MTLOptimizer``: any torch optimizer, driven by a multi-task gradient method."""

from __future__ import annotations

import copy
import inspect
import warnings
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from typing import Any, Literal

import torch
from torch import Tensor
from torch.optim import Optimizer

from ._distributed import Replicas
from ._gradient_info import GradientHook, GradientInfo
from ._method import clone_state
from ._sharded import make_engine
from .aggregators import Aggregator, GramianWeightedAggregator, WeightedAggregator
from .engine import as_losses, gramian, reachable_params
from .weighting import Weighting

__all__ = ["MTLOptimizer", "NonFiniteError"]


class NonFiniteError(ValueError, FloatingPointError):
    """A loss or gradient was NaN or infinite and ``nonfinite="raise"`` was chosen."""


def _identity(obj: Any) -> str | None:
    """The class name of a class or instance (``None`` for ``None``), as checkpoints record it:
    the qualified name without the module, so that moving a class keeps checkpoints valid."""
    if obj is None:
        return None
    return (obj if isinstance(obj, type) else type(obj)).__qualname__


def _needs_closure(base: type[Optimizer]) -> bool:
    """Does ``base.step`` require a closure (L-BFGS re-evaluates the objective)?"""
    parameter = inspect.signature(base.step).parameters.get("closure")
    return parameter is not None and parameter.default is inspect.Parameter.empty


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


class MTLOptimizer(Optimizer):
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

    **Mixed precision.** ``opt.backward(losses, scaler=grad_scaler)``, then
    ``scaler.step(opt); scaler.update()``: methods see unscaled gradients and losses.

    Args:
        params: parameters or param-group dicts, as for any torch optimizer. A group may carry
            ``"shared": True`` to mark its parameters as shared.
        base: the ``torch.optim.Optimizer`` subclass that performs the update.
        aggregator: a :mod:`mtl_optim.aggregators` instance, or ``None``.
        weighting: a :mod:`mtl_optim.weighting` instance, or ``None``.
        shared: the shared parameters. ``None`` detects them at the first ``backward``: a
            parameter that two or more losses reach in the autograd graph is shared.
        route: how shared gradients are formed when an aggregator is set. ``"jacobian"``
            (default) stores the ``(K, d)`` per-task gradients and combines them.
            ``"gramian"`` (only for :class:`~mtl_optim.aggregators.GramianWeightedAggregator`
            aggregators) never stores ``J``: it forms the ``K×K`` Gramian from
            activation-sized gradients (:mod:`mtl_optim._streamed_gramian`), computes the
            weights ``w`` and runs one backward of :math:`\sum_i w_i o_i`. It trades about
            1.4–1.7× the Jacobian route's step time for memory
            (``benchmarks/results/micro.md``, Nash-MTL). Calling
            ``backward`` several times before ``step`` then combines each call's batch on its
            own (weights per micro-batch) and adds the results.
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

    #: True for methods (AdaTask) that keep state per task and so always need ``J``.
    _per_task_state = False

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        base: type[Optimizer] = torch.optim.Adam,
        *,
        aggregator: Aggregator | None = None,
        weighting: Weighting | None = None,
        shared: Iterable[Tensor] | None = None,
        nonfinite: Literal["skip", "raise"] = "skip",
        route: Literal["jacobian", "gramian"] = "jacobian",
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
        if route not in ("jacobian", "gramian"):
            raise ValueError(f"route must be 'jacobian' or 'gramian', got {route!r}")
        if route == "gramian" and not isinstance(aggregator, GramianWeightedAggregator):
            raise ValueError(
                "route='gramian' needs an aggregator that depends only on the Gramian "
                f"(a GramianWeightedAggregator, e.g. MGDA, NashMTL, IMTLG), got {aggregator!r}"
            )
        if route == "gramian" and (
            self._per_task_state or (weighting and weighting.needs_jacobian)
        ):
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
            self._check_group(group)
        self.base_class = base
        self.aggregator = aggregator
        self.weighting = weighting
        if weighting is not None:
            weighting.attach(self)
        self.nonfinite = nonfinite
        self.route = route
        self.process_group = process_group
        self._replicas: Replicas | None = None  # resolved at the first backward
        self._scale: Tensor | None = None  # the GradScaler's scale during a backward call
        self._window_state: tuple[Any, Any, Any] | None = None  # see _start_of_window
        self._shared_arg = None if shared is None else list(shared)
        self._engine = make_engine(self.param_groups)  # FSDP2-sharded params: own engine
        self._upstream: set[int] | None = None  # params above `features`, found on first use
        self._external: list[Tensor | None] | None = None
        self._skip = False
        self.last_weights: Tensor | None = None
        self._layout: tuple | None = None  # see _param_layout
        self._backward_calls = 0  # opt.backward calls since zero_grad (see step)
        self._warned_plain_backward = False
        # an OrderedDict: RemovableHandle keeps a weak reference to it
        self._gradient_hooks: OrderedDict[int, tuple[GradientHook, bool]] = OrderedDict()
        self._gram: Tensor | None = None  # the Gramian route's last Gramian, for hooks

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
        self._check_group(param_group)
        self._base.add_param_group(param_group)  # the next backward finds the shared set anew

    def _check_group(self, group: dict[str, Any]) -> None:
        """Reject hyperparameters the method cannot honour (overridden by AdaTask)."""

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        self._new_window()
        self._backward_calls = 0  # opt.backward calls since zero_grad (see step)

    def _new_window(self) -> None:
        self._engine.reset()
        self._external = None
        self._skip = False
        self._window_state = None

    def _rollback(self) -> None:
        """A skipped step leaves no trace: method state goes back to the window start."""
        if self._window_state is None:
            return
        agg_state, _, wgt_state = self._window_state
        if agg_state is not None:
            self.aggregator.load_state_dict(clone_state(agg_state))
        if wgt_state is not None:
            self.weighting.restore(wgt_state)

    def _start_of_window(self) -> None:
        """Accumulation: every ``backward`` of a window re-combines the accumulated gradients,
        so the aggregator's state and the weighting's random draws are rewound to where the
        window started before each call; only the last call's combination (what ``step``
        uses) advances them. Loss-value state of a weighting (epoch means) is not rewound."""
        agg, wgt = self.aggregator, self.weighting
        generator = getattr(wgt, "generator", None)
        if self._window_state is None:
            self._window_state = (
                None if agg is None else clone_state(agg.state_dict()),
                None if generator is None else generator.get_state(),
                wgt.snapshot() if wgt is not None and wgt.rollback else None,
            )
            return
        agg_state, gen_state, _ = self._window_state
        if agg_state is not None:
            agg.load_state_dict(clone_state(agg_state))
        if gen_state is not None:
            generator.set_state(gen_state)

    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's ``state_dict`` plus an ``"mtl"`` entry: the identities of the
        base and the methods (checked on load), K, the shared set, and the methods' state."""
        sd = super().state_dict()
        engine = self._engine
        sd["mtl"] = {
            "base": _identity(self.base_class),
            "optimizer": _identity(type(self)),
            "aggregator_class": _identity(self.aggregator),
            "weighting_class": _identity(self.weighting),
            "num_tasks": engine.num_tasks,
            "shared": engine.shared_indices(self.param_groups) if engine.ready else None,
            "cohorts": [s.cohort for s in engine.slices for _ in s.params]
            if engine.ready
            else None,
            "aggregator": None if self.aggregator is None else self.aggregator.state_dict(),
            "weighting": None if self.weighting is None else self.weighting.state_dict(),
            **self._extra_state(),
        }
        sd["mtl"] = engine.to_checkpoint(sd["mtl"], self.param_groups)
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a checkpoint of the same optimizer, atomically.

        Everything is checked before anything changes — the base optimizer class, this
        optimizer's class, the aggregator's and weighting's classes, K, the param groups and the
        per-task state's shapes — and if loading a method's state still fails, the base
        optimizer's and every method's state are put back as they were before the call.
        """
        state_dict = dict(state_dict)
        mtl = state_dict.pop("mtl", None)
        if mtl is None:
            raise ValueError("not an MTLOptimizer state_dict: the 'mtl' entry is missing")
        mtl = self._engine.from_checkpoint(mtl, self.param_groups)
        self._check_checkpoint(state_dict, mtl)
        before = (
            copy.deepcopy(self._base.state_dict()),
            None if self.aggregator is None else clone_state(self.aggregator.state_dict()),
            None if self.weighting is None else clone_state(self.weighting.state_dict()),
            self._extra_state(),
            dict(self._engine.__dict__),  # set_shared rebinds, never mutates, these lists
            self._layout,
        )
        try:
            self._load(state_dict, mtl)
        except Exception:
            self._engine.__dict__.update(before[4])
            self._layout = before[5]
            self._base.load_state_dict(before[0])
            if before[1] is not None:
                self.aggregator.load_state_dict(before[1])
            if before[2] is not None:
                self.weighting.load_state_dict(before[2])
            self._load_extra_state(before[3])
            raise

    def _check_checkpoint(self, state_dict: dict[str, Any], mtl: dict[str, Any]) -> None:
        """Refuse a checkpoint that does not fit, naming what differs (nothing changes)."""
        mine = {
            "base": _identity(self.base_class),
            "optimizer": _identity(type(self)),
            "aggregator_class": _identity(self.aggregator),
            "weighting_class": _identity(self.weighting),
        }
        what = {
            "base": "base optimizer",
            "optimizer": "optimizer",
            "aggregator_class": "aggregator",
            "weighting_class": "weighting",
        }
        for key, value in mine.items():
            if key in mtl and mtl[key] != value:
                raise ValueError(
                    f"this checkpoint was written with {what[key]} {mtl[key]}, but this optimizer "
                    f"has {value}; build the optimizer with the same {what[key]} to load it"
                )
        groups = state_dict.get("param_groups", [])
        if len(groups) != len(self.param_groups) or any(
            len(saved["params"]) != len(g["params"]) for saved, g in zip(groups, self.param_groups)
        ):
            raise ValueError(
                "this checkpoint's param groups do not match this optimizer's (number of groups "
                f"or of parameters per group: saved {[len(g['params']) for g in groups]}, here "
                f"{[len(g['params']) for g in self.param_groups]})"
            )
        k = mtl["num_tasks"]
        if k is not None and self._engine.num_tasks is not None and k != self._engine.num_tasks:
            raise ValueError(
                f"this checkpoint has K = {k} tasks, but this optimizer was trained with "
                f"K = {self._engine.num_tasks}"
            )
        if mtl["shared"] is not None:
            flat = [p for g in self.param_groups for p in g["params"]]
            if max(mtl["shared"], default=-1) >= len(flat):
                raise ValueError("this checkpoint names shared parameters this optimizer lacks")
            probe = type(self._engine)()
            shared = {id(flat[i]) for i in mtl["shared"]}
            probe.set_shared(self.param_groups, shared, self._cohorts(mtl))
            self._check_extra_state(mtl, probe.slices)

    def _cohorts(self, mtl: dict[str, Any]) -> dict[int, int]:
        flat = [p for g in self.param_groups for p in g["params"]]
        cohorts = mtl.get("cohorts") or [0] * len(mtl["shared"])
        return {id(flat[i]): c for i, c in zip(mtl["shared"], cohorts)}

    def _load(self, state_dict: dict[str, Any], mtl: dict[str, Any]) -> None:
        self._base.load_state_dict(state_dict)
        if mtl["shared"] is not None:
            flat = [p for g in self.param_groups for p in g["params"]]
            shared = {id(flat[i]) for i in mtl["shared"]}
            self._engine.set_shared(self.param_groups, shared, self._cohorts(mtl))
            self._engine.num_tasks = mtl["num_tasks"]
            self._layout = self._param_layout()
        if self.aggregator is not None and mtl["aggregator"] is not None:
            self.aggregator.load_state_dict(mtl["aggregator"])
        if self.weighting is not None and mtl["weighting"] is not None:
            self.weighting.load_state_dict(mtl["weighting"])
        self._load_extra_state(mtl)
        self._new_window()

    def _check_extra_state(self, mtl: dict[str, Any], slices: list[Any]) -> None:
        """Extension point: validate the subclass's part of a checkpoint (raise ValueError)."""

    def _extra_state(self) -> dict[str, Any]:
        return {}

    def _load_extra_state(self, mtl: dict[str, Any]) -> None:
        pass

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

    @property
    def _hooks_need_jacobian(self) -> bool:
        return any(needs for _, needs in self._gradient_hooks.values())

    def _call_gradient_hooks(self, values: Tensor, features: bool) -> None:
        if not self._gradient_hooks or self._skip:
            return
        jacobian = None if features else self._engine.jacobian
        info = GradientInfo(
            losses=values,
            jacobian=None if jacobian is None else self._unscale(jacobian),
            weights=self.last_weights,
            shared=tuple(self._engine.shared or ()),
            slices=tuple(self._engine.slices),
            _gramian=self._gram,
        )
        for hook, _ in list(self._gradient_hooks.values()):
            hook(self, info)

    def end_epoch(self) -> None:
        """Tell epoch-based methods (IGB, DWA) that an epoch ended."""
        if self.weighting is not None:
            self.weighting.end_epoch()

    @torch.no_grad()
    def update_weighting(self, losses: Sequence[Tensor] | Tensor) -> None:
        """Hand the weighting the losses of the same batch re-evaluated after ``step()``.

        FAMO's weight update needs them (spec §10); for every other weighting this is a no-op.
        Call it after ``step()``, with the K losses of the batch that ``backward`` saw::

            opt.backward(model_losses(x, ys)); opt.step()
            with torch.no_grad():
                opt.update_weighting(model_losses(x, ys))

        Non-finite losses are ignored with a warning (or raise, per ``nonfinite``).
        """
        if self.weighting is None:
            return
        values = torch.stack([loss.detach() for loss in as_losses(losses, self.num_tasks, False)])
        self._replicas_().mean_([values])
        if self._finite([values], "loss", skip=False):
            self.weighting.post_step(values)

    def backward(
        self,
        losses: Sequence[Tensor] | Tensor,
        *,
        features: Tensor | Sequence[Tensor] | None = None,
        scaler: Any = None,
    ) -> None:
        """Differentiate the K task losses as the method needs and fill every ``.grad``.

        Args:
            losses: K scalar tensors (a sequence or a 1-D tensor); K is fixed after the first
                call.
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
        losses = as_losses(losses, self._engine.num_tasks)
        self._scale = None
        self._backward_calls += 1
        if self._skip:  # this window already saw a non-finite value; the step is skipped
            return
        replicas = self._replicas_()
        self._engine.validate(self, features)
        if features is not None:  # validated before any state moves
            features = [features] if isinstance(features, Tensor) else list(features)
            if not features or not all(isinstance(z, Tensor) and z.requires_grad for z in features):
                raise ValueError(
                    "features must be the shared representation: tensor(s) inside the autograd "
                    "graph between the shared trunk and the task heads"
                )
            if replicas.active and (
                not (
                    self.aggregator is None
                    or isinstance(self.aggregator, GramianWeightedAggregator)
                )
                or self._weighting_needs_j
            ):
                raise ValueError(
                    "across processes, features= needs an aggregator that depends only on the "
                    "Gramian (each rank's representation holds different samples, so only the "
                    "summed Gramian is global) and a weighting that does not look at gradients"
                )
            if self._per_task_state:
                raise ValueError(
                    f"{type(self).__name__} needs per-task gradients of the shared "
                    "parameters; features= is not supported"
                )
        values = torch.stack([loss.detach() for loss in losses])
        replicas.mean_([values])  # every rank weights with the same (whole-batch) losses
        if not self._finite([values], "loss"):
            return
        if not self._engine.ready:
            self._engine.replicas = replicas
            self._engine.setup(losses, self.param_groups, self._shared_arg, joined)
            self._layout = self._param_layout()
            replicas.broadcast_state([self.aggregator, self.weighting])
        elif self._param_layout() != self._layout:
            self._redetect(losses, joined)
        if scaler is not None and scaler.is_enabled():
            one = torch.ones((), dtype=torch.float32, device=losses[0].device)
            self._scale = scaler.scale(one)
            losses = [scaler.scale(loss) for loss in losses]
        self._start_of_window()
        mix, heads_loss = self._objectives(losses, values)
        if self.aggregator is not None and self.aggregator.needs_losses:
            self.aggregator.set_losses(values)
        self._gram = None
        if features is not None:
            self._backward_features(losses, mix, heads_loss, features)
        elif not self._engine.shared:  # K = 1, or no parameter reached by two tasks
            if self._weighting_needs_j:
                raise ValueError(
                    f"{self.weighting!r} needs the per-task gradients of shared parameters, but "
                    "no parameter is reached by two or more losses (K = 1, or no shared trunk); "
                    "pass shared= to name them, or use another weighting"
                )
            self._backward_sum(heads_loss)
        elif self.route == "gramian":
            self._backward_gramian(losses, mix, heads_loss)
        elif (
            self.aggregator is not None
            or self._per_task_state
            or self._weighting_needs_j
            or self._hooks_need_jacobian
        ):
            self._backward_jacobian(losses, mix, heads_loss)
        else:
            self._backward_sum(heads_loss)
        self._call_gradient_hooks(values, features is not None)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Tensor | None:  # type: ignore[override]
        """Update the parameters with ``base`` (a no-op after a skipped non-finite batch)."""
        if closure is not None and _needs_closure(self.base_class):
            return self._step_with_closure(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._check_plain_backward()
        if not self._skip:
            self._clip()
            self._update()
            if self.weighting is not None:
                self.weighting.after_step()
        self._new_window()
        return loss

    def _step_with_closure(self, closure: Any) -> Tensor | None:
        """Bases that re-evaluate the objective inside ``step`` (L-BFGS): the closure must call
        ``opt.zero_grad()`` and ``opt.backward(losses)`` and return the total loss; every
        evaluation then gets the method's gradient, clipped as in a plain step."""

        def evaluate() -> Any:
            self._new_window()
            with torch.enable_grad():
                loss = closure()
            self._check_plain_backward()
            if self._skip:
                raise NonFiniteError(
                    "non-finite loss or gradient inside an L-BFGS closure: a line search "
                    "cannot skip an evaluation; fix the batch or lower the learning rate"
                )
            self._clip()
            return loss

        loss = self._base.step(evaluate)
        if self.weighting is not None:
            self.weighting.after_step()
        self._new_window()
        return loss

    def _check_plain_backward(self) -> None:
        """``loss.backward(); opt.step()`` with a method set skips the method: say so, once."""
        if self._backward_calls or self._warned_plain_backward or not self._has_method:
            # opt.backward since the last zero_grad: a second step() on the same gradients is
            # torch semantics, not misuse
            return
        if any(p.grad is not None for g in self.param_groups for p in g["params"]):
            self._warned_plain_backward = True
            warnings.warn(
                f"{type(self).__name__}.step() found gradients but no opt.backward(losses) call "
                "since the last step: the multi-task method was not applied (shared parameters "
                f"{'were not updated' if self._per_task_state else 'got the plain summed gradient'}"
                "). Call opt.backward(losses) instead of loss.backward()",
                UserWarning,
                stacklevel=3,
            )

    @property
    def _has_method(self) -> bool:
        return self.aggregator is not None or self.weighting is not None or self._per_task_state

    # --- internals -------------------------------------------------------------------
    def _param_layout(self) -> tuple[tuple[tuple[int, bool], ...], ...]:
        """Which tensors each group trains now: re-detection runs when this changes."""
        return tuple(
            tuple((id(p), p.requires_grad) for p in g["params"]) for g in self.param_groups
        )

    def _redetect(self, losses: list[Tensor], joined: bool) -> None:
        """The trainable set changed (``requires_grad`` flipped, a group added): find the shared
        parameters again. Per-task state of parameters that stay shared is kept; parameters
        that become shared start fresh; frozen ones keep their state for when they return."""
        if self._engine.jacobian is not None:
            raise ValueError(
                "the set of trainable parameters changed (requires_grad or add_param_group) in "
                "the middle of an accumulation window; call step() or zero_grad() first"
            )
        shared = self._engine.detect(losses, self.param_groups, self._shared_arg, joined)
        cohorts = self._shared_set_changing(shared)
        self._engine.set_shared(self.param_groups, shared, cohorts)
        self._layout = self._param_layout()
        self._shared_set_changed()

    def _shared_set_changing(self, shared: set[int]) -> dict[int, int] | None:
        """Extension point: before the engine adopts a new shared set (``id``s). Returns the
        cohort of each shared parameter (see :class:`~mtl_optim.engine.GroupSlice`)."""
        return None

    def _shared_set_changed(self) -> None:
        """Extension point: after the engine adopted a new shared set."""

    def _replicas_(self) -> Replicas:
        if self._replicas is None:
            self._replicas = Replicas(self.process_group)
        return self._replicas

    def _mean_grads(self, params: list[Tensor]) -> None:
        """Average ``.grad`` of ``params`` across ranks (a parameter without a gradient on this
        rank but with one on another takes part with zeros)."""
        params = self._engine.replicated(params)
        replicas = self._replicas_()
        if not replicas.active or not params:
            return
        device = params[0].device
        has = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=device)
        torch.distributed.all_reduce(has, group=replicas.group)
        used = []
        for p, flag in zip(params, has.tolist()):
            if flag > 0:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                used.append(p.grad)
        replicas.mean_(used)

    @property
    def _weighting_needs_j(self) -> bool:
        return self.weighting is not None and self.weighting.needs_jacobian

    @property
    def max_norm(self) -> float | None:
        """The norm the shared gradient is clipped to before each step (aggregator or weighting)."""
        norms = [m.max_norm for m in (self.aggregator, self.weighting) if m is not None]
        norms = [n for n in norms if n is not None]
        return min(norms) if norms else None

    def _clip(self) -> None:
        max_norm = self.max_norm
        if max_norm is not None and self._engine.ready:
            torch.nn.utils.clip_grad_norm_(self._engine.shared, max_norm)

    def _update(self) -> None:
        self._base.step()

    def _objectives(self, losses: list[Tensor], values: Tensor) -> tuple[Tensor | None, Tensor]:
        r"""Apply the weighting by the chain rule.

        Returns ``D = ∂o/∂L`` (``None`` without a weighting) and a scalar whose gradient is
        :math:`\nabla \sum_i o_i` for every parameter, including the weighting's own.
        The weighting runs on a detached leaf copy of the loss values, so the K per-task passes
        stay on the raw losses and never traverse another task's head.
        """
        stacked = torch.stack(losses)
        if self.weighting is None:
            self.last_weights = None
            return None, stacked.sum()
        leaf = values.clone().requires_grad_(True)
        with torch.enable_grad():
            objectives = self.weighting(leaf)
        if objectives.shape != leaf.shape:
            raise ValueError(
                f"{self.weighting!r} returned shape {tuple(objectives.shape)}, "
                f"expected ({leaf.numel()},)"
            )
        if self.weighting.separable:  # ∂o/∂L is diagonal: one pass gives it
            (diag,) = torch.autograd.grad(
                objectives.sum(), leaf, retain_graph=True, allow_unused=True
            )
            mix = torch.diag(torch.zeros_like(leaf) if diag is None else diag)
        else:
            rows = [
                torch.autograd.grad(o, leaf, retain_graph=True, allow_unused=True)[0]
                for o in objectives.unbind()
            ]
            mix = torch.stack([torch.zeros_like(leaf) if r is None else r for r in rows])
        heads_loss = (mix.sum(0).detach() * stacked).sum()
        if objectives.requires_grad:  # learnable weighting parameters (e.g. uncertainty)
            learnable = objectives.sum() - objectives.sum().detach()
            if self._scale is not None:
                learnable = learnable * self._scale
            heads_loss = heads_loss + learnable
        w = self.weighting.weights
        self.last_weights = None if w is None else w.detach()
        return mix.detach(), heads_loss

    def _combine(self, jacobian: Tensor) -> Tensor:
        """The aggregator's direction, recording its row weights where it has them."""
        agg = self.aggregator
        if agg is None:
            return jacobian.sum(0)
        if isinstance(agg, WeightedAggregator):
            return self._row_weights(agg, jacobian) @ jacobian
        self.last_weights = None
        return self._engine.aggregate(agg, jacobian)

    def _row_weights(self, agg: WeightedAggregator, jacobian: Tensor) -> Tensor:
        """The aggregator's row weights, folded into ``last_weights`` (times the weighting's)."""
        w = self._engine.row_weights(agg, jacobian)
        self.last_weights = w if self.last_weights is None else w * self.last_weights
        return w

    def _backward_sum(self, total: Tensor) -> None:
        total.backward()
        self._mean_grads([p for g in self.param_groups for p in g["params"] if p.requires_grad])
        params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        self._finite([p.grad for p in params], "gradient")
        if self.last_weights is None:
            self.last_weights = torch.ones(self._engine.num_tasks, device=total.device)

    def _backward_heads(self, heads_loss: Tensor, inputs: list[Tensor]) -> bool:
        if inputs:
            torch.autograd.backward(heads_loss, inputs=inputs, retain_graph=True)
            self._mean_grads(inputs)
        return self._finite([p.grad for p in inputs if p.grad is not None], "gradient")

    def _backward_jacobian(self, losses: list[Tensor], mix: Tensor | None, heads_loss: Tensor):
        if not self._backward_heads(heads_loss, self._engine.task_specific):
            return
        if self._external is None:  # first backward of this window
            self._external = [
                None if p.grad is None else p.grad.clone() for p in self._engine.shared
            ]
        separable = self.weighting is not None and self.weighting.separable
        row_mix = mix.diagonal() if mix is not None and separable else mix
        jacobian = self._engine.compute(losses, mix=row_mix)
        if not self._finite([jacobian], "gradient"):
            return
        jacobian = self._unscale(jacobian)
        if self._weighting_needs_j:
            jacobian = self._observe(jacobian)
        self._engine.write_grads(self._rescale(self._shared_update(jacobian)), self._external)

    def _backward_gramian(self, losses: list[Tensor], mix: Tensor | None, heads_loss: Tensor):
        if not self._backward_heads(heads_loss, self._engine.task_specific):
            return
        gram = self._engine.gramian(losses)
        if not self._finite([gram], "gradient"):
            return
        if self._scale is not None:
            gram = gram / self._scale.to(gram) ** 2
        if mix is not None:  # Gramian of the objectives' gradients D J
            mix64 = mix.to(gram)
            gram = mix64 @ gram @ mix64.T
        self._gram = gram
        w = self.aggregator.weights_from_gramian(gram)
        self.last_weights = w if self.last_weights is None else w * self.last_weights
        coeff = w if mix is None else w.to(mix.dtype) @ mix
        shared = self._engine.shared
        torch.autograd.backward(
            losses,
            grad_tensors=[c.to(loss.dtype) for c, loss in zip(coeff.unbind(), losses)],
            inputs=shared,
        )
        self._mean_grads(shared)
        self._finite([p.grad for p in shared if p.grad is not None], "gradient")

    def _shared_update(self, jacobian: Tensor) -> Tensor:
        """What the shared parameters' ``.grad`` holds after ``backward``."""
        return self._combine(jacobian)

    def _backward_features(
        self,
        losses: list[Tensor],
        mix: Tensor | None,
        heads_loss: Tensor,
        zs: list[Tensor],
    ) -> None:
        if self._upstream is None:
            self._upstream = set().union(*(reachable_params(z) for z in zs))
        params = [p for g in self.param_groups for p in g["params"] if p.requires_grad]
        above = [p for p in params if id(p) in self._upstream]
        if not self._backward_heads(heads_loss, [p for p in params if id(p) not in self._upstream]):
            return
        grads_z = self._engine.representation(losses, zs)
        replicas = self._replicas_()
        if not replicas.active and not self._finite([grads_z], "gradient"):
            return
        grads_z = self._unscale(grads_z)
        if mix is not None:
            grads_z = mix.to(grads_z.dtype) @ grads_z
        if self._weighting_needs_j:
            grads_z = self._observe(grads_z)
        if replicas.active and self.aggregator is not None:
            combined = self._combine_across_ranks(grads_z, replicas)
            if combined is None:
                return
            combined = self._rescale(combined)
        else:
            combined = self._rescale(self._combine(grads_z))
        sizes = [z.numel() for z in zs]
        grad_tensors = [c.view_as(z).to(z.dtype) for c, z in zip(combined.split(sizes), zs)]
        torch.autograd.backward(zs, grad_tensors=grad_tensors, inputs=above)
        self._mean_grads(above)
        self._finite([p.grad for p in above if p.grad is not None], "gradient")

    def _combine_across_ranks(self, grads_z: Tensor, replicas: Replicas) -> Tensor | None:
        r"""MGDA-UB across processes. The representation of the whole batch is the ranks'
        blocks side by side, and a rank's block of :math:`\nabla_z L` is its local gradient
        divided by the number of ranks R, so the whole batch's Gramian is
        :math:`\sum_r G_r G_r^\top / R^2` (one all-reduce of ``K×K``). Each rank applies the
        weights to its own block; the parameters' gradients are then averaged."""
        gram = gramian(grads_z.detach())
        replicas.sum_([gram])  # a NaN on any rank reaches every rank: all skip together
        gram = gram / replicas.size**2
        if not self._finite([gram], "gradient"):
            return None
        w = self.aggregator.weights_from_gramian(gram)
        self.last_weights = w if self.last_weights is None else w * self.last_weights
        return w.to(grads_z.dtype) @ grads_z

    def _unscale(self, grads: Tensor) -> Tensor:
        return grads if self._scale is None else grads / self._scale.to(grads.dtype)

    def _rescale(self, grads: Tensor) -> Tensor:
        return grads if self._scale is None else grads * self._scale.to(grads.dtype)

    def _observe(self, jacobian: Tensor) -> Tensor:
        """``weighting.observe``; gradients it sets on its own parameters are scaled like the
        rest of ``.grad`` when a GradScaler is in use."""
        params = self.weighting.parameters() if self._scale is not None else []
        before = [None if p.grad is None else p.grad.clone() for p in params]
        out = self.weighting.observe(jacobian)
        for p, old in zip(params, before):
            if p.grad is not None:
                new = p.grad if old is None else p.grad - old
                p.grad = (0 if old is None else old) + new * self._scale.to(new.dtype)
        return out

    def _finite(self, tensors: list[Tensor], what: str, skip: bool = True) -> bool:
        """One host sync: are all ``tensors`` finite? If not, skip or raise per ``nonfinite``.

        With ``skip=False`` a non-finite value only warns (and returns False); the step is kept.
        """
        tensors = self._engine.finite_inputs(tensors)
        groups: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
        for t in tensors:
            if t.is_sparse:  # nn.Embedding(sparse=True): check the stored values
                t = t.coalesce().values()
            groups.setdefault((t.device, t.dtype), []).append(t)
        bad = 0.0
        for (device, _), group in groups.items():
            found = torch.zeros((), dtype=torch.float32, device=device)
            # GradScaler's fused check; with a unit scale it leaves the tensors unchanged.
            torch._amp_foreach_non_finite_check_and_unscale_(
                group, found, torch.ones((), dtype=torch.float32, device=device)
            )
            bad += found.item()
        if bad == 0:
            return True
        if self._scale is not None and what == "gradient" and skip:
            # An overflow of the loss scale: GradScaler's business. Make sure it finds the Inf
            # in .grad (it skips the step and lowers the scale); no warning.
            for p in self._engine.shared or []:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                p.grad.fill_(float("inf"))
            self._skip = True
            self._rollback()
            return False
        message = f"non-finite {what} (NaN or Inf) in this batch"
        if self.nonfinite == "raise":
            raise NonFiniteError(message)
        if not skip:
            warnings.warn(f"{message}: ignored", RuntimeWarning, stacklevel=3)
            return False
        warnings.warn(f"{message}: the next step() is skipped", RuntimeWarning, stacklevel=4)
        self._skip = True
        self._rollback()
        return False
