"""Dynamic constrained uncertainty weighting: uncertainty × DWA weights, bounded, summing to K."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import torch
from torch import Tensor

from .._validation import check_num_tasks
from ._dwa import DWA
from ._epoch_means import pop_state
from ._log_variance import _UncertaintyBase


def bounded_rescale(u: Tensor, lo: float, hi: float, total: float) -> Tensor:
    r"""``w = clamp(c u, lo, hi)`` with the scale :math:`c > 0` such that :math:`\sum w = `
    ``total``; ``u`` positive, :math:`K \cdot lo \le` ``total`` :math:`\le K \cdot hi`.

    :math:`f(c) = \sum_i \operatorname{clamp}(c u_i, lo, hi)` is continuous, nondecreasing and
    piecewise linear with breakpoints :math:`lo/u_i`, :math:`hi/u_i`; it is evaluated at the
    sorted breakpoints and solved exactly (linearly) on the interval where it crosses ``total``.
    """
    k = u.numel()
    if lo * k >= total or hi * k <= total:  # only the constant vector fits
        return torch.full_like(u, total / k)
    breaks = torch.cat([lo / u, hi / u]).sort().values
    f = torch.clamp(breaks[:, None] * u[None, :], lo, hi).sum(1)
    j = min(max(int(torch.searchsorted(f, torch.tensor([total], dtype=f.dtype))[0]), 1), k * 2 - 1)
    b0, b1, f0, f1 = breaks[j - 1], breaks[j], f[j - 1], f[j]
    c = b1 if f1 <= f0 else b0 + (total - f0) * (b1 - b0) / (f1 - f0)
    return torch.clamp(c * u, lo, hi)


class ConstrainedUncertainty(_UncertaintyBase):
    r"""Dynamic constrained uncertainty weighting (after the abstract of "dynamic constrained
    uncertainty weighting"; no code seen, so the definition below is ours).

    Three parts: the uncertainty weight :math:`e^{-s_i}/k_i` with learnable :math:`s`, the
    DWA weight :math:`d_i` (:class:`~mtl_optim.weighting.DWA`, from epoch-mean losses:
    :math:`d = K\operatorname{softmax}(r/T)`, :math:`r_i = \bar L_i(e-1)/\bar L_i(e-2)`,
    :math:`d = 1` for the first two epochs), and a constraint keeping the weights in
    ``bounds`` :math:`[lo, hi]` with sum :math:`K`:

    .. math::
        u_i = \frac{e^{-s_i}}{k_i} d_i, \qquad
        w_i = \operatorname{clamp}(c\, u_i, lo, hi), \quad c > 0 \text{ s.t. } \sum_i w_i = K,

    i.e. the weights are proportional to :math:`u` except where a bound is active (the scale
    :math:`c` is found exactly by :func:`bounded_rescale`). The objectives are

    .. math::
        o_i = w_i L_i + \frac{e^{-s_i}}{k_i} \operatorname{sg}(L_i) + \tfrac12 s_i,

    with :math:`w` a constant for autograd (``sg``: stop-gradient), so
    :math:`\partial o_i / \partial L_j = w_i \delta_{ij}`: the model is trained with the bounded
    weights :math:`w` (:attr:`weights`), and :math:`s` is trained by the uncertainty likelihood
    alone, :math:`\partial \sum_j o_j / \partial s_i = \tfrac12 - e^{-s_i} L_i / k_i`
    (optimum :math:`\log(2 L_i / k_i)`, the log loss by default).

    Decision (why decoupled): letting :math:`s` act on :math:`w_i L_i` through the
    renormalisation would make :math:`\sum w_i L_i` invariant to a common shift of :math:`s`,
    so the :math:`\tfrac12 s` terms would drive every :math:`s` to :math:`-\infty`; and a clamp
    inside the graph gives zero gradient at the bounds. Requires :math:`0 < lo \le 1 \le hi`
    (else no weights in the bounds sum to :math:`K`); with :math:`lo = 1` or :math:`hi = 1`
    the weights are all 1. The DWA epoch means follow :class:`DWA` (every call, float64,
    ``opt.end_epoch()`` closes an epoch, an empty epoch is not counted).

    Partial labels (``supports_missing``): over the present tasks :math:`P` (:math:`m` of
    them), :math:`u_P` uses the DWA weights of :class:`~mtl_optim.weighting.DWA` with partial
    labels, and :math:`w_P = \operatorname{clamp}(c\, u_P, lo, hi)` sums to :math:`m`; the
    objectives are those of :math:`P`, and :math:`s_i` of a missing task stays out of their
    graph (``.grad`` ``None``, it does not move).

    State (:meth:`state_dict`): :math:`s` and the DWA state.

    Args:
        num_tasks: :math:`K`.
        temperature: the DWA temperature :math:`T` (default 2).
        bounds: ``(lo, hi)`` on the weights (default (0.1, 10)).
        init, lr, factors, clip, dtype, device: as for :class:`Uncertainty`.
    """

    def __init__(
        self,
        num_tasks: int,
        temperature: float = 2.0,
        bounds: tuple[float, float] = (0.1, 10.0),
        init: float = 0.0,
        lr: float | None = 0.025,
        *,
        factors: Sequence[float] | None = None,
        clip: tuple[float, float] | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        num_tasks = check_num_tasks(num_tasks)
        lo, hi = (float(b) for b in bounds)
        if not 0 < lo <= 1 <= hi:
            raise ValueError(f"bounds must be (lo, hi) with 0 < lo <= 1 <= hi, got {bounds!r}")
        self.bounds = (lo, hi)
        self._dwa = DWA(temperature)
        self._dwa._owner = self  # its end_epoch warning names this weighting and its threshold
        self.temperature = self._dwa.temperature
        super().__init__(
            num_tasks,
            num_tasks,
            init=init,
            lr=lr,
            factors=factors,
            clip=clip,
            dtype=dtype,
            device=device,
        )

    @property
    def epochs(self) -> int:
        return self._dwa.epochs

    def forward(self, losses: Tensor) -> Tensor:
        uw, s, index = self._uw_terms(losses)
        self._dwa.present, self._dwa.all_tasks = self.present, self.all_tasks
        try:
            self._dwa(losses.detach())  # records the epoch means; its weights are the DWA term
        finally:
            self._dwa.present, self._dwa.all_tasks = None, None
        dwa = cast(Tensor, self._dwa.weights)  # set by the call above
        u = uw.detach().to(torch.float64) * dwa.to(device=uw.device, dtype=torch.float64)
        total = self.num_tasks if index is None else index.numel()
        w = bounded_rescale(u, *self.bounds, float(total))
        w = w.to(dtype=torch.promote_types(losses.dtype, uw.dtype))
        self.weights = w
        return w * losses + uw * losses.detach() + 0.5 * s

    def end_epoch(self) -> None:
        self._dwa.end_epoch()

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "dwa": self._dwa.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        state = dict(state)
        mine = pop_state(state, ("dwa",), self)
        super().load_state_dict(state)
        self._dwa.load_state_dict(mine["dwa"])

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.num_tasks}, temperature={self.temperature!r}, "
            f"bounds={self.bounds!r}, {self._options_repr()})"
        )
