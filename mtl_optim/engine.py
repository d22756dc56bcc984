"""The per-task gradient engine: the one place where mtl_optim differentiates per task.

Every method in the package receives what this module produces and never calls autograd itself:

* the shared parameters θ_s (detected from the autograd graph, or given by the user);
* the per-task gradient matrix ``J ∈ R^{K×d}`` with rows ``g_i = ∇_{θ_s} L_i``, kept in one
  contiguous buffer that is allocated once and reused (``J[:, a:b]`` is a view per parameter);
* the Gramian ``J Jᵀ`` on request;
* gradients at a shared representation ``z`` (``∇_z L_i``) when the user passes ``features=``.

Distributed training reduces ``J`` (or ``z``-gradients) in :meth:`TaskGradients._reduce`, the only
place where per-task gradients leave this process.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from ._distributed import Replicas
from ._graph import JOIN, as_losses, reachable_params, walk
from ._linalg import gramian  # re-exported: engine.gramian stays importable
from ._streamed_gramian import GramianPass, fill_jacobian

__all__ = ["GroupSlice", "TaskGradients", "as_losses", "gramian", "reachable_params"]


@dataclass(frozen=True)
class GroupSlice:
    """Shared parameters of one param group and their columns ``[start, stop)`` of ``J``.

    ``cohort`` tells apart parameters of one group that joined the shared set at different
    times (a frozen layer unfrozen mid-training): per-task state (AdaTask) keeps one step count
    per ``(group, cohort)``. Without such changes every group has one slice, cohort 0.
    """

    group: int
    start: int
    stop: int
    params: tuple[Tensor, ...]
    cohort: int = 0

    def split(self, flat: Tensor) -> list[Tensor]:
        """Views of a ``(stop - start,)`` vector (or ``(K, n)`` matrix) shaped like each param."""
        lead = flat.shape[:-1]
        chunks = flat.split([p.numel() for p in self.params], dim=-1)
        return [c.view((*lead, *p.shape)) for c, p in zip(chunks, self.params)]


def _flat_grads(grads: Sequence[Tensor | None], params: Sequence[Tensor], out: Tensor) -> None:
    """Write per-parameter gradients into a ``(..., d)`` row block; ``None`` means zero."""
    offset = 0
    for g, p in zip(grads, params):
        n = p.numel()
        dst = out[..., offset : offset + n]
        if g is None:
            dst.zero_()
        else:  # a sparse gradient (nn.Embedding(sparse=True)) is densified into its row
            dst.copy_((g.to_dense() if g.is_sparse else g).reshape(*out.shape[:-1], n))
        offset += n


class TaskGradients:
    """Per-task gradients of the shared parameters, in one reusable ``(K, d)`` buffer.

    ``strategy`` chooses how the K reverse passes run: ``"loop"`` calls
    ``torch.autograd.grad`` once per task (``retain_graph`` on all but the last);
    ``"batched"`` runs one vmapped backward with ``is_grads_batched=True``.
    ``benchmarks/engine_strategies.py`` measures both (``benchmarks/results/``): ``"batched"``
    won by at most 14% (small MLP, K >= 4) and lost by up to 62% (1M-parameter MLP and a conv
    trunk at K = 8), so ``"loop"`` is the default; it also supports every autograd op, while
    vmap does not.
    """

    STRATEGIES: tuple[str, ...] = ("loop", "batched")
    #: the last :meth:`gramian` call's pass: what combines the tasks' gradients afterwards
    gramian_pass: GramianPass | None = None

    def __init__(self, strategy: Literal["loop", "batched"] = "loop") -> None:
        if strategy not in self.STRATEGIES:
            raise ValueError(f"strategy must be one of {self.STRATEGIES}, got {strategy!r}")
        self.strategy = strategy
        self.num_tasks: int | None = None
        self.shared: list[Tensor] | None = None
        self.task_specific: list[Tensor] = []
        self.slices: list[GroupSlice] = []
        self.dtype: torch.dtype | None = None
        self._jacobian: Tensor | None = None
        self._fresh = True  # the next compute() overwrites instead of accumulating
        #: ranks to average over (set by the optimizer; ``None`` or inactive: one process)
        self.replicas: Replicas | None = None
        # the graph walk alone found the shared set (see folds_heads)
        self.heads_exclusive = False

    # --- set-up -------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return self.shared is not None

    def setup(
        self,
        losses: Sequence[Tensor],
        param_groups: Sequence[dict],
        shared: Iterable[Tensor] | None,
        joined: bool = False,
    ) -> None:
        """Fix K and the shared parameters (from ``shared``, group flags, or the graph).

        Detection walks each loss's autograd graph: a trainable parameter that two or more
        losses reach is shared. The walk over-approximates where one node joins the losses'
        graphs (losses passed as one stacked tensor, ``joined=True``; a ``torch.compile``'d
        region, whose backward is one node over all its parameters; stacking, concatenation or
        indexing that the losses meet at): then every parameter it reaches would look shared.
        In that case the candidates are settled from the per-task gradients themselves — one
        reverse pass per task, once — and a parameter is shared when two or more tasks give it a
        nonzero gradient (all ranks agree: the flags are summed across processes).
        """
        chosen = self.detect(losses, param_groups, shared, joined)  # a refusal changes nothing
        self.num_tasks = len(losses)
        self.set_shared(param_groups, chosen)

    def detect(
        self,
        losses: Sequence[Tensor],
        param_groups: Sequence[dict],
        shared: Iterable[Tensor] | None,
        joined: bool = False,
    ) -> set[int]:
        """``id`` of the shared parameters for ``losses`` (see :meth:`setup`)."""
        self.heads_exclusive = False
        every = {id(p) for g in param_groups for p in g["params"]}
        params = [p for g in param_groups for p in g["params"] if p.requires_grad]
        explicit = shared is not None or any(g.get("shared", False) for g in param_groups)
        if explicit:
            chosen = {id(p) for p in shared or ()}
            chosen |= {id(p) for g in param_groups if g.get("shared", False) for p in g["params"]}
            unknown = chosen - every
            if unknown:
                raise ValueError(
                    f"{len(unknown)} tensor(s) passed as shared= are not parameters of this "
                    "optimizer"
                )
            return chosen
        if len(losses) < 2:
            return set()
        counts: dict[int, int] = {}
        ambiguous = joined
        for pid in walk(losses):
            if pid == JOIN:
                ambiguous = True
            else:
                counts[pid] = counts.get(pid, 0) + 1
        trainable = {id(p) for p in params}
        chosen = {pid for pid, c in counts.items() if c >= 2 and pid in trainable}
        if ambiguous and chosen:
            chosen = self._settle(losses, [p for p in params if id(p) in chosen])
        self.heads_exclusive = not ambiguous
        return chosen

    def _settle(self, losses: Sequence[Tensor], candidates: list[Tensor]) -> set[int]:
        """The candidates that two or more tasks give a nonzero gradient (one pass per task)."""
        flags = torch.zeros(len(losses), len(candidates), device=candidates[0].device)
        for i, loss in enumerate(losses):
            grads = torch.autograd.grad(loss, candidates, retain_graph=True, allow_unused=True)
            for j, g in enumerate(grads):
                if g is not None:
                    values = g.coalesce().values() if g.is_sparse else g
                    flags[i, j] = values.ne(0).any()
        if self.replicas is not None:
            self.replicas.sum_([flags])
        silent = (flags.sum(1) == 0).nonzero().flatten().tolist()
        if silent:
            warnings.warn(
                f"task(s) {silent} gave an all-zero gradient to every parameter that the "
                "autograd graph cannot tell apart (a compiled model or stacked losses), so "
                "the shared parameters could not be inferred for them; pass shared= (or a "
                "param group with shared=True) to the optimizer to make the split explicit",
                UserWarning,
                stacklevel=4,
            )
        reached = (flags > 0).sum(0)
        return {id(p) for p, c in zip(candidates, reached.tolist()) if c >= 2}

    def set_shared(
        self,
        param_groups: Sequence[dict],
        shared_ids: set[int],
        cohorts: dict[int, int] | None = None,
    ) -> None:
        """Order shared params by group (then cohort) so each slice owns a contiguous column
        range of J. Parameters that do not require grad are in neither set."""
        self.slices, self.shared, self.task_specific = [], [], []
        cohorts = cohorts or {}
        offset = 0
        for gi, group in enumerate(param_groups):
            mine = [p for p in group["params"] if id(p) in shared_ids and p.requires_grad]
            self.task_specific += [
                p for p in group["params"] if id(p) not in shared_ids and p.requires_grad
            ]
            for cohort in sorted({cohorts.get(id(p), 0) for p in mine}):
                members = tuple(p for p in mine if cohorts.get(id(p), 0) == cohort)
                n = sum(p.numel() for p in members)
                self.slices.append(GroupSlice(gi, offset, offset + n, members, cohort))
                self.shared += members
                offset += n
        dtypes = [p.dtype for p in self.shared] or [torch.get_default_dtype()]
        dtype = torch.float32
        for dt in dtypes:
            dtype = torch.promote_types(dtype, dt)
        self.dtype = dtype
        self._jacobian = None

    @property
    def dim(self) -> int:
        return self.slices[-1].stop if self.slices else 0

    def shared_indices(self, param_groups: Sequence[dict]) -> list[int]:
        """Positions of the shared params in the flat param order (for ``state_dict``)."""
        index = {id(p): i for i, p in enumerate(p for g in param_groups for p in g["params"])}
        return [index[id(p)] for p in self.shared or ()]

    # --- per-task gradients -------------------------------------------------------------
    @property
    def jacobian(self) -> Tensor | None:
        """The accumulated ``(K, d)`` per-task gradients since the last :meth:`reset`."""
        return None if self._fresh else self._jacobian

    def reset(self) -> None:
        """Start a new accumulation window (after ``step`` or ``zero_grad``)."""
        self._fresh = True

    def compute(
        self,
        losses: Sequence[Tensor],
        retain_graph: bool = False,
        mix: Tensor | None = None,
        heads: Sequence[Tensor] = (),
    ) -> Tensor:
        """Add this batch's per-task gradients of the shared params to ``J`` and return it.

        ``mix`` (``K×K``, the weighting's ``∂o/∂L`` for this batch, or its diagonal as a
        ``(K,)`` vector) turns the gradients of the losses into those of the objectives before
        they are added, so that accumulated micro-batches each enter with their own weights.
        ``heads`` (see :meth:`folds_heads`): task-specific parameters whose ``.grad`` the same
        passes accumulate :math:`\\nabla \\sum_i L_i` into.
        """
        assert self.shared is not None and self.num_tasks is not None
        k, d = self.num_tasks, self.dim
        device = self.shared[0].device if self.shared else losses[0].device
        if self._jacobian is None or self._jacobian.device != device:
            self._jacobian = torch.empty(k, d, dtype=self.dtype, device=device)
        target = self._jacobian if self._fresh else torch.empty_like(self._jacobian)
        if self.strategy == "batched":
            self._batched(losses, target, retain_graph)
        else:
            self._loop(losses, target, retain_graph, heads)
        if mix is not None and mix.dim() == 1:  # a diagonal ∂o/∂L: scale the rows in place
            target.mul_(mix.to(target.dtype)[:, None])
        elif mix is not None:
            target.copy_(mix.to(target.dtype) @ target)
        self._reduce(target)
        if not self._fresh:
            self._jacobian.add_(target)
        self._fresh = False
        return self._jacobian

    def _loop(
        self, losses: Sequence[Tensor], out: Tensor, retain_graph: bool, heads: Sequence[Tensor]
    ) -> None:
        """One reverse pass per task; the weights of Linear layers are written straight into
        ``out`` from the layers' output gradients (:func:`~._streamed_gramian.fill_jacobian`:
        the same products autograd computes, without its gradient tensors and their copy)."""
        fill_jacobian(losses, self.shared or [], out, retain_graph, heads)

    def folds_heads(self) -> bool:
        """Can the K passes of :meth:`compute` also give the task-specific parameters their
        gradient of :math:`\\sum_i L_i`, bit for bit as a ``backward`` of the sum (one reverse
        pass saved)? Only where the graph walk alone found the shared set (each task-specific
        parameter is then reached by at most one loss, so no sum's order can differ) and the
        passes are the loop's."""
        return self.strategy == "loop" and self.heads_exclusive

    def _batched(self, losses: Sequence[Tensor], out: Tensor, retain_graph: bool) -> None:
        stacked = torch.stack(list(losses))
        eye = torch.eye(len(losses), dtype=stacked.dtype, device=stacked.device)
        shared = self.shared or []
        grads = torch.autograd.grad(
            stacked,
            shared,
            grad_outputs=eye,
            retain_graph=retain_graph,
            allow_unused=True,
            is_grads_batched=True,
        )
        _flat_grads(grads, shared, out)

    def _reduce(self, jacobian: Tensor) -> None:
        """Average per-task gradients across processes: one all-reduce of the ``(K, d)`` block
        (identity in a single process)."""
        if self.replicas is not None:
            self.replicas.mean_([jacobian])

    def gramian(self, losses: Sequence[Tensor], heads: Sequence[Tensor] = ()) -> Tensor:
        """``(K, K)`` float64 Gramian of this batch's per-task gradients, without forming ``J``.

        See :mod:`mtl_optim._streamed_gramian`. The reverse passes free the graph, as a
        ``backward`` does; :attr:`gramian_pass` keeps what combines the tasks' gradients
        (``gramian_pass.combined(c)``) or rebuilds their rows (:meth:`resume`). ``heads`` as
        in :meth:`compute`.
        """
        assert self.shared is not None and self.dtype is not None
        self.gramian_pass = GramianPass(losses, self.shared, self.dtype, heads=heads)
        gram = self.gramian_pass.gram
        self._reduce_gramian(gram)
        return gram

    def resume(self, kept: GramianPass, mix: Tensor | None) -> None:
        """Start this window's ``J`` from an earlier :meth:`gramian` pass of the same window
        (its rows, times ``mix`` as in :meth:`compute`): ``route="auto"`` took the Gramian
        route for a batch and then saw another ``backward`` before ``step``."""
        assert self.shared is not None and self.num_tasks is not None
        device = self.shared[0].device
        if self._jacobian is None or self._jacobian.device != device:
            self._jacobian = torch.empty(self.num_tasks, self.dim, dtype=self.dtype, device=device)
        kept.jacobian_into(self._jacobian)
        if mix is not None and mix.dim() == 1:
            self._jacobian.mul_(mix.to(self._jacobian.dtype)[:, None])
        elif mix is not None:
            self._jacobian.copy_(mix.to(self._jacobian.dtype) @ self._jacobian)
        self._reduce(self._jacobian)
        self._fresh = False

    def _reduce_gramian(self, gram: Tensor) -> None:
        """Average Gramians across processes (identity in a single process).

        The mean of per-rank Gramians is not the Gramian of the mean gradient (it adds the
        between-rank spread of the gradients); the Gramian route accepts this to move ``K²``
        numbers instead of ``K·d`` (see ``MTLOptimizer``'s ``route``).
        """
        if self.replicas is not None:
            self.replicas.mean_([gram])

    def representation(self, losses: Sequence[Tensor], features: Sequence[Tensor]) -> Tensor:
        """``(K, n_z)`` gradients of each loss at the shared representation ``z``."""
        n = sum(z.numel() for z in features)
        dtype = torch.promote_types(features[0].dtype, torch.float32)
        out = torch.empty(len(losses), n, dtype=dtype, device=features[0].device)
        for i, loss in enumerate(losses):
            if loss.grad_fn is None:  # a missing task (partial labels): a zero row
                out[i].zero_()
                continue
            grads = torch.autograd.grad(loss, features, retain_graph=True, allow_unused=True)
            _flat_grads(grads, features, out[i])
        return out  # never averaged across ranks: each rank's z holds different samples

    def write_grads(self, combined: Tensor, base: list[Tensor | None] | None) -> None:
        """Set each shared param's ``.grad`` to ``base + combined`` (its slice of the d-vector).

        ``.grad`` never aliases ``J``: ``combined`` may be a view of ``J`` (an aggregator may
        return one), which the next ``backward`` overwrites; then, or where a gradient is
        already there, it is copied. A ``combined`` of its own (the usual case: ``wᵀJ``, a
        sum) is handed out as views, one per parameter, without a copy.
        """
        assert self.shared is not None
        views = [v for s in self.slices for v in s.split(combined[s.start : s.stop])]
        jac = self._jacobian
        own = combined.is_contiguous() and (
            jac is None or combined.untyped_storage().data_ptr() != jac.untyped_storage().data_ptr()
        )
        for i, (p, v) in enumerate(zip(self.shared, views)):
            if own and p.grad is None and v.dtype == p.dtype and (base is None or base[i] is None):
                p.grad = v.view_as(p)
                continue
            if p.grad is None or p.grad.is_sparse:  # the combination is dense
                p.grad = torch.empty_like(p)
            extra = None if base is None else base[i]
            if extra is not None and extra.is_sparse:
                extra = extra.to_dense()
            if extra is None:
                p.grad.copy_(v)
            else:
                torch.add(extra, v.to(p.dtype), out=p.grad)

    # --- what an engine for sharded parameters (mtl_optim._sharded) does differently --------
    def validate(self, optimizer: Any, features: Any) -> None:
        """Refuse, before anything changes, what this engine cannot serve (nothing here)."""

    def replicated(self, params: list[Tensor]) -> list[Tensor]:
        """The parameters whose gradients the optimizer averages across ranks itself."""
        return params

    def finite_inputs(self, tensors: list[Tensor]) -> list[Tensor]:
        """The tensors the optimizer's finiteness check looks at (these, unchanged)."""
        return tensors

    def row_weights(self, agg: Any, jacobian: Tensor) -> Tensor:
        """A weighted aggregator's weights for ``J``."""
        return agg.weights(jacobian)

    def aggregate(self, agg: Any, jacobian: Tensor) -> Tensor:
        """An aggregator's direction for ``J``."""
        return agg(jacobian)

    def transform(self, agg: Any, jacobian: Tensor) -> Tensor:
        """An aggregator's per-task edited rows for ``J``."""
        return agg.transform(jacobian)

    def to_checkpoint(self, mtl: dict[str, Any], param_groups: Sequence[dict]) -> dict[str, Any]:
        """The optimizer's ``"mtl"`` checkpoint entry as saved (unchanged here)."""
        return mtl

    def from_checkpoint(self, mtl: dict[str, Any], param_groups: Sequence[dict]) -> dict[str, Any]:
        """A saved ``"mtl"`` entry as the optimizer loads it (unchanged here)."""
        return mtl
