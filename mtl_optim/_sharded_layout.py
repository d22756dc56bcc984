r"""DTensor layout of FSDP2-sharded parameters, and the set-up half of the sharded engine.

The helpers read and build ``DTensor``\ s laid out like a parameter that ``fully_shard`` split
along dim 0 of a 1-D mesh: its local shard, a ``DTensor`` of the same layout around a local
tensor (:func:`like`), and a ``(K, *p.shape)`` ``DTensor`` sharded one dim further for per-task
state (:func:`stacked`). :class:`ShardedLayout` is the part of
:class:`~mtl_optim._sharded.ShardedTaskGradients` that refuses what cannot run on sharded
parameters, finds the shared parameters and lays out this rank's columns of ``J`` over the local
shards; the per-task passes, the aggregators on this rank's block and the checkpoint conversion
are in ``_sharded``.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable, Sequence
from dataclasses import replace
from typing import Any, Literal

import torch
from torch import Tensor

from .aggregators import GradDrop, GramianWeightedAggregator, PCGrad
from .engine import TaskGradients, reachable_params

__all__ = ["ShardedLayout", "is_sharded", "like", "stacked"]


def is_sharded(tensor: Any) -> bool:
    """Is ``tensor`` a ``DTensor`` (a parameter or gradient managed by FSDP2)?

    A ``DTensor`` exists only once ``torch.distributed.tensor`` was imported, so this looks the
    class up there and imports nothing: ``import mtl_optim`` does not pay for importing it."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(tensor, module.DTensor)


def _dtensor() -> tuple[Any, Any]:
    """``DTensor`` and ``Shard``, imported when a sharded model is in use."""
    from torch.distributed.tensor import DTensor, Shard

    return DTensor, Shard


def _local(p: Tensor) -> Tensor:
    """This rank's shard of ``p`` as a plain tensor sharing ``p``'s storage."""
    with torch.no_grad():
        return p.to_local()


def like(p: Tensor, local: Tensor) -> Tensor:
    """A ``DTensor`` laid out like parameter ``p`` (same mesh, placements, global shape)."""
    dtensor, _ = _dtensor()
    return dtensor.from_local(
        local.view(_local(p).shape),
        p.device_mesh,
        p.placements,
        run_check=False,
        shape=p.shape,
        stride=p.stride(),
    )


def stacked(p: Tensor, local: Tensor, k: int) -> Tensor:
    """A ``(K, *p.shape)`` ``DTensor`` sharded like ``p`` one dim further (per-task state)."""
    shape = (k, *p.shape)
    dtensor, shard = _dtensor()
    return dtensor.from_local(
        local.reshape(k, *_local(p).shape),
        p.device_mesh,
        [shard(1)],
        run_check=False,
        shape=torch.Size(shape),
        stride=torch.empty(shape, device="meta").stride(),
    )


def _row_range(p: Tensor) -> tuple[int, int]:
    """Rows ``[start, stop)`` of ``p`` (dim 0) that this rank holds (``torch.chunk`` split)."""
    size = p.device_mesh.size()
    rank = p.device_mesh.get_local_rank()
    rows = p.shape[0]
    chunk = math.ceil(rows / size) if rows else 0
    start = min(rank * chunk, rows)
    stop = min(start + chunk, rows)
    if stop - start != _local(p).shape[0]:
        raise ValueError(
            f"a parameter of shape {tuple(p.shape)} holds {_local(p).shape[0]} rows on rank "
            f"{rank}, not the {stop - start} of an even dim-0 split; mtl_optim supports "
            "fully_shard's default sharding only"
        )
    return start, stop


