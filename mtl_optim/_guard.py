"""The guard: the one owner of whether a step happens, and of what it applies.

Every ``backward`` passes its loss values and gradients through :meth:`Guard.check` (one host
sync per call site). A non-finite value marks the window as skipped (``skipping``), rewinds
the aggregator's and weighting's state to the window start (:meth:`Guard.rollback`), and the
next ``step()`` changes nothing. The guard also holds the task weights the step applies
(``last_weights``), written only through :meth:`Guard.set_weights` and
:meth:`Guard.fold_weights`, so a skipped or rolled-back step never reports weights it did
not use.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor

from ._host import Host
from ._method import clone_state

__all__ = ["Guard", "NonFiniteError"]


class NonFiniteError(ValueError, FloatingPointError):
    """A loss or gradient was NaN or infinite and ``nonfinite="raise"`` was chosen."""


class Guard:
    """Skip state, window snapshots, rollback and ``last_weights`` of one optimizer."""

    def __init__(self, optimizer: Host) -> None:
        self._opt = optimizer
        self.skipping = False
        self.last_weights: Tensor | None = None
        self._window: tuple[Any, Any, Any] | None = None  # method state at the window start

    # --- task weights -----------------------------------------------------------------
    def set_weights(self, weights: Tensor | None) -> None:
        """The weights of this step are ``weights`` (``None``: the method has none)."""
        self.last_weights = weights

    def fold_weights(self, weights: Tensor) -> None:
        """Multiply ``weights`` into this step's weights (an aggregator after a weighting)."""
        last = self.last_weights
        self.last_weights = weights if last is None else weights * last

    # --- the accumulation window ------------------------------------------------------
    def new_window(self) -> None:
        """After ``step``/``zero_grad``: the next ``backward`` starts a new window."""
        self.skipping = False
        self._window = None

    def start_window(self) -> None:
        """Accumulation: every ``backward`` of a window re-combines the accumulated gradients,
        so the aggregator's state and the weighting's random draws are rewound to where the
        window started before each call; only the last call's combination (what ``step``
        uses) advances them. Loss-value state of a weighting (epoch means) is not rewound."""
        agg, wgt = self._opt.aggregator, self._opt.weighting
        generator = getattr(wgt, "generator", None)
        if self._window is None:
            self._window = (
                None if agg is None else clone_state(agg.state_dict()),
                None if generator is None else generator.get_state(),
                wgt.snapshot() if wgt is not None and wgt.rollback else None,
            )
            return
        agg_state, gen_state, _ = self._window
        if agg_state is not None:
            agg.load_state_dict(clone_state(agg_state))
        if gen_state is not None and generator is not None:
            generator.set_state(gen_state)

    def rollback(self) -> None:
        """A skipped step leaves no trace: method state goes back to the window start."""
        if self._window is None:
            return
        agg_state, _, wgt_state = self._window
        if agg_state is not None:
            self._opt.aggregator.load_state_dict(clone_state(agg_state))
        if wgt_state is not None:
            self._opt.weighting.restore(wgt_state)

    # --- the check ----------------------------------------------------------------------
    def check(self, tensors: list[Tensor], what: str, skip: bool = True) -> bool:
        """One host sync: are all ``tensors`` finite? If not, skip or raise per ``nonfinite``.

        With ``skip=False`` a non-finite value only warns (and returns False); the step is kept.
        """
        opt = self._opt
        tensors = opt._engine.finite_inputs(tensors)
        groups: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
        for t in tensors:
            if t.is_sparse:  # nn.Embedding(sparse=True): check the stored values
                t = t.coalesce().values()
            groups.setdefault((t.device, t.dtype), []).append(t)
        bad = 0.0
        for (device, _), group in groups.items():
            found = torch.zeros((), dtype=torch.float32, device=device)
            # GradScaler's fused check; with a unit scale it leaves the tensors unchanged.
            torch._amp_foreach_non_finite_check_and_unscale_(
                group, found, torch.ones((), dtype=torch.float32, device=device)
            )
            bad += found.item()
        if bad == 0:
            return True
        if opt._scale is not None and what == "gradient" and skip:
            # An overflow of the loss scale: GradScaler's business. Make sure it finds the Inf
            # in .grad (it skips the step and lowers the scale); no warning.
            for p in opt._engine.shared or []:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                p.grad.fill_(float("inf"))
            self._skip()
            return False
        message = f"non-finite {what} (NaN or Inf) in this batch"
        if opt.nonfinite == "raise":
            raise NonFiniteError(message)
        if not skip:
            warnings.warn(f"{message}: ignored", RuntimeWarning, stacklevel=3)
            return False
        warnings.warn(f"{message}: the next step() is skipped", RuntimeWarning, stacklevel=4)
        self._skip()
        return False

    def _skip(self) -> None:
        self.skipping = True
        self.rollback()
