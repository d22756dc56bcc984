r"""SCD's warm-up: the task similarity and complexity measured before the schedule is built.

The mixin below holds the measuring half of
:class:`~mtl_optim.distill.SequentialCooperativeDistillation` (the class docstring there says
what is measured and why); the schedule, the weights and the checkpointing are in ``_scd.py``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Literal, get_args

import torch
from torch import Tensor, nn

from .._validation import check_partition
from ..engine import TaskGradients, as_losses

__all__ = ["SIMILARITIES", "Blocks", "Similarity", "WarmUpMeasurements"]

Similarity = Literal["gradient", "affinity"]
SIMILARITIES = get_args(Similarity)

Blocks = tuple[tuple[int, ...], ...]


def _cosine(jacobian: Tensor) -> Tensor:
    r"""``(K, K)`` cosine similarities :math:`g_i \cdot g_j / (\lVert g_i\rVert \lVert
    g_j\rVert)` of the rows, in float64; a zero row has similarity 0 to every task."""
    j = jacobian.detach().to(torch.float64)
    norms = j.norm(dim=1)
    outer = norms[:, None] * norms[None, :]
    gram = j @ j.T
    return torch.where(outer > 0, gram / torch.where(outer > 0, outer, 1.0), 0.0).cpu()


def _agglomerate(similarity: Tensor, threshold: float, n_blocks: int | None) -> list[list[int]]:
    r"""Average-linkage agglomerative clustering of the tasks on the symmetrised similarity
    :math:`\tfrac12(S + S^\top)`.

    Repeatedly merges the two blocks with the largest mean pairwise similarity (ties: the pair
    that comes first in the order of the blocks' smallest tasks), while that linkage is above
    ``threshold``; with ``n_blocks``, merges until exactly ``n_blocks`` remain instead. Blocks
    come out sorted, ordered by their smallest task.
    """
    s = 0.5 * (similarity + similarity.T)
    blocks = [[i] for i in range(s.shape[0])]
    while len(blocks) > (n_blocks or 1):
        best, pair = -math.inf, (0, 1)
        for a in range(len(blocks)):
            for b in range(a + 1, len(blocks)):
                link = s[blocks[a]][:, blocks[b]].mean().item()
                if link > best:
                    best, pair = link, (a, b)
        if n_blocks is None and not best > threshold:
            break
        a, b = pair
        blocks[a] = sorted(blocks[a] + blocks.pop(b))
    return blocks


class WarmUpMeasurements(nn.Module):
    """The warm-up of :class:`~mtl_optim.distill.SequentialCooperativeDistillation`: records
    the similarity and the losses of the observed batches and turns them into blocks and
    per-task complexities. The attributes are set by the subclass's constructor."""

    num_tasks: int
    epoch: int
    similarity: Similarity
    threshold: float
    n_blocks: int | None
    grouping: Callable[[Tensor], Sequence[Sequence[int]]] | None
    eps: float
    blocks: Blocks | None
    _blocks_given: Blocks | None
    _order_given: Sequence[int] | None
    _complexity_given: Tensor | None
    _sim_sum: Tensor | None
    _sim_count: int
    _loss_sums: tuple[Tensor, Tensor] | None
    _loss_count: int
    _loss_epoch: int | None

    # --- measuring ------------------------------------------------------------------------
    @property
    def built(self) -> bool:
        return self.blocks is not None

    @property
    def measuring(self) -> bool:
        """True while :meth:`observe` still records (the schedule is not built yet)."""
        return not self.built

    @property
    def _needs_similarity(self) -> bool:
        return self._blocks_given is None

    @property
    def _needs_complexity(self) -> bool:
        if self._order_given is not None or self._complexity_given is not None:
            return False
        return self._blocks_given is None or len(self._blocks_given) > 1

    @property
    def similarity_matrix(self) -> Tensor | None:
        """The mean ``(K, K)`` similarity observed so far (``None`` before any)."""
        return None if self._sim_sum is None else self._sim_sum / self._sim_count

    def observe(
        self,
        *,
        losses: Sequence[Tensor] | Tensor | None = None,
        shared: Iterable[Tensor] | None = None,
        jacobian: Tensor | None = None,
        affinity: Tensor | None = None,
        stl_losses: Sequence[Tensor] | Tensor | None = None,
    ) -> None:
        """Record one warm-up batch; a no-op once the schedule is built.

        Args:
            losses: the student's K supervised losses of this batch (for the complexity ratio,
                and for the gradients with ``shared``).
            shared: the shared parameters: the per-task gradients of ``losses`` are computed
                here (``similarity="gradient"``; the graph is retained).
            jacobian: or the ``(K, d)`` per-task gradients themselves.
            affinity: a ``(K, K)`` similarity (``similarity="affinity"``).
            stl_losses: the teachers' K losses on the same batch (needs ``losses``).
        """
        if self.built:
            return
        k = self.num_tasks
        if self.similarity == "gradient":
            if affinity is not None:
                raise ValueError("similarity='gradient' takes jacobian= or shared=, not affinity=")
            if jacobian is not None and shared is not None:
                raise ValueError("pass jacobian= or shared=, not both")
            if shared is not None and losses is None:
                raise ValueError("shared= needs the losses= to differentiate")
            if self._needs_similarity and shared is not None and losses is not None:
                jacobian = self._jacobian(losses, shared)
            if self._needs_similarity and jacobian is not None:
                if jacobian.dim() != 2 or jacobian.shape[0] != k:
                    raise ValueError(
                        f"jacobian must be (K={k}, d), got shape {tuple(jacobian.shape)}"
                    )
                self._add_similarity(_cosine(jacobian))
        else:
            if jacobian is not None or shared is not None:
                raise ValueError("similarity='affinity' takes affinity=, not jacobian/shared")
            if self._needs_similarity and affinity is not None:
                a = torch.as_tensor(affinity).detach().to(device="cpu", dtype=torch.float64)
                if a.shape != (k, k):
                    raise ValueError(f"affinity must be ({k}, {k}), got shape {tuple(a.shape)}")
                self._add_similarity(a)
        if stl_losses is not None:
            if losses is None:
                raise ValueError("stl_losses= needs the student's losses= of the same batch")
            if self._needs_complexity:
                self._add_losses(losses, stl_losses)

    def _jacobian(self, losses: Sequence[Tensor] | Tensor, shared: Iterable[Tensor]) -> Tensor:
        items = as_losses(losses, self.num_tasks)
        params = [p for p in shared if p.requires_grad]
        if not params:
            raise ValueError("shared= holds no parameter that requires grad")
        engine = TaskGradients()
        engine.setup(items, [{"params": params}], params)
        return engine.compute(items, retain_graph=True)

    def _add_similarity(self, s: Tensor) -> None:
        if not torch.isfinite(s).all():
            raise ValueError("the observed similarity has NaN or infinite entries")
        self._sim_sum = s.clone() if self._sim_sum is None else self._sim_sum + s
        self._sim_count += 1

    def _add_losses(
        self, losses: Sequence[Tensor] | Tensor, stl: Sequence[Tensor] | Tensor
    ) -> None:
        def values(items: Sequence[Tensor] | Tensor) -> Tensor:
            checked = as_losses(items, self.num_tasks, differentiable=False)
            return torch.stack([v.detach().to("cpu", torch.float64) for v in checked])

        mtl, ref = values(losses), values(stl)
        if self._loss_sums is None or self._loss_epoch != self.epoch:
            self._loss_sums, self._loss_count, self._loss_epoch = (mtl, ref), 0, self.epoch
        else:
            self._loss_sums = (self._loss_sums[0] + mtl, self._loss_sums[1] + ref)
        self._loss_count += 1

    def _measured_blocks(self) -> Blocks:
        s = self.similarity_matrix
        if s is None:
            raise ValueError(
                "no similarity was observed in the warm-up: call observe(...) on warm-up batches "
                "or give blocks="
            )
        if self.grouping is not None:
            return tuple(
                sorted(check_partition("grouping(S)", self.grouping(s.clone()), self.num_tasks))
            )
        return check_partition(
            "blocks", _agglomerate(s, self.threshold, self.n_blocks), self.num_tasks
        )

    def _task_complexity(self, n_blocks: int) -> Tensor | None:
        if self._complexity_given is not None:
            return self._complexity_given
        if n_blocks == 1:
            return None
        if self._loss_sums is None:
            raise ValueError(
                "no losses were observed in the warm-up: call observe(losses=..., "
                "stl_losses=...) or give complexity= or order="
            )
        mtl, stl = (v / self._loss_count for v in self._loss_sums)
        return mtl / stl.clamp(min=self.eps)
