r"""DiSparse's scoring: per-task importance of every prunable weight, from the per-task
gradients that ``MTLOptimizer`` computes (see :class:`~mtl_optim.pruning.DiSparse`)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal, get_args

import torch
from torch import Tensor, nn

from .._gradient_info import GradientInfo
from ._masks import LayerMasks

__all__ = ["CRITERIA", "Criterion", "TaskScores"]

Criterion = Literal["snip", "magnitude", "grad_x_sq"]
CRITERIA = get_args(Criterion)


class TaskScores(LayerMasks):
    """Scores the prunable weights of :class:`~mtl_optim.pruning.DiSparse` for each task. The
    attributes are set by the subclass's constructor."""

    model: nn.Module
    _shared_roots: list[nn.Module]

    # --- scoring --------------------------------------------------------------------------
    def _default_optimizer(self) -> Any:
        from ..optimizer import MTLOptimizer  # the package imports this module

        shared = {id(p): p for root in self._shared_roots for p in root.parameters()}
        params = [p for p in self.model.parameters() if p.requires_grad]
        return MTLOptimizer(params, torch.optim.SGD, lr=0.0, shared=list(shared.values()))

    def _per_task_grads(self, info: GradientInfo) -> list[dict[str, Tensor]]:
        r""":math:`|\partial o_k / \partial\theta|` of every prunable layer of :math:`\Theta_k`,
        from ``J``'s rows (shared layers) and the heads' ``.grad``."""
        if info.jacobian is None:
            raise ValueError(
                "DiSparse needs the per-task gradient matrix: use route='jacobian' or the "
                "default 'auto' (which forms it for DiSparse's hook), without features="
            )
        k = info.jacobian.shape[0]
        if k != self.num_tasks:
            raise ValueError(f"DiSparse was built with {self.num_tasks} heads, got {k} tasks")
        views = dict(zip((id(p) for p in info.shared), info.per_param(info.jacobian)))
        out: list[dict[str, Tensor]] = [{} for _ in range(k)]
        for lyr in self.layers:
            w = self.weight(lyr)
            if lyr.task is None:
                rows = views.get(id(w))
                if rows is None:
                    raise ValueError(
                        f"shared layer {lyr.name!r} is not a shared parameter of the optimizer "
                        "(pass shared= to MTLOptimizer)"
                    )
                for t in range(k):
                    out[t][lyr.name] = rows[t].abs().to(w.dtype)
            else:
                if id(w) in views:
                    raise ValueError(
                        f"head layer {lyr.name!r} is a shared parameter of the optimizer; a head "
                        "must be reached by its own task only"
                    )
                g = w.grad
                out[lyr.task][lyr.name] = torch.zeros_like(w) if g is None else g.abs()
        return out

    def scores(
        self,
        batches: Iterable[Any] | None = None,
        loss_fn: Callable[[Any], Sequence[Tensor]] | None = None,
        *,
        criterion: Criterion = "snip",
        optimizer: Any = None,
    ) -> list[dict[str, Tensor]]:
        r"""Per-task importance :math:`s_k` of every prunable weight of :math:`\Theta_k`.

        For each batch, ``optimizer.zero_grad(); optimizer.backward(loss_fn(batch))``; the
        per-task gradients are read by a gradient hook. The weights are not updated.

        Args:
            batches: the batches to score on (the official code uses 50); unused by
                ``"magnitude"``.
            loss_fn: ``batch -> K losses``.
            criterion: ``"snip"``, ``"grad_x_sq"`` or ``"magnitude"`` (see the class docstring).
            optimizer: the ``MTLOptimizer`` whose engine computes the per-task gradients.
                Default: a scoring one (plain SGD with lr 0, no aggregator or weighting, the
                ``shared`` modules' parameters as shared), so the raw :math:`L_k` are scored
                and no training state moves. A given optimizer's weighting scales its rows
                (harmless for a constant weight) and its method state advances; its
                gradients are cleared.

        Returns:
            ``scores[k]``: ``{layer name: score}`` over the layers of :math:`\Theta_k`.
        """
        if criterion not in CRITERIA:
            raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
        if criterion == "magnitude":
            return [
                {lyr.name: self.weight(lyr).detach().abs() for lyr in self._layers_of(t)}
                for t in range(self.num_tasks)
            ]
        if batches is None or loss_fn is None:
            raise ValueError(f"criterion={criterion!r} needs batches and loss_fn")
        opt = self._default_optimizer() if optimizer is None else optimizer
        sums: list[dict[str, Tensor]] = [
            {lyr.name: torch.zeros_like(self.weight(lyr)) for lyr in self._layers_of(t)}
            for t in range(self.num_tasks)
        ]
        seen = [0]

        def collect(_: Any, info: GradientInfo) -> None:
            for t, grads in enumerate(self._per_task_grads(info)):
                for name, g in grads.items():
                    sums[t][name] += g
            seen[0] += 1

        handle = opt.register_gradient_hook(collect, needs_jacobian=True)
        try:
            for batch in batches:
                opt.zero_grad()
                opt.backward(loss_fn(batch))
        finally:
            handle.remove()
            opt.zero_grad()
        if seen[0] == 0:
            raise ValueError("no batch was scored (empty batches, or every batch was skipped)")
        out = []
        for t in range(self.num_tasks):
            task_scores = {}
            for lyr in self._layers_of(t):
                theta = self.weight(lyr).detach()
                a = sums[t][lyr.name]
                task_scores[lyr.name] = theta.abs() * a if criterion == "snip" else theta**2 * a
            out.append(task_scores)
        return out