class ShardedLayout(TaskGradients):
    """The checks and the set-up of :class:`~mtl_optim._sharded.ShardedTaskGradients` (see its
    docstring): which parameters are shared, and this rank's columns of ``J`` over their local
    shards."""

    STRATEGIES: tuple[str, ...] = ("loop",)

    def __init__(self, strategy: Literal["loop"] = "loop") -> None:
        super().__init__(strategy)
        self.specific: list[Tensor] = []  # sharded parameters that are not shared
        self._group: Any = None  # the mesh's process group
        self._index: Tensor | None = None  # global column of each local column (GradDrop)
        self._owners: list[tuple[Tensor, ...]] = []  # the DTensors behind each slice's shards
        self._checked: tuple[int, ...] | None = None  # the parameters validate() accepted
        self._global_dim = 0

    # --- checks ---------------------------------------------------------------------------
    def validate(self, optimizer: Any, features: Any) -> None:
        """Refuse, before anything changes, what cannot run exactly on sharded parameters."""
        name = type(optimizer).__name__
        if features is not None:
            raise ValueError(
                "features= is not supported with parameters sharded by fully_shard: the "
                "parameters below the representation would have to be differentiated one by "
                "one, which FSDP2's all-gathered parameters do not allow; drop features="
            )
        if optimizer.route == "gramian":
            raise ValueError(
                f"route={optimizer.route!r} is not supported with parameters sharded by "
                "fully_shard; use route='jacobian' or the default 'auto' (the Jacobian route: "
                "its Gramian is exact and costs one K x K all-reduce)"
            )
        agg = optimizer.aggregator
        if agg is not None and not isinstance(agg, (GramianWeightedAggregator, PCGrad, GradDrop)):
            raise ValueError(
                f"{name} with {agg!r} cannot run on parameters sharded by fully_shard: "
                f"{type(agg).__name__} keeps a (K, d) state and takes norms or sums over all "
                "coordinates inside one call, while each rank holds only its columns of J; "
                "use an aggregator that depends on J through its Gramian (e.g. MGDA, UPGrad, "
                "NashMTL, PCGrad) or GradDrop"
            )
        wgt = optimizer.weighting
        if wgt is not None and wgt.needs_jacobian:
            raise ValueError(
                f"{wgt!r} reads the per-task gradients of the shared parameters, which are "
                "split across ranks under fully_shard; it is not supported there (use a "
                "weighting that sees only the loss values)"
            )
        layout = tuple(id(p) for g in optimizer.param_groups for p in g["params"])
        if layout == self._checked:
            return
        meshes = set()
        for g in optimizer.param_groups:
            for p in g["params"]:
                if not is_sharded(p) or not p.requires_grad:
                    continue
                if p.device_mesh.ndim != 1 or tuple(p.placements) != (_dtensor()[1](0),):
                    raise ValueError(
                        f"a parameter has placements {tuple(p.placements)} on a "
                        f"{p.device_mesh.ndim}-D mesh; mtl_optim supports fully_shard on a 1-D "
                        "mesh (placements (Shard(0),)) only"
                    )
                meshes.add(id(p.device_mesh.get_group()))
        if len(meshes) > 1:
            raise ValueError(
                "the sharded parameters live on different device meshes; mtl_optim needs one "
                "mesh for the whole model"
            )
        self._checked = layout

    def replicated(self, params: list[Tensor]) -> list[Tensor]:
        """The parameters whose gradients the optimizer averages across ranks itself (FSDP2
        already reduce-scattered the sharded ones)."""
        return [p for p in params if not is_sharded(p)]

    def finite_inputs(self, tensors: list[Tensor]) -> list[Tensor]:
        """What the optimizer's finiteness check looks at: sharded gradients are judged on all
        ranks together (one all-reduce), so that every rank skips or steps alike."""
        if not any(is_sharded(t) for t in tensors):
            return tensors
        plain = [t.to_local() if is_sharded(t) else t for t in tensors]
        group = next(t.device_mesh.get_group() for t in tensors if is_sharded(t))
        bad = torch.zeros((), dtype=torch.float32, device=plain[0].device)
        for t in plain:
            if t.numel():
                bad = torch.maximum(bad, (~torch.isfinite(t)).any().to(bad.dtype))
        torch.distributed.all_reduce(bad, group=group)
        return [torch.where(bad > 0, float("nan"), 0.0)]

    # --- set-up -----------------------------------------------------------------------------
    def detect(
        self,
        losses: Sequence[Tensor],
        param_groups: Sequence[dict],
        shared: Iterable[Tensor] | None,
        joined: bool = False,
    ) -> set[int]:
        """The shared parameters: given (``shared=``, group flags), or those that two or more
        tasks give a nonzero gradient on some rank (one ``backward`` per task, once; the flags
        are summed across ranks so that every rank finds the same set)."""
        if self.shared is not None:
            raise ValueError(
                "the set of trainable parameters changed after the first backward; with "
                "parameters sharded by fully_shard the shared set is fixed: build a new "
                "optimizer instead"
            )
        params = [p for g in param_groups for p in g["params"] if p.requires_grad]
        plain = {id(p) for p in params if not is_sharded(p)}
        reached = plain & set().union(*(reachable_params(loss) for loss in losses))
        if reached:
            raise ValueError(
                f"{len(reached)} trainable parameter(s) that the losses reach are plain tensors, "
                "not sharded by fully_shard; call fully_shard on the module that owns them (or "
                "on the root module) before building the optimizer"
            )
        explicit = shared is not None or any(g.get("shared", False) for g in param_groups)
        if explicit:
            chosen = super().detect(losses, param_groups, shared, joined)
            if chosen & plain:
                raise ValueError(
                    "shared= names plain tensors; with fully_shard every shared parameter must "
                    "be sharded (a DTensor)"
                )
            return chosen
        candidates = [p for p in params if is_sharded(p)]
        if len(losses) < 2 or not candidates:
            return set()
        self._group = candidates[0].device_mesh.get_group()
        before = [p.grad for p in candidates]
        flags = torch.zeros(len(losses), len(candidates), device=candidates[0].device)
        try:
            for p in candidates:
                p.grad = None
            for i, loss in enumerate(losses):
                loss.backward(retain_graph=True)
                for j, p in enumerate(candidates):
                    if p.grad is not None:
                        flags[i, j] = p.grad.to_local().ne(0).any()
                        p.grad = None
        finally:
            for p, g in zip(candidates, before):
                p.grad = g
        torch.distributed.all_reduce(flags, group=self._group)
        counts = (flags > 0).sum(0).tolist()
        return {id(p) for p, c in zip(candidates, counts) if c >= 2}

    def set_shared(
        self,
        param_groups: Sequence[dict],
        shared_ids: set[int],
        cohorts: dict[int, int] | None = None,
    ) -> None:
        """As :meth:`TaskGradients.set_shared`, with this rank's columns: each slice's
        ``params`` are the local shards and its range counts local elements."""
        super().set_shared(param_groups, shared_ids, cohorts)
        everything = self.task_specific
        self.specific = [p for p in everything if is_sharded(p)]
        self.task_specific = [p for p in everything if not is_sharded(p)]
        global_slices = self.slices
        self._owners = [s.params for s in global_slices]
        self.slices, index, offset = [], [], 0
        for s in global_slices:
            n = sum(_local(p).numel() for p in s.params)
            self.slices.append(replace(s, start=offset, stop=offset + n))
            column = s.start
            for p in s.params:
                start, stop = _row_range(p)
                inner = math.prod(p.shape[1:])
                index.append(torch.arange(column + start * inner, column + stop * inner))
                column += p.numel()
            offset += n
        self._global_dim = global_slices[-1].stop if global_slices else 0
        self._index = torch.cat(index) if index else torch.zeros(0, dtype=torch.long)
        self._refresh()
        if self.shared:
            self._group = self.shared[0].device_mesh.get_group()
        elif self.specific:
            self._group = self.specific[0].device_mesh.get_group()

    def _refresh(self) -> None:
        """Point the slices at the current local shards (FSDP may re-create them, e.g. at its
        lazy initialisation before the first forward)."""
        self.slices = [
            replace(s, params=tuple(_local(p) for p in owners))
            for s, owners in zip(self.slices, self._owners)
        ]
