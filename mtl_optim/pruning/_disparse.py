r"""DiSparse: disentangled pruning and sparse training of multi-task models (Sun et al., 2022).

Sun, Hassani, Wang, Huang & Shi, *DiSparse: Disentangled Sparsification for Multitask Model
Compression*, CVPR 2022, arXiv `2206.04662 <https://arxiv.org/abs/2206.04662>`_; official code
``SHI-Labs/DiSparse-Multitask-Model-Compression``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.utils.hooks import RemovableHandle

from ._dynamic import DynamicSparse
from ._masks import Arbiter, _as_modules, _check_density, _Layer, _prunable
from ._scores import Criterion

__all__ = ["DiSparse"]


class DiSparse(DynamicSparse):
    r"""DiSparse: per-task importance, one keep-mask per task, and an arbiter for shared weights.

    Sun, Hassani, Wang, Huang & Shi, *DiSparse: Disentangled Sparsification for Multitask
    Model Compression*, CVPR 2022, arXiv `2206.04662 <https://arxiv.org/abs/2206.04662>`_.
    Each task :math:`k` is scored as if it were trained alone on its own parameters
    :math:`\Theta_k = \Theta_c \cup \Theta^p_k` (the shared weights and its head); each task
    keeps its top :math:`\lfloor\rho|\Theta_k|\rfloor` weights under one global threshold over
    all its layers, which gives its head's mask, and an element-wise **arbiter** merges the
    shared parts. The paper's arbiter is unanimous pruning: a shared weight is pruned only if
    every task would prune it, i.e. the shared mask is the **union** of the tasks' keep-masks.

    Only the weights of ``Linear`` and convolution layers are pruned (never biases or
    normalisation layers). Masks are applied with ``torch.nn.utils.parametrize``
    (:math:`W = \theta \odot m`), so the model stays a plain ``nn.Module``, pruned weights are
    exactly 0 in every forward and after every optimizer step, and ``model.state_dict()``
    holds ``…parametrizations.weight.original`` and the masks (``…weight.0.mask``).
    The parameter object :math:`\theta` is the original ``weight``, so an optimizer built
    before or after :meth:`apply` trains it.

    **Static pruning at initialisation** (:meth:`scores`, :meth:`masks`, :meth:`apply`, or
    :meth:`prune` for all three). Importance of weight :math:`\theta` for task :math:`k`
    over the scored batches :math:`b`:

    .. math::
        s_k^{snip}(\theta) = \sum_b \bigl|\theta\, \partial L_k^{(b)} / \partial\theta\bigr|,
        \qquad s_k^{grad\_x\_sq}(\theta) = \theta^2 \sum_b
            \bigl|\partial L_k^{(b)} / \partial\theta\bigr|,
        \qquad s^{magnitude}(\theta) = |\theta|.

    The per-task gradients are the rows of ``MTLOptimizer``'s per-task gradient matrix for the
    shared weights and each head's own gradient, read through
    ``MTLOptimizer.register_gradient_hook`` (no backward of DiSparse's own). Because each task
    thresholds only its own scores, a task weight :math:`\lambda_k > 0` changes no mask.

    **Dynamic sparse training** (:meth:`dynamic`, RigL-like): Erdős–Rényi-kernel layer
    densities (:func:`erk_densities`, power 0.9) on random masks; every ``every`` steps while
    :math:`t <` ``end`` × ``total_steps``, each layer is magnitude-pruned to
    :math:`d_l (1 - p_t)` with :math:`p_t = \tfrac{p}{2}(1 + \cos(\pi t / T_{end}))`, then regrown
    to :math:`d_l` with the pruned positions of largest :math:`|\partial L_k/\partial W|`: a
    head layer takes its task's picks, a shared layer the union over tasks (disentangled
    growth); grown weights start at 0. At :math:`T_{end}` a final magnitude prune brings every
    layer to its ERK density and the masks stay fixed.

    Decisions:

    * Scores are taken on the actual initial weights (the official static code scores a
      re-initialised copy, so its mask ranks other weights than the ones trained).
    * The grow gradient is the dense gradient at the masked (zeroed) weights, as RigL's; the
      official code restores stale pre-prune values first. It is taken on the training batch
      of each update step: for that one batch the mask's backward is straight-through, so
      the optimizer's per-task gradients (and an aggregator combining them) see dense rows,
      and the gradients of pruned weights are zeroed again before the optimizer step.
    * The keep ratio :math:`\rho` is found by bisection so that the final global density
      (over the prunable weights) meets the target exactly (``round(density × N)``
      weights); the official code hand-calibrates :math:`\rho` per dataset. A task keeps
      exactly its top :math:`\lfloor\rho|\Theta_k|\rfloor` scores (ties broken by
      position), not every score equal to the threshold; where several tasks' counts step up
      at the same :math:`\rho` (heads of equal size), they step one at a time in task order,
      each step keeping at most one more weight.
    * Roles come from the explicit ``shared``/``heads`` modules (the official code reads module
      names and supports at most 5 tasks). The union keeps shared layers above their dynamic
      target between updates (the next prune absorbs it); :meth:`layer_densities` reports it.
    * Arbiters ``"intersection"`` (keep what every task keeps) and ``"vote"`` (what more than
      half of the tasks keep) are ours, for ablations.

    Args:
        model: the multi-task model (for the layer names in masks and state dicts).
        shared: the shared trunk, a module or a sequence of modules of ``model``.
        heads: per task, the task's private module(s). A head must be reached by its task's
            loss only.
        exclude: layers that are never pruned (e.g. the first convolution).
    """

    def __init__(
        self,
        model: nn.Module,
        shared: nn.Module | Sequence[nn.Module],
        heads: Sequence[nn.Module | Sequence[nn.Module]],
        *,
        exclude: Iterable[nn.Module] = (),
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if isinstance(heads, nn.Module) or not isinstance(heads, Sequence) or not heads:
            raise TypeError("heads must be a non-empty sequence with one entry per task")
        names = {id(m): n for n, m in model.named_modules()}
        skip = {id(m) for m in exclude}
        owner: dict[int, int | None] = {}
        roles: list[tuple[int | None, list[nn.Module]]] = [(None, _as_modules(shared, "shared"))]
        roles += [(k, _as_modules(h, f"heads[{k}]")) for k, h in enumerate(heads)]
        self.layers: list[_Layer] = []
        for task, roots in roles:
            for root in roots:
                if id(root) not in names:
                    raise ValueError(
                        f"{type(root).__name__} passed as shared/heads is not in model"
                    )
                for m in root.modules():
                    if not _prunable(m) or id(m) in skip:
                        continue
                    if id(m) in owner:
                        if owner[id(m)] != task:
                            raise ValueError(
                                f"layer {names[id(m)]!r} is given to two roles (shared or two "
                                "heads); each prunable layer belongs to exactly one"
                            )
                        continue
                    owner[id(m)] = task
                    self.layers.append(_Layer(names[id(m)], m, task))
        if not self.layers:
            raise ValueError("no Linear or convolution layer to prune in shared/heads")
        self.model = model
        self.num_tasks = len(heads)
        self._shared_roots = roles[0][1]
        self._schedule: dict[str, Any] | None = None
        self._targets: dict[str, int] | None = None
        self._handles: list[RemovableHandle] = []
        self._grad_handle: RemovableHandle | None = None
        self._grads: list[dict[str, Tensor]] | None = None
        #: The keep ratio rho and the per-task keep counts of the last :meth:`masks`.
        self.rho: float | None = None
        self.keep_counts: list[int] | None = None

    # --- pruning in one call, and its end -------------------------------------------------
    def prune(
        self,
        density: float,
        batches: Iterable[Any] | None = None,
        loss_fn: Callable[[Any], Sequence[Tensor]] | None = None,
        *,
        criterion: Criterion = "snip",
        arbiter: Arbiter = "union",
        optimizer: Any = None,
    ) -> dict[str, Tensor]:
        """:meth:`scores`, :meth:`masks` and :meth:`apply` in one call; returns the masks."""
        _check_density(density)
        scores = self.scores(batches, loss_fn, criterion=criterion, optimizer=optimizer)
        masks = self.masks(scores, density, arbiter=arbiter)
        self.apply(masks)
        return masks

    def remove(self) -> None:
        """Make the pruning permanent: drop the parametrizations, leaving the masked values in
        the (same) weight parameters. Dynamic training ends: its hooks are removed."""
        self.detach()
        self._schedule = self._targets = None
        self._grads = None
        for lyr in self.layers:
            if parametrize.is_parametrized(lyr.module, "weight"):
                parametrize.remove_parametrizations(lyr.module, "weight", leave_parametrized=True)

    # --- checkpointing ----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The masks and, for dynamic training, the schedule and the ERK targets."""
        return {
            "masks": {n: m.cpu() for n, m in self.current_masks().items()},
            "schedule": None if self._schedule is None else dict(self._schedule),
            "targets": None if self._targets is None else dict(self._targets),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Apply the saved masks (registering the parametrizations on a fresh model, so that
        ``model.load_state_dict`` finds them) and restore the schedule. Call before loading
        the model's own state dict; for dynamic training, :meth:`attach` afterwards."""
        if not isinstance(state, dict) or not {"masks", "schedule", "targets"} <= set(state):
            raise ValueError("not a DiSparse state_dict: needs 'masks', 'schedule', 'targets'")
        self.apply({n: m.clone() for n, m in state["masks"].items()})
        self._schedule = None if state["schedule"] is None else dict(state["schedule"])
        self._targets = None if state["targets"] is None else dict(state["targets"])
        self._grads = None
        if self._handles:
            self._disarm()
            self._arm()

    def __repr__(self) -> str:
        shared = sum(1 for lyr in self.layers if lyr.task is None)
        return (
            f"DiSparse(num_tasks={self.num_tasks}, layers={len(self.layers)} "
            f"({shared} shared), density={self.density():.4f})"
        )
