r"""TAG: lookahead inter-task affinity, measured alongside an ordinary training loop.

Fifty et al., *Efficiently Identifying Task Groupings for Multi-Task Learning*, NeurIPS 2021,
arXiv `2109.04617 <https://arxiv.org/abs/2109.04617>`_.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Literal, get_args

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.optim import SGD, Adam, AdamW, Optimizer

from .._linalg import gramian, normalized_gramian
from .._validation import check_int
from ..adatask import AdaTask
from ..engine import TaskGradients, as_losses
from ..optimizer import MTLOptimizer

__all__ = ["TaskAffinity"]

LossFn = Callable[[nn.Module, Any], Sequence[Tensor] | Tensor]
#: A virtual step: (param, K gradient rows, the param's optimizer state, its group) → K steps.
Rule = Callable[[Tensor, Tensor, dict, dict], Tensor]


def _sgd(p: Tensor, grads: Tensor, state: dict, group: dict) -> Tensor:
    """``torch.optim.SGD``'s step for each row of ``grads``, from its current momentum buffer."""
    d = -grads if group.get("maximize", False) else grads
    if group["weight_decay"] != 0:
        d = d + group["weight_decay"] * p
    momentum = group["momentum"]
    if momentum != 0:
        buf = state.get("momentum_buffer")
        buf = d if buf is None else momentum * buf + (1 - group["dampening"]) * d
        d = d + momentum * buf if group["nesterov"] else buf
    return -float(group["lr"]) * d


def _adam(p: Tensor, grads: Tensor, state: dict, group: dict) -> Tensor:
    """``torch.optim.Adam``/``AdamW``'s step for each row of ``grads``, from its current moments."""
    beta1, beta2 = (float(b) for b in group["betas"])
    lr, wd = float(group["lr"]), group["weight_decay"]
    decoupled = group.get("decoupled_weight_decay", False)
    g = -grads if group.get("maximize", False) else grads
    if wd != 0 and not decoupled:
        g = g + wd * p
    step = float(state["step"]) + 1 if "step" in state else 1.0
    zeros = torch.zeros_like(p)
    m = torch.lerp(state.get("exp_avg", zeros), g, 1 - beta1)
    v = state.get("exp_avg_sq", zeros) * beta2 + (1 - beta2) * g * g
    if group.get("amsgrad", False):
        v = torch.maximum(state.get("max_exp_avg_sq", zeros), v)
    denom = v.sqrt() / (1 - beta2**step) ** 0.5 + group["eps"]
    delta = -(lr / (1 - beta1**step)) * m / denom
    return delta - lr * wd * p if decoupled and wd != 0 else delta


def _plain_sgd(p: Tensor, grads: Tensor, state: dict, group: dict) -> Tensor:
    return -float(group["lr"]) * grads


class _Objective(nn.Module):
    """``loss_fn(model, batch)`` as one module, so that ``functional_call`` can swap the model's
    tensors for the whole call: ``loss_fn`` may use any method or submodule of ``model``."""

    def __init__(self, model: nn.Module, loss_fn: LossFn) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: Any) -> Sequence[Tensor] | Tensor:
        return self.loss_fn(self.model, batch)


@contextmanager
def _replayed_randomness(devices: list[int]) -> Iterator[Callable[[], None]]:
    """Inside, ``rewind()`` resets the global RNGs to their state on entry, so that every
    forward draws the same dropout masks; on exit they are as if nothing had been drawn."""
    with torch.random.fork_rng(devices=devices):
        cpu = torch.get_rng_state()
        cuda = [torch.cuda.get_rng_state(d) for d in devices]

        def rewind() -> None:
            torch.set_rng_state(cpu)
            for d, s in zip(devices, cuda):
                torch.cuda.set_rng_state(s, d)

        yield rewind


Method = Literal["lookahead", "cosine"]
VirtualStep = Literal["optimizer", "sgd"]


