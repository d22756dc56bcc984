r"""SCD: Sequential Cooperative Distillation.

Feng, Yao, Xie, Huang & Chen, *Sequential Cooperative Distillation for Imbalanced Multi-Task
Learning*, J. Comput. Sci. Technol. 39(5):1094–1106, 2024, doi
`10.1007/s11390-024-2264-z <https://doi.org/10.1007/s11390-024-2264-z>`_. Only the abstract
was available; everything beyond it is our design (see the class docstring).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Literal, get_args

import torch
from torch import Tensor, nn

from .._validation import check_indices, check_int, check_partition
from ._scd_warmup import SIMILARITIES, Blocks, Similarity, WarmUpMeasurements

__all__ = ["SequentialCooperativeDistillation"]

Decay = Literal["linear", "drop", "keep"]
DECAYS = get_args(Decay)


class SequentialCooperativeDistillation(WarmUpMeasurements):
    r"""SCD: distil single-task teachers into the multi-task student block by block, from the
    most complex block of similar tasks to the simplest (see
    docs/methods/distillation.md, "Sequential cooperative distillation").

    Feng et al., *Sequential Cooperative Distillation for Imbalanced Multi-Task Learning*,
    JCST 39(5), 2024. The abstract fixes four things: task similarity is measured and similar
    tasks are grouped into **blocks**; the blocks are queued by a task-complexity indicator;
    distillation runs **block by block from complex to simple**; it wraps an existing MTL
    setup. **Everything else is our design** (unverified against the paper), chosen as follows.

    1. **Warm-up.** Epochs :math:`[0, s_0)` (``warmup_epochs``) train the plain MTL model, with
       no distillation, while :meth:`observe` measures similarity and complexity.
    2. **Similarity** :math:`S` (``similarity=``), the running mean over every warm-up
       observation, as TAG averages its affinities (see docs/methods/grouping.md,
       "Lookahead affinity"):

       * ``"gradient"``: the cosine :math:`\cos(g_i, g_j)` of the per-task gradients of the
         shared parameters, from ``observe(jacobian=J)`` (your ``(K, d)`` rows) or from
         ``observe(losses=..., shared=params)`` (computed by
         :class:`~mtl_optim.engine.TaskGradients`: K extra reverse passes with
         ``retain_graph``, so your own backward still works);
       * ``"affinity"``: any ``(K, K)`` matrix passed as ``observe(affinity=A)``, e.g. TAG's
         lookahead affinity (``grouping.TaskAffinity``), :math:`A_{ij}` the effect of task
         :math:`j`'s step on task :math:`i`'s loss.
    3. **Blocks**: average-linkage agglomerative clustering of :math:`\tfrac12(S + S^\top)`,
       merging while the best linkage exceeds ``threshold`` (0: a task joins a block only if
       its gradients or its steps help the block's on average), or down to exactly
       ``n_blocks``; or ``grouping(S)``, any callable returning a partition of the tasks, e.g.
       ``lambda a: mtl_optim.grouping.select_groups(a, 2).groups`` when its groups are
       disjoint; or ``blocks=`` given.
    4. **Complexity** of task :math:`i`: :math:`c_i = \bar L^{MTL}_i / \bar L^{STL}_i`, the
       ratio of the MTL student's mean loss to its teacher's on the same batches
       (``observe(losses=..., stl_losses=...)``), averaged over the **last** warm-up epoch that
       has observations (earlier epochs are discarded, so the ratio describes the model after
       the warm-up); or ``complexity=`` given (e.g. 1 − each teacher's validation metric).
       A block's complexity is its tasks' mean; the queue orders the blocks by descending
       complexity (ties: the lower block index first); or ``order=`` given.
    5. **Stages.** The :math:`B` blocks get consecutive stages
       :math:`[s_k, s_{k+1})`, :math:`s_B = E` (``total_epochs``); by default
       :math:`s_k = s_0 + \lfloor k (E - s_0) / B \rfloor`, or ``stage_boundaries`` =
       :math:`(s_0, \dots, s_{B-1})`.
    6. **Weights.** At epoch :math:`e` in stage :math:`k` the tasks of the :math:`k`-th block
       of the queue have weight 1, blocks later in the queue 0, and a block :math:`j < k`
       whose stage ended at :math:`s_{j+1}` keeps (``decay=``) ``"linear"``:
       :math:`\max(0, 1 - (e - s_{j+1}) / (E - s_{j+1}))`, the linear annealing of URL
       started at the end of its stage; ``"drop"``: 0; ``"keep"``: 1. Task :math:`t`'s term is
       its weight times ``base``'s term :math:`\lambda_t D_t`; teachers of weight-0 tasks do
       not run. The supervised losses are never touched: add the returned ``(K,)`` terms to
       them.

    The schedule is built by :meth:`step` at the first epoch :math:`\ge s_0` (or by
    :meth:`build`); with ``blocks`` and ``order`` (or ``complexity``) given, at once. The loop::

        scd = SequentialCooperativeDistillation(
            AdaptorDistillation(teachers, channels=[128]), total_epochs=E, warmup_epochs=2)
        opt = mtl_optim.MTLOptimizer(
            [{"params": model.parameters()}, {"params": scd.parameters(), "lr": 1e-2}], lr=1e-3)
        for epoch in range(E):
            scd.step(epoch)
            for x, ys in loader:
                preds, feats = model(x)
                losses = [crit(p, y) for p, y in zip(preds, ys)]
                if scd.measuring:
                    with torch.no_grad():
                        stl = [crit(p, y) for p, y in zip(teacher_preds(x), ys)]
                    scd.observe(losses=losses, shared=model.trunk.parameters(), stl_losses=stl)
                opt.zero_grad()
                opt.backward(torch.stack(losses) + scd(feats, x))
                opt.step()

    :meth:`observe` is a no-op once the schedule is built. :meth:`state_dict` holds the
    adaptors, the epoch, the measurements and the schedule.

    Deviation from our first sketch ``(blocks, order, stage_boundaries,
    base=AdaptorDistillation)``: ``base`` is a built module (it needs teachers and channels),
    and blocks, order and boundaries are optional (measured when not given).

    Args:
        base: the per-task distillation: a module with ``num_tasks`` whose call accepts
            ``tasks=`` and returns ``(K,)`` terms (:class:`AdaptorDistillation`,
            :class:`UniversalRepresentationLoss`). Its ``step(epoch)`` is called by
            :meth:`step`.
        total_epochs: :math:`E`.
        warmup_epochs: :math:`s_0` (default ``stage_boundaries[0]``, else 1).
        blocks: a fixed partition of the tasks (skips the similarity measurement).
        order: the queue, a permutation of the block indices (needs ``blocks``).
        stage_boundaries: the first epoch of each stage, increasing, one per block.
        complexity: fixed per-task complexities (skips the loss measurement).
        similarity: ``"gradient"`` or ``"affinity"``.
        threshold: the linkage above which blocks merge.
        n_blocks: merge down to this many blocks instead of using ``threshold``.
        grouping: ``f(S) -> blocks`` replacing the clustering.
        decay: ``"linear"``, ``"drop"`` or ``"keep"``.
        eps: floor under the teachers' mean loss in the complexity ratio.
    """

    def __init__(
        self,
        base: nn.Module,
        total_epochs: int,
        *,
        warmup_epochs: int | None = None,
        blocks: Sequence[Sequence[int]] | None = None,
        order: Sequence[int] | None = None,
        stage_boundaries: Sequence[int] | None = None,
        complexity: Sequence[float] | None = None,
        similarity: Similarity = "gradient",
        threshold: float = 0.0,
        n_blocks: int | None = None,
        grouping: Callable[[Tensor], Sequence[Sequence[int]]] | None = None,
        decay: Decay = "linear",
        eps: float = 1e-12,
    ) -> None:
        super().__init__()
        k = getattr(base, "num_tasks", None)
        if not isinstance(base, nn.Module) or isinstance(k, bool) or not isinstance(k, int):
            raise TypeError(
                "base must be a distillation nn.Module with an int num_tasks (e.g. "
                f"AdaptorDistillation), got {type(base).__name__}"
            )
        self.base = base
        self.num_tasks = k
        self.total_epochs = check_int("total_epochs", total_epochs, 1)
        self._blocks_given = None if blocks is None else check_partition("blocks", blocks, k)
        if order is not None:
            if self._blocks_given is None:
                raise ValueError("order indexes the blocks: give blocks= with it")
            order = tuple(check_indices("order", order, len(self._blocks_given), permutation=True))
        self._order_given = order
        if stage_boundaries is not None:
            stage_boundaries = tuple(check_int("stage boundary", s, 0) for s in stage_boundaries)
            if not stage_boundaries or any(
                a >= b for a, b in zip(stage_boundaries, stage_boundaries[1:])
            ):
                raise ValueError(f"stage_boundaries must increase, got {stage_boundaries!r}")
            if stage_boundaries[-1] >= self.total_epochs:
                raise ValueError(
                    f"every stage must start before total_epochs={total_epochs}, got "
                    f"{stage_boundaries!r}"
                )
            if warmup_epochs is not None and warmup_epochs != stage_boundaries[0]:
                raise ValueError(
                    f"warmup_epochs={warmup_epochs} but stage_boundaries starts at "
                    f"{stage_boundaries[0]}"
                )
            warmup_epochs = stage_boundaries[0]
        self._boundaries_given = stage_boundaries
        self.warmup_epochs = check_int(
            "warmup_epochs", 1 if warmup_epochs is None else warmup_epochs, 0
        )
        if self.warmup_epochs >= self.total_epochs:
            raise ValueError(f"warmup_epochs must be < total_epochs={total_epochs}")
        given = None
        if complexity is not None:
            given = torch.tensor([float(c) for c in complexity], dtype=torch.float64)
            if given.numel() != k or not torch.isfinite(given).all():
                raise ValueError(f"complexity must be {k} finite values, got {given.tolist()}")
        self._complexity_given = given
        if similarity not in SIMILARITIES:
            raise ValueError(f"similarity must be one of {SIMILARITIES}, got {similarity!r}")
        self.similarity = similarity
        if not (isinstance(threshold, (int, float)) and math.isfinite(threshold)):
            raise ValueError(f"threshold must be a finite number, got {threshold!r}")
        self.threshold = float(threshold)
        if n_blocks is not None and not 1 <= check_int("n_blocks", n_blocks, 1) <= k:
            raise ValueError(f"n_blocks must be in [1, {k}], got {n_blocks}")
        if grouping is not None and not callable(grouping):
            raise TypeError(f"grouping must be callable, got {grouping!r}")
        if grouping is not None and n_blocks is not None:
            raise ValueError("give n_blocks or grouping, not both")
        self.n_blocks, self.grouping = n_blocks, grouping
        if decay not in DECAYS:
            raise ValueError(f"decay must be one of {DECAYS}, got {decay!r}")
        self.decay = decay
        if not (isinstance(eps, (int, float)) and eps > 0):
            raise ValueError(f"eps must be positive, got {eps!r}")
        self.eps = float(eps)

        self.epoch = 0
        self._sim_sum: Tensor | None = None
        self._sim_count = 0
        self._loss_sums: tuple[Tensor, Tensor] | None = None  # (MTL, STL) of one epoch
        self._loss_count = 0
        self._loss_epoch: int | None = None
        self.blocks: Blocks | None = None
        self.order: tuple[int, ...] | None = None
        self.stage_boundaries: tuple[int, ...] | None = None
        self.complexity: Tensor | None = None
        if not self._needs_similarity and not self._needs_complexity:
            self.build()
        elif self.warmup_epochs == 0:
            raise ValueError(
                "warmup_epochs=0 leaves no time to measure: give blocks and order (or "
                "complexity), or a warm-up"
            )

    # --- the schedule -----------------------------------------------------------------------
    def _schedule(self) -> tuple[Blocks, tuple[int, ...], tuple[int, ...]]:
        """``(blocks, order, stage_boundaries)`` of the built schedule."""
        if self.blocks is None or self.order is None or self.stage_boundaries is None:
            raise RuntimeError("the schedule is not built yet (see step() and build())")
        return self.blocks, self.order, self.stage_boundaries

    def build(self) -> None:
        """Fix blocks, queue and stages from what was given and observed."""
        blocks = self._blocks_given or self._measured_blocks()
        if self._order_given is not None:
            order = self._order_given
        else:
            self.complexity = self._task_complexity(len(blocks))
            order = self._queue(blocks, self.complexity)
        if self._boundaries_given is not None:
            if len(self._boundaries_given) != len(blocks):
                raise ValueError(
                    f"stage_boundaries has {len(self._boundaries_given)} entries for "
                    f"{len(blocks)} blocks {[list(b) for b in blocks]}"
                )
            bounds = self._boundaries_given
        else:
            span = self.total_epochs - self.warmup_epochs
            if span < len(blocks):
                raise ValueError(
                    f"{len(blocks)} blocks need at least one epoch each after the warm-up, but "
                    f"only {span} remain"
                )
            bounds = tuple(self.warmup_epochs + i * span // len(blocks) for i in range(len(blocks)))
        self.blocks, self.order, self.stage_boundaries = blocks, tuple(order), bounds

    @staticmethod
    def _queue(blocks: Blocks, complexity: Tensor | None) -> tuple[int, ...]:
        if complexity is None:
            return (0,)
        score = [complexity[list(b)].mean().item() for b in blocks]
        return tuple(sorted(range(len(blocks)), key=lambda b: (-score[b], b)))

    def step(self, epoch: int) -> None:
        """Enter ``epoch`` (0-based): builds the schedule at the end of the warm-up and passes
        the epoch on to ``base.step`` where it has one."""
        self.epoch = check_int("epoch", epoch, 0)
        base_step = getattr(self.base, "step", None)
        if callable(base_step):
            base_step(epoch)
        if not self.built and epoch >= self.warmup_epochs:
            self.build()

    def stage(self, epoch: int | None = None) -> int | None:
        """The stage (position in the queue) at ``epoch`` (default the current), or ``None``
        in the warm-up."""
        e = self.epoch if epoch is None else epoch
        if not self.built:
            return None
        bounds = self._schedule()[2]
        if e < bounds[0]:
            return None
        return sum(1 for s in bounds if s <= e) - 1

    def weights(self, epoch: int | None = None) -> Tensor:
        """The ``(K,)`` float64 per-task distillation weights at ``epoch`` (default current)."""
        e = self.epoch if epoch is None else check_int("epoch", epoch, 0)
        w = torch.zeros(self.num_tasks, dtype=torch.float64)
        now = self.stage(e)
        if now is None:
            return w
        blocks, order, bounds = self._schedule()
        ends = (*bounds[1:], self.total_epochs)
        for k, b in enumerate(order[: now + 1]):
            if k == now or self.decay == "keep":
                value = 1.0
            elif self.decay == "drop":
                value = 0.0
            else:
                value = max(0.0, 1.0 - (e - ends[k]) / (self.total_epochs - ends[k]))
            w[list(blocks[b])] = value
        return w

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        """``weights() * base(*args, tasks=<tasks of nonzero weight>, **kwargs)``: ``(K,)``."""
        if "tasks" in kwargs:
            raise TypeError("SCD chooses the tasks itself; do not pass tasks=")
        w = self.weights()
        terms = self.base(*args, tasks=[t for t in range(self.num_tasks) if w[t] > 0], **kwargs)
        return terms * w.to(terms)

    # --- checkpointing ------------------------------------------------------------------------
    def get_extra_state(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "similarity_sum": self._sim_sum,
            "similarity_count": self._sim_count,
            "loss_sums": self._loss_sums,
            "loss_count": self._loss_count,
            "loss_epoch": self._loss_epoch,
            "blocks": self.blocks,
            "order": self.order,
            "stage_boundaries": self.stage_boundaries,
            "complexity": self.complexity,
        }

    def set_extra_state(self, state: dict[str, Any]) -> None:
        blocks = state["blocks"]
        self.blocks = None if blocks is None else check_partition("blocks", blocks, self.num_tasks)
        self.order = None if state["order"] is None else tuple(state["order"])
        bounds = state["stage_boundaries"]
        self.stage_boundaries = None if bounds is None else tuple(bounds)
        self.complexity = state["complexity"]
        self.epoch = check_int("epoch", state["epoch"], 0)
        self._sim_sum, self._sim_count = state["similarity_sum"], state["similarity_count"]
        self._loss_sums, self._loss_count = state["loss_sums"], state["loss_count"]
        self._loss_epoch = state["loss_epoch"]

    def __repr__(self) -> str:
        n = self.n_blocks
        parts = [
            f"base={self.base!r}",
            f"total_epochs={self.total_epochs}",
            f"warmup_epochs={self.warmup_epochs}",
            f"similarity={self.similarity!r}",
            f"threshold={self.threshold!r}" if self.n_blocks is None else f"n_blocks={n}",
            f"decay={self.decay!r}",
        ]
        if self.built:
            blocks, order, bounds = self._schedule()
            parts += [
                f"blocks={[list(b) for b in blocks]}",
                f"order={list(order)}",
                f"stage_boundaries={list(bounds)}",
            ]
        return f"SequentialCooperativeDistillation({', '.join(parts)})"
