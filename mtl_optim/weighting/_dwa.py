"""DWA: dynamic weight average."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .._validation import positive
from ._base import Weighting
from ._epoch_means import EpochMeans, pop_state
from ._present import num_tasks, present_index


class DWA(Weighting):
    r"""Dynamic Weight Average (Liu, Johns & Davison, "End-to-End Multi-Task Learning with
    Attention", CVPR 2019; the MTAN / LibMTL form).

    With :math:`\bar L_k(e)` the mean training loss of task :math:`k` over epoch :math:`e`
    (0-indexed), the weights used during epoch :math:`e` are

    .. math::
        r_k = \frac{\bar L_k(e-1)}{\bar L_k(e-2)}, \qquad
        w_k = K \cdot \operatorname{softmax}_k(r_k / T) =
        \frac{K \exp(r_k / T)}{\sum_j \exp(r_j / T)},

    and :math:`w = 1` during the first two epochs. The objectives are :math:`o_k = w_k L_k`
    (the weights are constants for autograd); the weights sum to :math:`K`.

    Decisions: the epoch means average the detached losses of every call of the weighting (every
    ``opt.backward``; batches skipped by the optimizer for non-finite values are not seen), in
    float64; ``opt.end_epoch()`` closes the epoch. An epoch in which the weighting saw no losses is
    not counted (``end_epoch`` is then a no-op). The Nash-MTL / IGB ports use windows of the last
    2x25 iterations instead of epochs; that is not what this class does. A zero epoch-mean loss
    makes the ratio undefined and raises ``ValueError``.

    Partial labels (``supports_missing``): a batch without task :math:`i`'s label leaves
    :math:`L_i` out of its epoch sum and count, so :math:`\bar L_i(e)` is the mean over the
    batches of epoch :math:`e` in which task :math:`i` was present; if task :math:`i` is absent
    for a whole epoch, its previous mean is carried forward (its next ratio is 1). A task has a
    ratio once two epoch means exist since its first appearance. For the present tasks
    :math:`P`, the tasks :math:`R \subseteq P` that have a ratio share
    :math:`w_R = |R| \operatorname{softmax}_R(r_R / T)` and the others get :math:`w_i = 1`, so
    the weights sum to :math:`m = |P|` (to :math:`K` with every task present, as above).

    State (:meth:`state_dict`): the last two epoch means, the running sum and per-task counts
    of the current epoch, and the number of completed epochs.

    Args:
        temperature: :math:`T` (official default 2).
    """

    separable = True
    supports_missing = True

    def __init__(self, temperature: float = 2.0) -> None:
        self.temperature = positive("temperature", temperature)
        self._history: list[Tensor] = []  # the last (at most) two epoch means, oldest first
        self._epoch = EpochMeans()
        # the weighting that messages (and the end_epoch warning's threshold) belong to: this
        # one, or one that runs a DWA inside it (ConstrainedUncertainty)
        self._owner: Weighting = self

    @property
    def epochs(self) -> int:
        return self._epoch.epochs

    def current_weights(self, k: int, present: Tensor | None = None) -> Tensor:
        """The float64 weights of the current epoch for ``k`` tasks: ``(k,)``, or ``(m,)`` for
        the ``present`` task indices."""
        m = k if present is None else present.numel()
        if len(self._history) < 2:
            return torch.ones(m, dtype=torch.float64)
        prev2, prev1 = self._history
        if prev1.numel() != k:
            raise ValueError(f"{self!r} was run with {prev1.numel()} tasks, got {k}")
        known = ~torch.isnan(prev2)  # tasks with two epoch means (a ratio)
        if present is None and bool(known.all()):
            if bool((prev2 == 0).any()):
                raise ValueError(f"{self!r}: an epoch-mean loss is 0, the DWA ratio is undefined")
            r = prev1 / prev2
            return k * torch.softmax(r / self.temperature, dim=0)
        index = torch.arange(k) if present is None else present
        known_p = known[index]
        before, last = prev2[index][known_p], prev1[index][known_p]
        if bool((before == 0).any()):
            raise ValueError(f"{self!r}: an epoch-mean loss is 0, the DWA ratio is undefined")
        w = torch.ones(m, dtype=torch.float64)
        if before.numel():
            w[known_p] = before.numel() * torch.softmax(last / before / self.temperature, dim=0)
        return w

    def forward(self, losses: Tensor) -> Tensor:
        index = present_index(self, losses.numel())
        if index is None:
            self._epoch.add(losses, self._owner)
            k = losses.numel()
        else:
            k = num_tasks(self, losses.numel())
            self._epoch.add(losses, self._owner, index, k)
        w = self.current_weights(k, index).to(dtype=losses.dtype, device=losses.device)
        self.weights = w
        return w * losses

    def end_epoch(self) -> None:
        mean = self._epoch.close()
        if mean is not None:
            self._history = [*self._history, mean][-2:]

    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "history": [h.clone() for h in self._history],
            **self._epoch.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        state = dict(state)
        mine = pop_state(state, ("history", *EpochMeans.KEYS), self)
        super().load_state_dict(state)
        self._history = [torch.as_tensor(h, dtype=torch.float64).clone() for h in mine["history"]]
        self._history = self._history[-2:]
        self._epoch.load_state_dict(mine)
        self._epoch.seed_last(self._history[-1] if self._history else None)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(temperature={self.temperature!r})"