class TaskAffinity:
    r"""TAG's inter-task affinity, measured every ``every`` steps of a training loop.

    At a measured step on batch :math:`X`, with :math:`\Delta_i` the update that the optimizer
    would apply to the shared parameters :math:`\theta_s` for the gradient
    :math:`g_i = \nabla_{\theta_s} L_i` of task ``i`` alone (heads stay put),

    .. math::
        Z_{i \to j} = \Big(1 - \frac{L_j(X;\, \theta_s + \Delta_i)}{L_j(X;\, \theta_s)}\Big)
        \Big/ \eta,

    where the division by the learning rate :math:`\eta` (``normalize_by_lr``, as both official
    implementations do) keeps affinities comparable across learning-rate decay.
    :math:`Z_{i \to j} > 0` means that a step on ``i`` lowers ``j``'s loss. The matrix is stored
    as ``A[j, i]`` :math:`= Z_{i \to j}` (row: the loss measured; column: the task stepped on),
    the orientation :func:`select_groups` reads. ``method="cosine"`` records the paper's
    baseline :math:`A_{ij} = \cos(g_i, g_j)` instead, on the shared weight tensors with
    ``ndim > 1``.

    Use it inside the loop, after ``backward`` and before ``step`` (the lookahead starts from
    the parameters and optimizer state that ``step`` is about to use)::

        aff = TaskAffinity(model, opt, lambda m, b: m.losses(*b), every=10)
        for batch in loader:
            opt.zero_grad()
            opt.backward(model.losses(*batch))
            aff.step(batch)
            opt.step()
        select_groups(aff.affinity(), n_groups=2)

    Decisions (see docs/methods/grouping.md, "Lookahead affinity"):

    * ``virtual_step="optimizer"`` computes :math:`\Delta_i` with the base optimizer's rule:
      SGD (momentum, dampening, Nesterov, weight decay, maximize) from its current momentum
      buffer, or Adam/AdamW (amsgrad, coupled or decoupled weight decay) from its current
      moments and step count — read, never written. ``virtual_step="sgd"`` is the fallback
      :math:`\Delta_i = -\eta g_i` for any optimizer. The CelebA code uses SGD-momentum steps;
      the Taskonomy code means to but falls back to SGD with weight decay. Gradient clipping
      of the real step is not applied to the virtual one.
    * Every forward is functional (``torch.func.functional_call``) on fresh copies of the
      model's buffers, in the model's current mode, so BatchNorm running statistics,
      parameters and optimizer state are untouched (the Taskonomy code updates BN statistics
      at every lookahead). The global RNGs are rewound before each forward and restored
      afterwards **(ours; the official code draws fresh dropout masks)**: all K + 1 forwards of
      a step share their dropout masks, so Z measures the parameter change alone, and the
      training run draws exactly the random numbers it would draw without this class.
    * Cost per measured step: one forward with graph, K reverse passes over
      :math:`\theta_s` (through :class:`~mtl_optim.engine.TaskGradients`) and K forwards
      without graph (``method="cosine"``: no lookahead forward). The lookahead of the
      all-tasks gradient (the CelebA code's ``order=1``) is not computed.
    * :meth:`affinity` is the mean over every measured step (the grouping input);
      :attr:`history` keeps the per-epoch means (closed by :meth:`end_epoch`). A step with a
      non-finite loss or affinity is left out with a warning.
    * One process only: under ``torch.distributed`` each rank measures on its own batch (the
      reduction of docs/design.md, "Distributed training" is not done here).

    Args:
        model: the multi-task model.
        optimizer: the loop's optimizer: an :class:`~mtl_optim.MTLOptimizer` (its
            ``shared_params``, hyperparameters and state are read) or any torch optimizer.
        loss_fn: ``loss_fn(model, batch)`` returns the K task losses (a sequence of scalars or
            a 1-D tensor); it may call any method of ``model``.
        every: measure at the 1st, ``every + 1``-th, ``2·every + 1``-th, … call of :meth:`step`
            (the Taskonomy default is 10; CelebA measures every step).
        method: ``"lookahead"`` (TAG) or ``"cosine"`` (the gradient-cosine baseline).
        virtual_step: ``"optimizer"`` or ``"sgd"`` (see above).
        normalize_by_lr: divide the lookahead affinity by the learning rate of the first
            param group that holds shared parameters.
        shared: the shared parameters. ``None`` takes ``optimizer.shared_params`` once known,
            else detects them from the autograd graph like ``MTLOptimizer`` does.
    """

    METHODS = get_args(Method)
    VIRTUAL_STEPS = get_args(VirtualStep)

    def __init__(
        self,
        model: nn.Module,
        optimizer: Optimizer,
        loss_fn: LossFn,
        *,
        every: int = 10,
        method: Method = "lookahead",
        virtual_step: VirtualStep = "optimizer",
        normalize_by_lr: bool = True,
        shared: Sequence[Tensor] | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"optimizer must be a torch optimizer, got {type(optimizer).__name__}")
        if not callable(loss_fn):
            raise TypeError("loss_fn must be callable as loss_fn(model, batch) -> K losses")
        check_int("every", every, 1)
        if method not in self.METHODS:
            raise ValueError(f"method must be one of {self.METHODS}, got {method!r}")
        if virtual_step not in self.VIRTUAL_STEPS:
            raise ValueError(
                f"virtual_step must be one of {self.VIRTUAL_STEPS}, got {virtual_step!r}"
            )
        self.model = model
        self.optimizer = optimizer
        self.every = every
        self.method = method
        self.virtual_step = virtual_step
        self.normalize_by_lr = normalize_by_lr
        self._rule = _plain_sgd if virtual_step == "sgd" else self._optimizer_rule(optimizer)
        self._shared_arg = None if shared is None else list(shared)
        self._objective = _Objective(model, loss_fn)
        self._names = {id(p): name for name, p in self._objective.named_parameters()}
        self._engine = TaskGradients()
        self.calls = 0
        self.count = 0
        self.history: list[Tensor | None] = []
        self._total: Tensor | None = None
        self._epoch_total: Tensor | None = None
        self._epoch_count = 0

    @staticmethod
    def _optimizer_rule(optimizer: Optimizer) -> Rule:
        if isinstance(optimizer, AdaTask):
            raise TypeError(
                "AdaTask keeps per-task moments, so its step on one task is not the base rule; "
                "use virtual_step='sgd'"
            )
        base = optimizer.base_class if isinstance(optimizer, MTLOptimizer) else type(optimizer)
        if issubclass(base, SGD):
            return _sgd
        if issubclass(base, (Adam, AdamW)):
            return _adam
        raise TypeError(
            f"virtual_step='optimizer' supports SGD, Adam and AdamW, not {base.__name__}; "
            "use virtual_step='sgd'"
        )

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(every={self.every}, method={self.method!r}, "
            f"virtual_step={self.virtual_step!r}, normalize_by_lr={self.normalize_by_lr})"
        )

    # --- the loop's calls ---------------------------------------------------------------
    def step(self, batch: Any) -> Tensor | None:
        """Count one training step; on a measured one return its K×K (float64) affinity."""
        measured = self.calls % self.every == 0
        self.calls += 1
        if not measured:
            return None
        z = self._measure(batch)
        if not torch.isfinite(z).all():
            warnings.warn(
                "non-finite loss or affinity: this step is left out", RuntimeWarning, stacklevel=2
            )
            return None
        if self._total is None:
            self._total = torch.zeros_like(z)
        if self._epoch_total is None:
            self._epoch_total = torch.zeros_like(z)
        self._total += z
        self._epoch_total += z
        self.count += 1
        self._epoch_count += 1
        return z

    def end_epoch(self) -> None:
        """Close an epoch: append its mean affinity to :attr:`history` (``None`` if no step of
        it was measured)."""
        if self._epoch_count == 0 or self._epoch_total is None:
            self.history.append(None)
        else:
            self.history.append(self._epoch_total / self._epoch_count)
        self._epoch_total, self._epoch_count = None, 0

    def affinity(self) -> Tensor:
        """The K×K mean over all measured steps; ``A[j, i]`` is task ``i``'s step onto ``j``."""
        if self._total is None or self.count == 0:
            raise RuntimeError("no step measured yet: call step(batch) in the training loop")
        return self._total / self.count

    # --- measurement --------------------------------------------------------------------
    def _forward(self, batch: Any, tensors: dict[str, Tensor], k: int | None) -> list[Tensor]:
        buffers = {name: b.clone() for name, b in self._objective.named_buffers()}
        out = functional_call(self._objective, {**buffers, **tensors}, (batch,))
        return as_losses(out, k, differentiable=torch.is_grad_enabled())

    def _setup(self, losses: list[Tensor]) -> None:
        given = self._shared_arg
        if given is None and isinstance(self.optimizer, MTLOptimizer):
            given = self.optimizer.shared_params or None
        known = {id(p) for p in self._engine.shared or ()}
        if self._engine.ready and (given is None or {id(p) for p in given} == known):
            return
        self._engine.setup(losses, self.optimizer.param_groups, given)
        if any(id(p) not in self._names for p in self._engine.shared or ()):
            raise ValueError("the shared parameters must be parameters of model")

    def _measure(self, batch: Any) -> Tensor:
        devices = sorted({p.device.index or 0 for p in self.model.parameters() if p.is_cuda})
        with _replayed_randomness(devices) as rewind, torch.enable_grad():
            losses = self._forward(batch, {}, self._engine.num_tasks)
            self._setup(losses)
            self._engine.reset()
            jacobian = self._engine.compute(losses)
            if self.method == "cosine":
                return self._cosine(jacobian)
            before = torch.stack([loss.detach() for loss in losses]).to(torch.float64)
            moved = self._lookahead_params(jacobian)
            k = len(losses)
            after = torch.empty(k, k, dtype=torch.float64, device=before.device)
            with torch.no_grad():
                for i in range(k):
                    rewind()
                    out = self._forward(batch, {n: p[i] for n, p in moved.items()}, k)
                    after[i] = torch.stack(out).to(torch.float64)
        z = (1 - after / before).T  # z[j, i] = Z_{i→j}
        if self.normalize_by_lr:
            first = self._engine.slices[0].group
            z = z / float(self.optimizer.param_groups[first]["lr"])
        return z

    @torch.no_grad()
    def _lookahead_params(self, jacobian: Tensor) -> dict[str, Tensor]:
        """Name → the K stacked values of each shared parameter after each task's step."""
        moved = {}
        for s in self._engine.slices:
            group = self.optimizer.param_groups[s.group]
            for p, grads in zip(s.params, s.split(jacobian[:, s.start : s.stop])):
                # .get: optimizer.state is a defaultdict, and reading must not add an entry
                state = self.optimizer.state.get(p, {})
                moved[self._names[id(p)]] = p + self._rule(p, grads, state, group).to(p.dtype)
        return moved

    def _cosine(self, jacobian: Tensor) -> Tensor:
        columns = []
        for s in self._engine.slices:
            offset = s.start
            for p in s.params:
                if p.dim() > 1:
                    columns.append(torch.arange(offset, offset + p.numel()))
                offset += p.numel()
        if not columns:
            raise ValueError("method='cosine' needs shared weight tensors with ndim > 1")
        index = torch.cat(columns).to(jacobian.device)
        return normalized_gramian(gramian(jacobian.index_select(1, index)))[0]

    # --- checkpointing ------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs to measure on the same steps and average alike."""

        def copy(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.clone()

        return {
            "calls": self.calls,
            "count": self.count,
            "total": copy(self._total),
            "epoch_count": self._epoch_count,
            "epoch_total": copy(self._epoch_total),
            "history": [copy(h) for h in self.history],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        expected = {"calls", "count", "total", "epoch_count", "epoch_total", "history"}
        if set(state) != expected:
            raise ValueError(
                f"not a TaskAffinity state: expected keys {sorted(expected)}, got {sorted(state)}"
            )
        self.calls, self.count = int(state["calls"]), int(state["count"])
        self._epoch_count = int(state["epoch_count"])
        self._total = None if state["total"] is None else state["total"].clone()
        self._epoch_total = None if state["epoch_total"] is None else state["epoch_total"].clone()
        self.history = [None if h is None else h.clone() for h in state["history"]]
