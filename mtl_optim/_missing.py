r"""Partial labels: a task without a labelled sample in a batch (``None`` in ``backward``).

``opt.backward([l0, None, l2])`` says that task 1 has no label in this batch (multi-dataset
training, where each dataset labels some of the tasks). Write :math:`P = \{i : L_i \ne
\text{None}\}` for the *present* tasks and :math:`m = |P|`. A missing label is absence of
information, not a zero gradient, so nothing tied to a missing task moves and nothing is
rescaled by :math:`K/m`:

* the task leaves the objective: the weighting forms weights over :math:`P`, the aggregator
  combines the rows :math:`J_P` (the Gramian route: the principal submatrix
  :math:`M_{PP}`) and reports :math:`w_i = 0` for the others;
* its head keeps ``.grad = None``, so the base optimizer skips it (no momentum coasting, no
  weight decay);
* method state of the task (AdaTask's moments and step count, Nash-MTL's warm start, FAMO's
  logits, an uncertainty parameter, ...) neither decays nor moves.

Accumulation: a task is present in a window when any of its micro-batches has it; row
:math:`i` of ``J`` sums the micro-batches where it was present. Across processes, task
:math:`i`'s loss and gradients are averaged over the :math:`c_i` ranks where it is present
(a rank-count mean: each rank scales its loss by :math:`R / c_i` before the usual mean over
:math:`R` ranks). With every task present, nothing of this runs: every number is what it was
without partial labels.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ._distributed import Replicas
from ._host import Host

__all__ = [
    "Presence",
    "Batch",
    "post_step",
    "refuse_unsupported",
    "restricted",
    "scatter",
    "warn_empty",
]


class Batch:
    """One ``backward``'s losses after the presence of every task is settled.

    Attributes:
        losses: K losses; a missing task's is a constant zero (no graph), which every reverse
            pass skips, so its rows of ``J`` and of the Gramian are zero.
        values: the ``(K,)`` detached loss values (averaged across ranks: over all ranks, or
            over the ranks where the task is present); a missing task's value is 0.
        present: ``None`` when every task is present (on every rank), else the ``(K,)`` CPU
            bool mask of the tasks present on at least one rank.
    """

    def __init__(self, opt: Host, items: Sequence[Tensor | None], replicas: Replicas) -> None:
        local = [loss is not None for loss in items]
        like = next((loss for loss in items if loss is not None), None)
        if like is None:
            like = torch.zeros(())
            for g in opt.param_groups:  # place the zeros where the model lives
                if g["params"]:
                    like = torch.zeros((), dtype=torch.float32, device=g["params"][0].device)
                    break
        values = torch.stack(
            [
                loss.detach() if loss is not None else torch.zeros_like(like.detach())
                for loss in items
            ]
        )
        self.present: Tensor | None = None
        factors: list[float] | None = None
        if not replicas.active:
            replicas.mean_([values])  # identity in one process
            if not all(local):
                self.present = torch.tensor(local)
        else:
            flags = torch.tensor(local, dtype=values.dtype, device=values.device)
            replicas.mean_([values, flags])  # one all-reduce: the losses and the presence
            counts = (flags * replicas.size).round()
            size = float(replicas.size)
            if not bool((counts == size).all()):
                if getattr(opt._engine, "same_tasks_on_every_rank", False) and bool(
                    ((counts > 0) & (counts < size)).any()
                ):
                    raise ValueError(
                        "with FSDP2 (fully_shard) every rank must pass None for the same tasks: "
                        "FSDP reduce-scatters each module's gradient during backward, so a task "
                        "present on one rank has to be differentiated on all of them. Give the "
                        "ranks batches labelled for the same tasks, or pass a zero-weighted loss "
                        "(e.g. 0 * head_output.sum()) on the ranks without labels"
                    )
                mask = (counts > 0).cpu()
                self.present = mask
                counts_cpu = counts.cpu().tolist()
                factors = [size / c if c > 0 else 0.0 for c in counts_cpu]
                values = values * torch.tensor(factors, dtype=values.dtype, device=values.device)
        self.values = values
        losses: list[Tensor] = []
        for i, loss in enumerate(items):
            if loss is None:
                losses.append(torch.zeros((), dtype=like.dtype, device=like.device))
            elif factors is not None and factors[i] != 1.0:
                losses.append(loss * factors[i])
            else:
                losses.append(loss)
        self.losses = losses

    @property
    def empty(self) -> bool:
        """No task is present anywhere: the call is a no-op."""
        return self.present is not None and not bool(self.present.any())


def refuse_unsupported(
    opt: Any, items: Sequence[Tensor | None], redetect: bool = False, post: bool = False
) -> None:
    """A ValueError, before anything changes, where a missing task cannot be handled."""
    missing = [i for i, loss in enumerate(items) if loss is None]
    if not missing:
        return
    # the shared parameters are named (shared= or a group's "shared": True)
    explicit = opt._shared_arg is not None or any(g.get("shared") for g in opt.param_groups)
    names = ", ".join(str(i) for i in missing)
    if redetect and not explicit:
        raise ValueError(
            f"the set of trainable parameters changed, and finding the shared ones again needs "
            f"every task's loss (None at position {names}); pass shared= to MTLOptimizer, or "
            "call backward with a fully labelled batch first after the change"
        )
    if not getattr(type(opt), "supports_missing", True):
        raise ValueError(
            f"{type(opt).__name__} does not support missing tasks (None at {names}); pass every "
            "task's loss"
        )
    for role, method in (("weighting", opt.weighting), ("aggregator", opt.aggregator)):
        if method is not None and not method.supports_missing:
            raise ValueError(
                f"the {role} {method!r} cannot form weights over the present tasks only (None "
                f"at position {names}); use one that supports partial labels (see "
                "docs/methods/partial-labels.md) or pass every task's loss"
            )
    if not opt._engine.ready and not explicit and not post:
        raise ValueError(
            f"the first backward needs every task's loss (None at position {names}) to find the "
            "shared parameters in the autograd graph; pass shared= (e.g. "
            "shared=model.trunk.parameters()) to MTLOptimizer, or start with a fully labelled "
            "batch"
        )


def post_step(opt: Host, items: Sequence[Tensor | None]) -> None:
    """``update_weighting``: the weighting's update from the re-evaluated losses, over the
    present tasks when some are ``None`` (the weighting checks they match ``backward``'s)."""
    refuse_unsupported(opt, items, post=True)
    batch = Batch(opt, items, opt._replicas_())
    if not batch.empty and opt.guard.check([batch.values], "loss", skip=False):
        with restricted(opt.weighting, batch.present) as index:
            opt.weighting.post_step(batch.values if index is None else batch.values[index])


def warn_empty(opt: Any) -> None:
    """``backward`` with no task present: a no-op, said once per optimizer."""
    if not getattr(opt, "_warned_empty", False):
        opt._warned_empty = True
        warnings.warn(
            "backward got None for every task: no task has a label in this batch, so nothing "
            "is differentiated and the next step() changes no parameter and no state (this "
            "warning is shown once)",
            UserWarning,
            stacklevel=3,
        )


class restricted:  # noqa: N801 - used as a context manager, like torch.no_grad
    """Tell a method (aggregator or weighting) which tasks are present while it runs on their
    rows only: sets ``present`` (indices) and ``all_tasks`` (K), and clears both after."""

    def __init__(self, method: Any, present: Tensor | None) -> None:
        self.method = method
        self.index = None if present is None else present.nonzero().flatten()
        self.k = None if present is None else present.numel()

    def __enter__(self) -> Tensor | None:
        if self.method is not None and self.index is not None:
            self.method.present = self.index
            self.method.all_tasks = self.k
        return self.index

    def __exit__(self, *exc: object) -> None:
        if self.method is not None and self.index is not None:
            self.method.present = None
            self.method.all_tasks = None


def scatter(values: Tensor, index: Tensor | None, k: int) -> Tensor:
    """``(m, ...)`` rows of the present tasks back to K rows, zeros for the missing ones."""
    if index is None or values.shape[0] == k:
        return values
    out = values.new_zeros((k, *values.shape[1:]))
    out[index.to(values.device)] = values
    return out


class Presence:
    """The partial-label bookkeeping of :class:`~mtl_optim._pipeline.Pipeline`: which tasks the
    current ``backward`` and the step's window have, and the combination on present rows."""

    _opt: Any

    def new_presence_window(self) -> None:
        """A step's window starts: no ``backward`` yet, every task present so far."""
        #: tasks present in this window: ``None`` when every backward had every task, else
        #: the union of the batches' ``(K,)`` CPU bool masks
        self.window_present: Tensor | None = None
        #: this backward's present tasks, and the rows the next combination sees
        self.batch_present: Tensor | None = None
        self.rows_present: Tensor | None = None
        self.window_values: Tensor | None = None  # each task's latest loss value
        self.ran = False
        self.saw_empty = False

    @property
    def nothing_present(self) -> bool:
        """Every ``backward`` of this window had no task: ``step`` changes nothing."""
        return self.saw_empty and not self.ran

    def _join(self, present: Tensor | None, values: Tensor) -> None:
        """Add one batch's present tasks to the window's."""
        self.batch_present = present
        if not self.ran:
            self.window_present = present
        elif self.window_present is not None:
            union = None if present is None else self.window_present | present
            self.window_present = None if union is None or bool(union.all()) else union
        if present is not None:
            if self.window_values is None:
                self.window_values = values.clone()
            else:
                index = present.nonzero().flatten().to(values.device)
                self.window_values[index] = values[index]
        else:
            self.window_values = values
        self.ran = True

    def gramian_weights(self, agg: Any, gram: Tensor) -> Tensor:
        """``agg``'s weights from this batch's ``K×K`` Gramian; with a task missing, from the
        principal submatrix of the present tasks, 0 for the others."""
        with restricted(agg, self.batch_present) as index:
            if index is None:
                return agg.weights_from_gramian(gram)
            at = index.to(gram.device)
            return scatter(agg.weights_from_gramian(gram[at[:, None], at]), index, gram.shape[0])

    def present_rows(self, fn: object, agg: object, jacobian: Tensor, rows: bool) -> Tensor:
        """``fn(agg, J)``, or with a task missing ``fn`` on the present rows only (the
        aggregator told which ones), its per-row result scattered back to K rows."""
        present = self.rows_present
        if present is None:
            return fn(agg, jacobian)  # type: ignore[operator]
        with restricted(agg, present) as index:
            assert index is not None
            if getattr(agg, "needs_losses", False) and self.window_values is not None:
                agg.set_losses(self.window_values[index.to(self.window_values.device)])  # type: ignore[attr-defined]
            out = fn(agg, jacobian[index.to(jacobian.device)])  # type: ignore[operator]
        return scatter(out, index, jacobian.shape[0]) if rows else out
