r"""DiSparse: disentangled pruning and sparse training of multi-task models (Sun et al., 2022).

Sun, Hassani, Wang, Huang & Shi, *DiSparse: Disentangled Sparsification for Multitask Model
Compression*, CVPR 2022, arXiv `2206.04662 <https://arxiv.org/abs/2206.04662>`_; official code
``SHI-Labs/DiSparse-Multitask-Model-Compression``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, cast, get_args

import torch
from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd
from torch.nn.utils import parametrize
from torch.utils.hooks import RemovableHandle

from .._gradient_info import GradientInfo

__all__ = ["DiSparse", "erk_densities"]

Criterion = Literal["snip", "magnitude", "grad_x_sq"]
Arbiter = Literal["union", "intersection", "vote"]
CRITERIA = get_args(Criterion)
ARBITERS = get_args(Arbiter)
#: Bisection steps on the keep ratio (float64: far below one weight's step for d < 1e12).
BISECTION_STEPS = 64


class _KeepMask(nn.Module):
    r"""The parametrization :math:`W = \theta \odot m` of a pruned weight.

    With ``straight_through`` set, the forward value is the same but the gradient reaching
    :math:`\theta` is the dense :math:`\partial L / \partial W` (taken at the masked weights),
    which the grow step of dynamic sparse training ranks.
    """

    mask: Tensor

    def __init__(self, mask: Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask.clone())
        self.straight_through = False

    def forward(self, weight: Tensor) -> Tensor:
        masked = weight * self.mask
        if self.straight_through:
            return masked + (weight - weight.detach()) * ~self.mask
        return masked


@dataclass(frozen=True)
class _Layer:
    name: str
    module: nn.Module
    task: int | None  # None: shared

    @property
    def numel(self) -> int:
        return cast(Tensor, self.module.weight).numel()


def _prunable(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, _ConvNd))


def _as_modules(value: Any, what: str) -> list[nn.Module]:
    if isinstance(value, nn.Module):
        return [value]
    if isinstance(value, Iterable) and not isinstance(value, (str, bytes)):
        mods = list(value)
        if all(isinstance(m, nn.Module) for m in mods):
            return mods
    raise TypeError(f"{what} must be an nn.Module or a sequence of them, got {type(value)}")


def erk_densities(shapes: dict[str, torch.Size], density: float, power: float = 0.9) -> dict:
    r"""Erdős–Rényi-kernel densities (RigL): :math:`d_l = \min(1, \epsilon\, r_l)` with
    :math:`r_l = (\sum_i n_i / \prod_i n_i)^{p}` over the dimensions :math:`n_i` of layer
    :math:`l`, and :math:`\epsilon` chosen so that :math:`\sum_l d_l |l| = d \sum_l |l|`;
    layers whose :math:`\epsilon r_l` exceeds 1 are made dense (the largest first) and
    :math:`\epsilon` re-solved. Returns ``{name: density}``."""
    if not 0 < density <= 1:
        raise ValueError(f"density must be in (0, 1], got {density!r}")
    sizes = {n: math.prod(s) for n, s in shapes.items()}
    raw = {n: (sum(s) / sizes[n]) ** power for n, s in shapes.items()}
    total = sum(sizes.values())
    dense: set[str] = set()
    while True:
        budget = density * total - sum(sizes[n] for n in dense)
        divisor = sum(raw[n] * sizes[n] for n in raw if n not in dense)
        eps = budget / divisor if divisor > 0 else 0.0
        over = [n for n in raw if n not in dense and eps * raw[n] > 1]
        if not over:
            break
        top = max(raw[n] for n in over)
        dense |= {n for n in over if raw[n] == top}
    return {n: 1.0 if n in dense else eps * raw[n] for n in raw}


class DiSparse:
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

    # --- layers ---------------------------------------------------------------------------
    def _layers_of(self, task: int) -> list[_Layer]:
        """:math:`\\Theta_k`: the shared layers, then task ``task``'s head layers."""
        return [lyr for lyr in self.layers if lyr.task is None or lyr.task == task]

    @staticmethod
    def weight(layer: _Layer) -> Tensor:
        r"""The trainable tensor :math:`\theta` of a layer (the original weight)."""
        m: Any = layer.module
        if parametrize.is_parametrized(m, "weight"):
            return m.parametrizations.weight.original
        return m.weight

    @staticmethod
    def _mask_module(layer: _Layer) -> _KeepMask | None:
        m: Any = layer.module
        if parametrize.is_parametrized(m, "weight"):
            for p in m.parametrizations.weight:
                if isinstance(p, _KeepMask):
                    return p
        return None

    def _mask_of(self, layer: _Layer) -> _KeepMask:
        """The mask of a layer that dynamic training has masked."""
        pm = self._mask_module(layer)
        if pm is None:
            raise RuntimeError(f"layer {layer.name!r} lost its mask parametrization")
        return pm

    def current_masks(self) -> dict[str, Tensor]:
        """The keep-mask of every prunable layer (all True where none is applied)."""
        out = {}
        for lyr in self.layers:
            pm = self._mask_module(lyr)
            w = self.weight(lyr)
            out[lyr.name] = (
                pm.mask.clone() if pm is not None else torch.ones_like(w, dtype=torch.bool)
            )
        return out

    def density(self) -> float:
        """The fraction of prunable weights kept."""
        masks = self.current_masks()
        return sum(int(m.sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())

    def layer_densities(self) -> dict[str, float]:
        """The kept fraction of each prunable layer."""
        return {n: float(m.float().mean()) for n, m in self.current_masks().items()}

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
                "DiSparse needs the per-task gradient matrix: use the optimizer's default "
                "route='jacobian' without features="
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

    # --- masks ----------------------------------------------------------------------------
    def masks(
        self, scores: Sequence[dict[str, Tensor]], density: float, *, arbiter: Arbiter = "union"
    ) -> dict[str, Tensor]:
        r"""Keep-masks at global ``density`` from per-task ``scores`` (see the class docstring).

        Args:
            scores: ``scores[k][layer name]`` for every layer of :math:`\Theta_k`.
            density: the target fraction of the prunable weights kept, in (0, 1].
            arbiter: ``"union"`` (the paper), ``"intersection"`` or ``"vote"``.

        Returns:
            ``{layer name: bool mask}`` for every prunable layer.
        """
        _check_density(density)
        if arbiter not in ARBITERS:
            raise ValueError(f"arbiter must be one of {ARBITERS}, got {arbiter!r}")
        if len(scores) != self.num_tasks:
            raise ValueError(f"scores has {len(scores)} tasks, expected {self.num_tasks}")
        shared = [lyr for lyr in self.layers if lyr.task is None]
        d_s = sum(lyr.numel for lyr in shared)
        ranks = [self._ranks(scores, t) for t in range(self.num_tasks)]
        shared_ranks = torch.stack([r[:d_s] for r in ranks])
        head_sorted = [torch.sort(r[d_s:]).values for r in ranks]
        sizes = torch.tensor([len(r) for r in ranks], dtype=torch.float64)
        target = round(density * sum(lyr.numel for lyr in self.layers))

        def shared_keep(kk: Tensor) -> Tensor:
            votes = shared_ranks < kk[:, None]
            if arbiter == "union":
                return votes.any(0)
            if arbiter == "intersection":
                return votes.all(0)
            return votes.sum(0) * 2 > self.num_tasks

        def count(kk: Tensor) -> int:
            heads = sum(
                int(torch.searchsorted(h, kk[t : t + 1])) for t, h in enumerate(head_sorted)
            )
            return int(shared_keep(kk).sum()) + heads

        def counts(rho: float) -> Tensor:
            return torch.floor(rho * sizes).long()

        lo, hi = 0.0, 1.0
        if count(counts(hi)) <= target:
            lo = hi
        else:
            for _ in range(BISECTION_STEPS):
                mid = 0.5 * (lo + hi)
                if count(counts(mid)) <= target:
                    lo = mid
                else:
                    hi = mid
        # Tasks whose count steps up at the breakpoint between lo and hi (identical head sizes
        # make them step together) step one at a time, in task order: each step keeps at most
        # one more weight, so the target is met exactly.
        kk = counts(lo)
        for t in (counts(hi) > kk).nonzero().flatten().tolist():
            nxt = kk.clone()
            nxt[t] += 1
            if count(nxt) > target:
                break
            kk = nxt
        self.rho = lo
        self.keep_counts = kk.tolist()
        keep: dict[int | None, Tensor] = {None: shared_keep(kk)}
        keep.update({t: ranks[t][d_s:] < kk[t] for t in range(self.num_tasks)})
        out: dict[str, Tensor] = {}
        offsets: dict[int | None, int] = dict.fromkeys(keep, 0)
        for lyr in self.layers:
            w, start = self.weight(lyr), offsets[lyr.task]
            out[lyr.name] = keep[lyr.task][start : start + lyr.numel].view(w.shape).to(w.device)
            offsets[lyr.task] = start + lyr.numel
        return out

    def _ranks(self, scores: Sequence[dict[str, Tensor]], t: int) -> Tensor:
        r"""Each weight's position in task ``t``'s descending score order (ties: by position),
        over :math:`\Theta_t` flattened shared layers first, then the head's, in layer order."""
        layers = self._layers_of(t)
        want = {lyr.name for lyr in layers}
        if not isinstance(scores[t], dict) or set(scores[t]) != want:
            raise ValueError(f"scores[{t}] must map exactly the layers {sorted(want)}")
        flat = []
        for lyr in layers:
            s = scores[t][lyr.name]
            if not isinstance(s, Tensor) or s.shape != self.weight(lyr).shape:
                raise ValueError(
                    f"scores[{t}][{lyr.name!r}] must be a tensor shaped like the weight "
                    f"{tuple(self.weight(lyr).shape)}"
                )
            flat.append(s.detach().flatten().to(torch.float64).cpu())
        order = torch.sort(torch.cat(flat), descending=True, stable=True).indices
        rank = torch.empty_like(order)
        rank[order] = torch.arange(len(order))
        return rank

    def apply(self, masks: dict[str, Tensor]) -> None:
        """Mask every prunable layer: register the parametrization (or update its mask) and set
        the pruned entries of the original weight to 0. Validated before anything changes."""
        names = {lyr.name for lyr in self.layers}
        if not isinstance(masks, dict) or set(masks) != names:
            raise ValueError(f"masks must map exactly the prunable layers {sorted(names)}")
        for lyr in self.layers:
            m, w = masks[lyr.name], self.weight(lyr)
            if not isinstance(m, Tensor) or m.dtype != torch.bool or m.shape != w.shape:
                raise ValueError(
                    f"masks[{lyr.name!r}] must be a bool tensor of shape {tuple(w.shape)}"
                )
        for lyr in self.layers:
            mask = masks[lyr.name].to(self.weight(lyr).device)
            pm = self._mask_module(lyr)
            if pm is None:
                parametrize.register_parametrization(lyr.module, "weight", _KeepMask(mask))
            else:
                pm.mask.copy_(mask)
            with torch.no_grad():
                self.weight(lyr).masked_fill_(~mask, 0)

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

    # --- dynamic sparse training ------------------------------------------------------------
    def dynamic(
        self,
        optimizer: Any,
        density: float,
        total_steps: int,
        *,
        every: int = 50,
        end: float = 0.75,
        prune_rate: float = 0.5,
        erk_power: float = 0.9,
        seed: int = 0,
    ) -> None:
        r"""Start dynamic sparse training: ERK densities, random masks, and the schedule.

        Call ``optimizer.step()`` as usual; DiSparse updates the masks from the optimizer's
        step hooks (after the step of every ``every``-th iteration), reading the per-task
        gradients of that iteration's backward through a gradient hook registered for that
        iteration only. Resuming: :meth:`load_state_dict`, then :meth:`attach`.

        Args:
            optimizer: the training ``MTLOptimizer``.
            density: the target global density in (0, 1].
            total_steps: the number of optimizer steps of the run.
            every: :math:`\Delta T`, steps between mask updates (official 50).
            end: the fraction of ``total_steps`` after which the masks are fixed (0.75).
            prune_rate: :math:`p`, the initial prune fraction, decayed by cosine (0.5).
            erk_power: the power of the ERK densities (0.9).
            seed: seeds the random initial masks.
        """
        _check_density(density)
        for name, value, low in (("total_steps", total_steps, 1), ("every", every, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        if not 0 < end <= 1:
            raise ValueError(f"end must be in (0, 1], got {end!r}")
        if not 0 <= prune_rate < 1:
            raise ValueError(f"prune_rate must be in [0, 1), got {prune_rate!r}")
        if not erk_power >= 0:
            raise ValueError(f"erk_power must be >= 0, got {erk_power!r}")
        shapes = {lyr.name: self.weight(lyr).shape for lyr in self.layers}
        dens = erk_densities(shapes, float(density), float(erk_power))
        self._targets = {
            lyr.name: min(lyr.numel, max(1, round(dens[lyr.name] * lyr.numel)))
            for lyr in self.layers
        }
        gen = torch.Generator().manual_seed(seed)
        masks = {}
        for lyr in self.layers:
            w = self.weight(lyr)
            keep = torch.randperm(lyr.numel, generator=gen)[: self._targets[lyr.name]]
            m = torch.zeros(lyr.numel, dtype=torch.bool)
            m[keep] = True
            masks[lyr.name] = m.view(w.shape).to(w.device)
        self.apply(masks)
        self._schedule = {
            "every": every,
            "end_step": max(1, int(end * total_steps)),
            "prune_rate": float(prune_rate),
            "step": 0,
            "finished": False,
        }
        self.attach(optimizer)

    def attach(self, optimizer: Any) -> None:
        """Register the dynamic schedule's step hooks on ``optimizer`` (after :meth:`dynamic`
        built the schedule or :meth:`load_state_dict` restored it)."""
        if self._schedule is None:
            raise ValueError("no dynamic schedule: call dynamic() (or load a state that has one)")
        self.detach()
        self._optimizer = optimizer
        self._handles = [
            optimizer.register_step_pre_hook(lambda *_: self._before_step()),
            optimizer.register_step_post_hook(lambda *_: self._after_step()),
        ]
        self._arm()

    def detach(self) -> None:
        """Remove the hooks that :meth:`attach` registered."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self._disarm()

    def _update_due(self, step: int) -> bool:
        sch = self._schedule
        return (
            sch is not None
            and not sch["finished"]
            and step % sch["every"] == 0
            and (step < sch["end_step"])
        )

    def _arm(self) -> None:
        """Before an update iteration: dense (straight-through) gradients and the hook."""
        sch = self._schedule
        if sch is None or not self._handles or not self._update_due(sch["step"] + 1):
            return
        for lyr in self.layers:
            pm = self._mask_module(lyr)
            if pm is not None:
                pm.straight_through = True
        if self._grad_handle is None:
            self._grad_handle = self._optimizer.register_gradient_hook(
                self._record, needs_jacobian=True
            )

    def _disarm(self) -> None:
        for lyr in self.layers:
            pm = self._mask_module(lyr)
            if pm is not None:
                pm.straight_through = False
        if self._grad_handle is not None:
            self._grad_handle.remove()
            self._grad_handle = None

    def _record(self, _: Any, info: GradientInfo) -> None:
        # accumulation: J and the heads' .grad hold the window so far; the last call wins
        self._grads = self._per_task_grads(info)

    @torch.no_grad()
    def _before_step(self) -> None:
        """The optimizer step moves only kept weights (the grads were dense for the grow)."""
        if self._grad_handle is None:
            return
        for lyr in self.layers:
            pm, w = self._mask_module(lyr), self.weight(lyr)
            if pm is not None and w.grad is not None:
                w.grad.mul_(pm.mask)

    @torch.no_grad()
    def _after_step(self) -> None:
        sch = self._schedule
        assert sch is not None
        if sch["finished"]:
            return
        sch["step"] += 1
        t = sch["step"]
        if t >= sch["end_step"]:
            self._final_prune()
            sch["finished"] = True
            self._disarm()
            return
        if self._update_due(t):
            if self._grads is None:  # this step saw no backward: update at the next one
                sch["step"] -= 1
                return
            self._disarm()
            self._update(t)
            self._grads = None
        self._arm()

    @torch.no_grad()
    def _update(self, t: int) -> None:
        sch, targets, grads = self._schedule, self._targets, self._grads
        assert sch is not None and targets is not None and grads is not None
        p_t = 0.5 * sch["prune_rate"] * (1 + math.cos(math.pi * t / sch["end_step"]))
        for lyr in self.layers:
            pm = self._mask_of(lyr)
            w = self.weight(lyr)
            old = pm.mask.clone()
            n = targets[lyr.name]
            keep = _top(torch.where(old, w.abs(), -1.0), round(n * (1 - p_t)))
            tasks = range(self.num_tasks) if lyr.task is None else [lyr.task]
            grow = torch.zeros_like(old)
            for k in tasks:
                score = torch.where(keep, -1.0, grads[k][lyr.name].to(w.dtype))
                grow |= _top(score, n - int(keep.sum()))
            new = keep | grow
            w.masked_fill_(new & ~old, 0)  # grown weights start at 0
            w.masked_fill_(~new, 0)
            pm.mask.copy_(new)

    @torch.no_grad()
    def _final_prune(self) -> None:
        assert self._targets is not None
        for lyr in self.layers:
            pm, w = self._mask_of(lyr), self.weight(lyr)
            new = _top(torch.where(pm.mask, w.abs(), -1.0), self._targets[lyr.name])
            w.masked_fill_(~new, 0)
            pm.mask.copy_(new)

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


def _top(score: Tensor, k: int) -> Tensor:
    """Bool mask of the ``k`` largest entries (ties by position)."""
    flat = score.flatten()
    out = torch.zeros_like(flat, dtype=torch.bool)
    if k > 0:
        out[torch.sort(flat, descending=True, stable=True).indices[:k]] = True
    return out.view(score.shape)


def _check_density(density: Any) -> None:
    if isinstance(density, bool) or not isinstance(density, (int, float)):
        raise TypeError(f"density must be a number in (0, 1], got {density!r}")
    if not 0 < density <= 1:
        raise ValueError(f"density must be in (0, 1], got {density!r}")
