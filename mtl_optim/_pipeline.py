r"""The backward pipeline of ``MTLOptimizer``: from K losses to every parameter's ``.grad``.

One call of ``opt.backward(losses)`` runs these stages, in this order:

1. **objectives** — the weighting maps the loss values to objectives :math:`o = W(L)` and the
   chain rule gives :math:`D = \partial o / \partial L` (``None`` without a weighting) and one
   scalar whose gradient is :math:`\nabla \sum_i o_i` for every task-specific parameter;
2. **per-task gradients or Gramian** — the engine forms what the method needs: nothing (the
   *sum* route: one reverse pass), the ``(K, d)`` matrix ``J`` of the shared parameters (the
   *Jacobian* route), only the ``K×K`` Gramian (the *Gramian* route), or the gradients at a
   shared representation (the *features* route, MGDA-UB);
3. **guard** — every gradient passes the non-finite check of :class:`~mtl_optim._guard.Guard`
   (a failure skips the step and rolls method state back);
4. **combine** — the aggregator turns ``J`` (or the Gramian) into one direction, recording its
   task weights through the guard; a subclass may replace this stage (``shared_update``);
5. **write** — the direction goes into the shared parameters' ``.grad``, with gradients that
   were already there (a regulariser's own ``backward``) kept and added to.

Mixed precision (the GradScaler's scale) and distributed training (averaging through
:class:`~mtl_optim._distributed.Replicas` or the sharded engine) are services the stages use;
no stage calls ``torch.distributed`` itself.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from ._distributed import Replicas
from ._features_route import check_features, features_route
from ._host import Host
from ._missing import Presence, restricted, scatter
from ._streamed_gramian import GramianPass, prefers_gramian
from .aggregators import GramianWeightedAggregator, WeightedAggregator
from .engine import TaskGradients

__all__ = ["Pipeline"]


class Pipeline(Presence):
    """The stages of one ``backward`` for one optimizer (see the module docstring)."""

    #: ``route="auto"``: a window of this optimizer saw two ``backward`` calls (accumulation)
    accumulates = False
    #: ``route="auto"``: the Gramian pass of this window's first batch, with the ``external``
    #: list of that window and the batch's mix, kept in case another ``backward`` follows
    _kept: tuple[list[Tensor | None], GramianPass, Tensor | None] | None = None

    def __init__(self, optimizer: Host) -> None:
        self._opt = optimizer
        self.gram: Tensor | None = None  # the Gramian route's last Gramian, for hooks
        self._upstream: set[int] | None = None  # params above `features`, found on first use
        self.external: list[Tensor | None] | None = None  # .grad at the window start
        self.new_window()

    def new_window(self) -> None:
        """A step's window starts: no ``backward`` yet, every task present so far."""
        self.external = None
        self.new_presence_window()

    # --- the run --------------------------------------------------------------------------
    def run(
        self,
        losses: list[Tensor],
        values: Tensor,
        features: list[Tensor] | None,
        present: Tensor | None = None,
    ) -> None:
        """Stages 1–5 for one ``backward`` call (the route chosen from the method's needs).

        ``present``: ``None`` when every task has a loss, else the ``(K,)`` CPU bool mask of
        the tasks present (a missing task's loss is a constant zero, see :mod:`._missing`).
        """
        opt = self._opt
        opt.guard.start_window()
        self._join(present, values)
        mix, heads_loss = opt.task_objectives(losses, values)
        if opt.aggregator is not None and opt.aggregator.needs_losses and present is None:
            opt.aggregator.set_losses(values)
        self.gram = None
        engine = opt._engine
        if features is not None:
            self.features_route(losses, mix, heads_loss, features)
        elif not engine.shared:  # K = 1, or no parameter reached by two tasks
            if opt._weighting_needs_j:
                raise ValueError(
                    f"{opt.weighting!r} needs the per-task gradients of shared parameters, but "
                    "no parameter is reached by two or more losses (K = 1, or no shared trunk); "
                    "pass shared= to name them, or use another weighting"
                )
            self.sum_route(heads_loss)
        elif opt.route == "gramian" or (opt.route == "auto" and self.auto_gramian(losses)):
            self.gramian_route(losses, mix, heads_loss)
        elif (
            opt.aggregator is not None
            or opt.per_task_state
            or opt._weighting_needs_j
            or opt._hooks_need_jacobian
        ):
            kept, self._kept = self._kept, None
            if kept is not None and kept[0] is self.external:  # J starts from that batch's rows
                engine.resume(kept[1], kept[2])
            self.jacobian_route(losses, mix, heads_loss)
        else:
            self.sum_route(heads_loss)

    def auto_gramian(self, losses: list[Tensor]) -> bool:
        """``route="auto"``: does this ``backward`` take the Gramian route?

        Only where that gives the Jacobian route's numbers (up to rounding): an aggregator that
        depends on the Gramian alone, no per-task state, no weighting or gradient hook that
        needs ``J``, no subclass replacing the combination, one process and the plain engine;
        and only for the first ``backward`` of a window, never once a window accumulated.
        Then :func:`~mtl_optim._streamed_gramian.prefers_gramian` decides from the layers'
        sizes, K and the batch.
        """
        opt, engine = self._opt, self._opt._engine
        if self.external is not None:  # a later backward of this window: J accumulates
            self.accumulates = True
            return False
        replicas = engine.replicas
        allowed = (
            not self.accumulates
            and isinstance(opt.aggregator, GramianWeightedAggregator)
            and not opt.per_task_state
            and not opt._weighting_needs_j
            and not opt._hooks_need_jacobian
            and not _replaced(opt, "combine")
            and not _replaced(opt, "shared_update")
            and type(engine) is TaskGradients
            and (replicas is None or not replicas.active)
        )
        return allowed and prefers_gramian(losses, engine.shared, engine.dtype)

    def check_features(self, features: Tensor | Sequence[Tensor], replicas: Replicas) -> list:
        """``features=`` as a list of tensors in the graph, or a ValueError (nothing moved)."""
        return check_features(self._opt, features, replicas)

    def redetect(self, losses: list[Tensor], joined: bool, given: list[Tensor] | None) -> None:
        """The trainable set changed (``requires_grad`` flipped, a group added): find the shared
        parameters again. Per-task state of parameters that stay shared is kept; parameters
        that become shared start fresh; frozen ones keep their state for when they return."""
        opt = self._opt
        if opt._engine.jacobian is not None:
            raise ValueError(
                "the set of trainable parameters changed (requires_grad or add_param_group) in "
                "the middle of an accumulation window; call step() or zero_grad() first"
            )
        shared = opt._engine.detect(losses, opt.param_groups, given, joined)
        cohorts = opt.shared_set_changing(shared)
        opt._engine.set_shared(opt.param_groups, shared, cohorts)
        opt._layout = opt._param_layout()
        opt.shared_set_changed()

    # --- stage 1: objectives ----------------------------------------------------------------
    def objectives(self, losses: list[Tensor], values: Tensor) -> tuple[Tensor | None, Tensor]:
        r"""Apply the weighting by the chain rule.

        Returns ``D = ∂o/∂L`` (``None`` without a weighting) and a scalar whose gradient is
        :math:`\nabla \sum_i o_i` for every parameter, including the weighting's own.
        The weighting runs on a detached leaf copy of the loss values, so the K per-task passes
        stay on the raw losses and never traverse another task's head.
        """
        opt = self._opt
        stacked = torch.stack(losses)
        if opt.weighting is None:
            opt.guard.set_weights(None)
            return None, stacked.sum()
        present = self.batch_present
        with restricted(opt.weighting, present) as index:
            leaf = (values if index is None else values[index]).clone().requires_grad_(True)
            with torch.enable_grad():
                objectives = opt.weighting(leaf)
        if objectives.shape != leaf.shape:
            raise ValueError(
                f"{opt.weighting!r} returned shape {tuple(objectives.shape)}, "
                f"expected ({leaf.numel()},)"
            )
        if opt.weighting.separable:  # ∂o/∂L is diagonal: one pass gives it
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
        if index is not None:  # D over the present tasks, zero rows and columns elsewhere
            k = values.numel()
            full = mix.new_zeros(k, k)
            at = index.to(mix.device)
            full[at[:, None], at] = mix
            mix = full
        heads_loss = (mix.sum(0).detach() * stacked).sum()
        if objectives.requires_grad:  # learnable weighting parameters (e.g. uncertainty)
            learnable = objectives.sum() - objectives.sum().detach()
            if opt._scale is not None:
                learnable = learnable * opt._scale
            heads_loss = heads_loss + learnable
        w = opt.weighting.weights
        w = None if w is None else scatter(w.detach(), index, values.numel())
        opt.guard.set_weights(w)
        return mix.detach(), heads_loss

    # --- stage 4: combine ---------------------------------------------------------------
    def combine(self, jacobian: Tensor) -> Tensor:
        """The aggregator's direction, recording its row weights where it has them."""
        opt = self._opt
        agg = opt.aggregator
        if agg is None:  # equal weights, as the single-pass route reports them
            if opt.guard.last_weights is None:
                present = self.rows_present
                ones = torch.ones(jacobian.shape[0], device=jacobian.device)
                opt.guard.set_weights(ones if present is None else present.to(ones))
            return jacobian.sum(0)
        if isinstance(agg, WeightedAggregator):
            return self.row_weights(agg, jacobian) @ jacobian
        opt.guard.set_weights(None)
        return self.present_rows(opt._engine.aggregate, agg, jacobian, rows=False)

    def row_weights(self, agg: WeightedAggregator, jacobian: Tensor) -> Tensor:
        """The aggregator's row weights, folded into ``last_weights`` (times the weighting's);
        with a task missing, the weights of the present rows and 0 for the others."""
        w = self.present_rows(self._opt._engine.row_weights, agg, jacobian, rows=True)
        self._opt.guard.fold_weights(w)
        return w

    def transform(self, agg: object, jacobian: Tensor) -> Tensor:
        """The aggregator's per-task rows (AdaTask), zero rows for missing tasks."""
        return self.present_rows(self._opt._engine.transform, agg, jacobian, rows=True)

    # --- stage 2 and the routes ---------------------------------------------------------
    def sum_route(self, total: Tensor) -> None:
        """No per-task gradient: one reverse pass of the weighted sum for every parameter."""
        opt = self._opt
        if total.requires_grad:  # not on a rank where no task is present
            total.backward()
        self.mean_grads([p for g in opt.param_groups for p in g["params"] if p.requires_grad])
        params = [p for g in opt.param_groups for p in g["params"] if p.grad is not None]
        opt.guard.check([p.grad for p in params], "gradient")
        if opt.guard.last_weights is None:
            ones = torch.ones(opt._engine.num_tasks, device=total.device)
            present = self.batch_present
            opt.guard.set_weights(ones if present is None else present.to(ones))

    def heads(self, heads_loss: Tensor, inputs: list[Tensor]) -> list[Tensor]:
        """The task-specific parameters' gradients, in one reverse pass (checked by the caller,
        together with the shared ones: one host sync per ``backward``)."""
        if inputs and heads_loss.requires_grad:
            torch.autograd.backward(heads_loss, inputs=inputs, retain_graph=True)
            self.mean_grads(inputs)
        return [p.grad for p in inputs if p.grad is not None]

    def task_passes(
        self, mix: Tensor | None, heads_loss: Tensor, run: Callable[[list[Tensor]], Tensor]
    ) -> tuple[Tensor, list[Tensor]]:
        """The engine's K per-task passes, ``run(heads)``, and the task-specific parameters'
        gradients: without a weighting the passes give them on the way (``heads`` given, one
        reverse pass saved; see ``TaskGradients.folds_heads``), else one pass of ``heads_loss``
        of their own. Returns what ``run`` returns and those gradients (for the finite check)."""
        opt, engine = self._opt, self._opt._engine
        specific = engine.task_specific
        if mix is None and engine.folds_heads() and not _replaced(opt, "task_objectives"):
            out = run(specific)
            self.mean_grads(specific)
            return out, [p.grad for p in specific if p.grad is not None]
        heads = self.heads(heads_loss, specific)
        return run([]), heads

    def jacobian_route(self, losses: list[Tensor], mix: Tensor | None, heads_loss: Tensor) -> None:
        opt, engine = self._opt, self._opt._engine
        if self.external is None:  # first backward of this window
            self.external = [None if p.grad is None else p.grad.clone() for p in engine.shared]
        separable = opt.weighting is not None and opt.weighting.separable
        row_mix = mix.diagonal() if mix is not None and separable else mix
        jacobian, heads = self.task_passes(
            mix, heads_loss, lambda specific: engine.compute(losses, mix=row_mix, heads=specific)
        )
        if not opt.guard.check([*heads, jacobian], "gradient"):
            return
        self.rows_present = self.window_present  # J sums the window's batches
        jacobian = self.unscale(jacobian)
        if opt._weighting_needs_j:
            jacobian = self.observe(jacobian)
        engine.write_grads(self.rescale(opt.shared_update(jacobian)), self.external)

    def gramian_route(self, losses: list[Tensor], mix: Tensor | None, heads_loss: Tensor) -> None:
        """The Gramian from the K reverse passes (no ``J``), the weights, and their combination
        of the tasks' gradients from what the passes kept (no second reverse pass)."""
        opt, engine = self._opt, self._opt._engine
        auto = opt.route == "auto"
        if auto:  # another backward of this window would continue in J (see run)
            self.external = [None if p.grad is None else p.grad.clone() for p in engine.shared]
        gram, heads = self.task_passes(
            mix, heads_loss, lambda specific: engine.gramian(losses, heads=specific)
        )
        kept, engine.gramian_pass = engine.gramian_pass, None
        if not opt.guard.check([*heads, gram], "gradient"):
            return
        if opt._scale is not None:
            gram = gram / opt._scale.to(gram) ** 2
        if mix is not None:  # Gramian of the objectives' gradients D J
            mix64 = mix.to(gram)
            gram = mix64 @ gram @ mix64.T
        self.gram = gram
        w = self.gramian_weights(opt.aggregator, gram)
        opt.guard.fold_weights(w)
        coeff = w if mix is None else w.to(mix.dtype) @ mix
        shared = engine.shared
        assert kept is not None
        for p, grad in zip(shared, kept.combined(coeff)):
            if grad is None:  # no task reaches p
                continue
            if p.grad is None:
                p.grad = grad
            elif p.grad.is_sparse:
                p.grad = p.grad.to_dense() + grad
            else:
                p.grad.add_(grad)
        if auto:
            separable = opt.weighting is not None and opt.weighting.separable
            row_mix = mix.diagonal() if mix is not None and separable else mix
            self._kept = (self.external, kept, row_mix)  # type: ignore[assignment]
        self.mean_grads(shared)
        opt.guard.check([p.grad for p in shared if p.grad is not None], "gradient")

    def features_route(
        self, losses: list[Tensor], mix: Tensor | None, heads_loss: Tensor, zs: list[Tensor]
    ) -> None:
        """The *features* route (see :mod:`mtl_optim._features_route`)."""
        features_route(self, losses, mix, heads_loss, zs)

    # --- services -------------------------------------------------------------------------
    def mean_grads(self, params: list[Tensor]) -> None:
        """Average ``.grad`` of ``params`` across ranks (a parameter without a gradient on this
        rank but with one on another takes part with zeros)."""
        opt = self._opt
        opt._replicas_().mean_grads(opt._engine.replicated(params))

    def unscale(self, grads: Tensor) -> Tensor:
        scale = self._opt._scale
        return grads if scale is None else grads / scale.to(grads.dtype)

    def rescale(self, grads: Tensor) -> Tensor:
        scale = self._opt._scale
        return grads if scale is None else grads * scale.to(grads.dtype)

    def observe(self, jacobian: Tensor) -> Tensor:
        """``weighting.observe``; gradients it sets on its own parameters are scaled like the
        rest of ``.grad`` when a GradScaler is in use."""
        opt = self._opt
        params = opt.weighting.parameters() if opt._scale is not None else []
        before = [None if p.grad is None else p.grad.clone() for p in params]
        with restricted(opt.weighting, self.rows_present) as index:
            if index is None:
                out = opt.weighting.observe(jacobian)
            else:
                out = opt.weighting.observe(jacobian[index.to(jacobian.device)])
                out = scatter(out, index, jacobian.shape[0])
        scale = opt._scale
        for p, old in zip(params, before):
            if p.grad is not None and scale is not None:
                new = p.grad if old is None else p.grad - old
                p.grad = (0 if old is None else old) + new * scale.to(new.dtype)
        return out


def _replaced(opt: Host, name: str) -> bool:
    """Does a subclass of ``MTLOptimizer`` override the method ``name`` (e.g. ``combine``)?"""
    return sum(name in vars(cls) for cls in type(opt).__mro__) > 1
