r"""DiSparse's masks: the parametrization :math:`W = \theta \odot m`, the prunable layers, and
the keep-masks a density and per-task scores give (the arbiter of the shared weights).

The base of :class:`~mtl_optim.pruning.DiSparse` (see its docstring for the method and the
decisions); the scoring is in ``_scores.py``, dynamic sparse training in ``_dynamic.py``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, cast, get_args

import torch
from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd
from torch.nn.utils import parametrize

__all__ = ["ARBITERS", "BISECTION_STEPS", "Arbiter", "LayerMasks"]

Arbiter = Literal["union", "intersection", "vote"]
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


class LayerMasks:
    """The prunable layers of :class:`~mtl_optim.pruning.DiSparse` and their keep-masks. The
    attributes are set by the subclass's constructor."""

    layers: list[_Layer]
    num_tasks: int
    rho: float | None
    keep_counts: list[int] | None

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
