r"""Per-task gradients of parameters sharded with FSDP2 (``torch.distributed.fsdp.fully_shard``).

After ``fully_shard``, every parameter is a ``DTensor`` whose rows (dim 0) are split across the R
ranks of a 1-D device mesh. The forward pass all-gathers *other* tensors (the unsharded
parameters), so ``torch.autograd.grad`` on the registered parameters cannot see them; what does
work is ``loss_i.backward()``: FSDP's post-backward hook reduce-scatters the gradient into
``p.grad``, a sharded ``DTensor`` averaged over the ranks. :class:`ShardedTaskGradients` runs one
such pass per task (``retain_graph`` on all but the last), reads ``p.grad.to_local()`` and clears
``p.grad`` in between, and so holds this rank's column block :math:`J_r \in R^{K\times d_r}` of
the per-task Jacobian of the **whole-batch mean** losses, :math:`J = [J_1, \dots, J_R]`.

Because the columns of ``J`` are partitioned across ranks, everything a method needs is exact:

* the Gramian :math:`G = J J^\top = \sum_r J_r J_r^\top` is one all-reduce of ``K×K`` numbers;
  every rank computes the same row weights ``w`` (or row mix ``C``) from it and writes
  :math:`w^\top J_r` (or :math:`C J_r`) into its own ``.grad`` shard. Every
  :class:`~mtl_optim.aggregators.GramianWeightedAggregator` (MGDA, Nash-MTL, UPGrad, DualProj,
  IMTL-G, CAGrad, Aligned-MTL, ConFIG, FairGrad, SDMGrad, GradVac, Random, Sum, Mean) and
  PCGrad (its projections are a row mix computed from ``G``) shard this way;
* GradDrop is per coordinate: its uniform draw is made for all ``d`` coordinates in the
  single-process column order on every rank (the generators agree) and each rank keeps the
  draws of its own columns, so the masks are those of one process;
* AdaTask's per-task moments are per coordinate and live on the local shard: per-rank state
  ``(K, d_r)``, about ``1/R`` of one process;
* clipping (``max_norm``) takes one all-reduce of the local squared norms (torch's
  ``clip_grad_norm_`` on the ``DTensor`` gradients).

Refused at the first ``backward``, with the reason: MoCo and ExcessMTL (they keep a ``(K, d)``
state and take norms or sums over all coordinates inside one call), weightings that read the
per-task gradients (GradNorm, DBMTL), ``features=``, ``route="gramian"``, parameters that are not
sharded on dim 0 of a 1-D mesh, and trainable plain tensors that the losses reach (wrap their
module with ``fully_shard`` too).

Cost per step: K reduce-scatters of the gradients (instead of one) and one ``K×K`` all-reduce;
memory: the ``(K, d_r)`` block of ``J``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ._sharded_layout import ShardedLayout, is_sharded, like, stacked
from .aggregators import GradDrop, Mean, PCGrad, Sum
from .engine import TaskGradients, gramian

__all__ = ["ShardedTaskGradients", "is_sharded", "make_engine"]


def make_engine(param_groups: Sequence[dict]) -> TaskGradients:
    """The engine for these parameters: :class:`ShardedTaskGradients` when any is a ``DTensor``
    (the model went through ``fully_shard`` before the optimizer was built), else the plain
    :class:`~mtl_optim.engine.TaskGradients`."""
    if any(is_sharded(p) for g in param_groups for p in g["params"]):
        return ShardedTaskGradients()
    return TaskGradients()


class ShardedTaskGradients(ShardedLayout):
    """The per-task gradient engine for FSDP2-sharded parameters (see the module docstring).

    ``shared`` holds the sharded parameters (``DTensor``); ``slices`` describe this rank's
    columns of ``J``: their ``params`` are the local shards (plain tensors sharing the
    parameters' storage, refreshed at every :meth:`compute`), so per-task state that is laid
    out along ``J``'s columns (AdaTask) is local too. ``task_specific`` holds only the plain
    tensors that the losses do not reach (e.g. a weighting's learnable parameters, which the
    optimizer differentiates itself); the sharded task-specific parameters receive
    :math:`\\sum_i c_i \\nabla L_i` from the same K passes.
    """

    #: partial labels: FSDP reduce-scatters each module's gradient inside ``backward``, so every
    #: rank must differentiate the same tasks (a task may be missing on all ranks or on none)
    same_tasks_on_every_rank = True

    def folds_heads(self) -> bool:
        """The sharded heads get their gradient from the passes' FSDP hooks (see
        :meth:`compute`), never from a separate pass to save."""
        return False

    # --- per-task gradients -----------------------------------------------------------------
    def compute(
        self,
        losses: Sequence[Tensor],
        retain_graph: bool = False,
        mix: Tensor | None = None,
        heads: Sequence[Tensor] = (),  # never given: folds_heads() is False here
    ) -> Tensor:
        """Add this batch's per-task gradients to this rank's block ``J_r`` and return it.

        One ``backward`` per task; the shared parameters' local gradient shards become the rows
        of ``J_r``, and the sharded task-specific parameters get :math:`\\sum_i c_i \\nabla L_i`
        added to their ``.grad`` (``c`` = the column sums of ``mix``, as the optimizer's heads
        pass uses). A non-finite value on any rank makes every rank's ``J_r`` NaN, so that all
        ranks skip the step together.
        """
        assert self.shared is not None and self.num_tasks is not None
        self._refresh()
        k, d = self.num_tasks, self.dim
        device = losses[0].device
        if self._jacobian is None or self._jacobian.device != device:
            self._jacobian = torch.empty(k, d, dtype=self.dtype, device=device)
        target = self._jacobian if self._fresh else torch.empty_like(self._jacobian)
        if mix is None:
            coeff = [1.0] * k
        else:
            coeff = (mix if mix.dim() == 1 else mix.sum(0)).tolist()
        params = [*self.shared, *self.specific]
        before = [p.grad for p in params]
        sums: list[Tensor | None] = [None] * len(self.specific)
        last = k - 1
        try:
            for p in params:
                p.grad = None
            for i, loss in enumerate(losses):
                row = target[i]
                if loss.grad_fn is None:  # missing on every rank (partial labels): a zero row
                    row.zero_()
                    continue
                loss.backward(retain_graph=retain_graph or i < last)
                for s, owners in zip(self.slices, self._owners):
                    offset = s.start
                    for local, p in zip(s.params, owners):
                        n = local.numel()
                        dst = row[offset : offset + n]
                        if p.grad is None:
                            dst.zero_()
                        else:
                            dst.copy_(p.grad.to_local().reshape(-1))
                        offset += n
                for j, p in enumerate(self.specific):
                    if p.grad is not None:
                        g = p.grad.to_local() * coeff[i]
                        previous = sums[j]
                        sums[j] = g if previous is None else previous.add_(g)
                for p in params:
                    p.grad = None
        finally:
            for p, g in zip(params, before):
                p.grad = g
        for p, g in zip(self.specific, sums):
            if g is not None:
                p.grad = like(p, g) if p.grad is None else p.grad + like(p, g)
        if mix is not None and mix.dim() == 1:
            target.mul_(mix.to(target.dtype)[:, None])
        elif mix is not None:
            target.copy_(mix.to(target.dtype) @ target)
        bad = (~torch.isfinite(target)).any().to(torch.float32)
        for g in sums:
            if g is not None:
                bad = torch.maximum(bad, (~torch.isfinite(g)).any().to(torch.float32))
        torch.distributed.all_reduce(bad, group=self._group)
        if bad.item() > 0:
            target.fill_(float("nan"))
        if not self._fresh:
            self._jacobian.add_(target)
        self._fresh = False
        return self._jacobian

    def gramian_of(self, jacobian: Tensor) -> Tensor:
        """The exact ``K×K`` Gramian of the whole ``J``: the sum over ranks of the local blocks'
        Gramians (float64; one all-reduce)."""
        gram = gramian(jacobian.detach() if jacobian.is_floating_point() else jacobian.double())
        torch.distributed.all_reduce(gram, group=self._group)
        return gram

    def write_grads(self, combined: Tensor, base: list[Tensor | None] | None) -> None:
        """Set each shared parameter's ``.grad`` to a ``DTensor`` shard holding
        ``base + combined`` (this rank's columns), laid out like the parameter."""
        assert self.shared is not None
        views = [v for s in self.slices for v in s.split(combined[s.start : s.stop])]
        for i, (p, v) in enumerate(zip(self.shared, views)):
            extra = None if base is None or i >= len(base) else base[i]
            local = v.to(p.dtype).clone()
            if extra is not None:
                local.add_(extra.to_local() if is_sharded(extra) else extra)
            p.grad = like(p, local)

    def gramian(  # pragma: no cover - validated away
        self, losses: Sequence[Tensor], heads: Sequence[Tensor] = ()
    ) -> Tensor:
        raise ValueError("route='gramian' is not supported with parameters sharded by fully_shard")

    def representation(self, losses: Sequence[Tensor], features: Sequence[Tensor]) -> Tensor:
        raise ValueError(  # pragma: no cover - validated away
            "features= is not supported with parameters sharded by fully_shard"
        )

    # --- the aggregator on this rank's block ------------------------------------------------
    def row_weights(self, agg: Any, jacobian: Tensor) -> Tensor:
        """The row weights of a :class:`~mtl_optim.aggregators.GramianWeightedAggregator`, from
        the all-reduced Gramian (the same on every rank)."""
        if isinstance(agg, (Sum, Mean)):  # weights that do not look at J at all
            return agg.weights(jacobian)
        j = jacobian.detach()
        if not j.is_floating_point():
            j = j.to(torch.float64)
        w = agg.weights_from_gramian(self.gramian_of(j))
        if j.dtype != torch.float64:  # as GramianWeightedAggregator.weights
            big = torch.finfo(j.dtype).max
            w = w.clamp(-big, big)
        return w.to(device=jacobian.device, dtype=j.dtype)

    def transform(self, agg: Any, jacobian: Tensor) -> Tensor:
        """This rank's columns of ``agg.transform(J)`` (PCGrad, GradDrop)."""
        if isinstance(agg, PCGrad):
            work = jacobian.detach()
            if work.dtype not in (torch.float32, torch.float64):
                work = work.float()
            coef = agg.coefficients(self.gramian_of(work).to(work.dtype))
            edited = jacobian - coef.to(jacobian.dtype) @ jacobian
            return edited / jacobian.shape[0] if agg.reduction == "mean" else edited
        if isinstance(agg, GradDrop):
            work = jacobian.detach()
            dtype = work.dtype if work.dtype in (torch.float32, torch.float64) else torch.float32
            assert self._index is not None  # set with the shared layout
            if self._index.device != work.device:
                self._index = self._index.to(work.device)
            draw = agg.draw(self._global_dim, dtype, work.device)
            return agg.drop(jacobian, draw[self._index])
        raise ValueError(f"{agg!r} cannot run on parameters sharded by fully_shard")

    def aggregate(self, agg: Any, jacobian: Tensor) -> Tensor:
        """This rank's columns of ``agg(J)`` for aggregators that are not row weightings."""
        return self.transform(agg, jacobian).sum(dim=0)

    # --- checkpoints ------------------------------------------------------------------------
    def to_checkpoint(self, mtl: dict[str, Any], param_groups: Sequence[dict]) -> dict[str, Any]:
        """The ``"mtl"`` entry in a form ``torch.distributed.checkpoint`` saves whole: per-task
        state as ``DTensor``\\ s (see :meth:`_export`), empty containers marked (DCP drops them)."""
        return _mark_empty(self._export(mtl, param_groups))

    def from_checkpoint(self, mtl: dict[str, Any], param_groups: Sequence[dict]) -> dict[str, Any]:
        """The inverse of :meth:`to_checkpoint`."""
        return self._import(_unmark_empty(mtl), param_groups)

    def _export(self, mtl: dict[str, Any], param_groups: Sequence[dict]) -> dict[str, Any]:
        """Per-task state laid out along this rank's columns (AdaTask's ``task_state`` and
        ``parked``) becomes one ``(K, *p.shape)`` ``DTensor`` per parameter, so that
        ``torch.distributed.checkpoint`` saves every rank's part (and can reshard it)."""
        if "task_state" not in mtl or self.shared is None or self.num_tasks is None:
            return mtl
        k = self.num_tasks
        index = {id(p): i for i, p in enumerate(p for g in param_groups for p in g["params"])}
        owners = {(s.group, s.cohort): o for s, o in zip(self.slices, self._owners)}
        by_key = {(s.group, s.cohort): s for s in self.slices}
        task_state: dict[str, Any] = {}
        for key, st in mtl["task_state"].items():
            gi, cohort = key if isinstance(key, tuple) else (key, 0)
            s, params = by_key[(gi, cohort)], owners[(gi, cohort)]
            entry: dict[str, Any] = {}
            for name, value in st.items():
                if name == "step":
                    entry[name] = value
                    continue
                entry[name] = {}
                offset = 0
                for local, p in zip(s.params, params):
                    n = local.numel()
                    entry[name][index[id(p)]] = stacked(p, value[:, offset : offset + n], k)
                    offset += n
            task_state[f"{gi}:{cohort}"] = entry
        flat = [p for g in param_groups for p in g["params"]]
        parked = {
            i: {name: v if name == "step" else stacked(flat[i], v, k) for name, v in st.items()}
            for i, st in mtl.get("parked", {}).items()
        }
        return {**mtl, "task_state": task_state, "parked": parked}

    def _import(self, mtl: dict[str, Any], param_groups: Sequence[dict]) -> dict[str, Any]:
        """The inverse of :meth:`_export` (keys may come back as strings from
        ``torch.distributed.checkpoint``)."""
        if "task_state" not in mtl or mtl.get("shared") is None:
            return mtl
        flat = [p for g in param_groups for p in g["params"]]
        cohorts = mtl.get("cohorts") or [0] * len(mtl["shared"])
        probe = type(self)()
        probe.set_shared(
            param_groups,
            {id(flat[i]) for i in mtl["shared"]},
            {id(flat[i]): c for i, c in zip(mtl["shared"], cohorts)},
        )
        position = {id(p): i for i, p in enumerate(flat)}
        slices = {
            (s.group, s.cohort): [position[id(p)] for p in owners]
            for s, owners in zip(probe.slices, probe._owners)
        }
        task_state: dict[Any, Any] = {}
        for key, st in mtl["task_state"].items():
            if not isinstance(key, str) or ":" not in key:
                return mtl  # already in the local layout
            gi, cohort = (int(x) for x in key.split(":"))
            indices = slices.get((gi, cohort))
            entry: dict[str, Tensor] = {}
            for name, value in st.items():
                if name == "step":
                    entry[name] = value
                    continue
                if indices is None:
                    raise ValueError(f"task state of group {gi} names no shared parameter")
                parts = {int(i): v for i, v in value.items()}
                missing = [i for i in indices if i not in parts]
                if missing:
                    raise ValueError(f"task state {name!r} lacks parameter(s) {missing}")
                entry[name] = torch.cat([_flat_local(parts[i]) for i in indices], dim=1)
            task_state[gi if cohort == 0 else (gi, cohort)] = entry
        parked = {
            int(i): {name: v if name == "step" else _flat_local(v) for name, v in st.items()}
            for i, st in mtl.get("parked", {}).items()
        }
        return {**mtl, "task_state": task_state, "parked": parked}


def _flat_local(value: Tensor) -> Tensor:
    local = value.to_local() if is_sharded(value) else value
    return local.reshape(local.shape[0], -1)


#: What an empty dict or list becomes in a checkpoint: DCP saves containers through their
#: items, so an empty one (a stateless method's ``state_dict()``) would not come back.
_EMPTY = {dict: "mtl_optim:empty-dict", list: "mtl_optim:empty-list"}


def _mark_empty(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _mark_empty(v) for k, v in obj.items()} if obj else _EMPTY[dict]
    if isinstance(obj, (list, tuple)):
        return type(obj)(_mark_empty(v) for v in obj) if obj else _EMPTY[list]
    return obj


def _unmark_empty(obj: Any) -> Any:
    if isinstance(obj, str):
        return {} if obj == _EMPTY[dict] else [] if obj == _EMPTY[list] else obj
    if isinstance(obj, dict):
        return {k: _unmark_empty(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_unmark_empty(v) for v in obj)
    return obj
