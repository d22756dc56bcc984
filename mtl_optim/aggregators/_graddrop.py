r"""GradDrop: keep, per coordinate, only the gradients of one randomly chosen sign."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .._method import Seeded
from ._base import Aggregator
from ._partial import present_tasks


class GradDrop(Seeded, Aggregator):
    r"""Gradient Sign Dropout: per coordinate, drop the gradients of the losing sign.

    Chen et al., *Just Pick a Sign: Optimizing Deep Multitask Models with Gradient Sign
    Dropout*, NeurIPS 2020, arXiv `2010.06808 <https://arxiv.org/abs/2010.06808>`_
    (Algorithm 1; LibMTL's ``GradDrop``). For every column :math:`c` of ``J`` the positive sign
    purity is

    .. math::
        P_c = \tfrac12\Big(1 + \frac{\sum_i J_{ic}}{\sum_i |J_{ic}|}\Big) \in [0, 1]

    (:math:`P_c = \tfrac12` for an all-zero column). With one uniform draw
    :math:`U_c \sim \mathcal U[0, 1)` per column, task :math:`i` keeps its entry where its sign
    won, :math:`M_{ic} = [P_c > U_c][J_{ic} > 0] + [P_c < U_c][J_{ic} < 0]`, and row :math:`i`
    becomes :math:`(\ell_i + (1 - \ell_i) M_{i\cdot}) \odot g_i` with the leak
    :math:`\ell_i \in [0, 1]` (0 by default, as officially: full dropout; 1 keeps task
    :math:`i` untouched). :meth:`transform` returns these rows, the direction is their sum.
    Columns whose entries share one sign have :math:`P_c \in \{0, 1\}` and keep everything,
    so without any sign conflict GradDrop is the plain sum :math:`\sum_i g_i`. :math:`P` does
    not depend on the scale of ``J``, so with the same seed scaling ``J`` by :math:`c > 0`
    scales the result by :math:`c` (exactly for powers of two; otherwise a draw within
    rounding of :math:`P_c` may fall the other way).

    **Where it applies.** The paper (and LibMTL, which refuses anything else) applies GradDrop
    to the gradients at the shared representation :math:`z`: pass ``features=z`` to
    ``MTLOptimizer.backward`` (see docs/design.md, "Representation gradients"). It works on any
    ``(K, d)`` matrix, e.g. parameter gradients, too.

    **Deviations.** The official code multiplies :math:`\nabla_z L_i` by
    :math:`\operatorname{sign}(z)` and sums over the batch before computing :math:`P`, so one
    mask is shared by all samples of a feature; an aggregator receives only the flattened
    ``(K, batch·features)`` matrix, so purity and mask are per column (per sample and feature).
    The denominator's official ``+1e-7`` is replaced by the zero-column case above, which keeps
    the method scale-free. The paper's monotone transfer function :math:`f(P)` is the identity,
    its default and the only choice in the official code.

    **Randomness.** :math:`U` comes from a CPU ``torch.Generator`` seeded with ``seed`` (a
    random seed when ``None``; its state is in :meth:`state_dict`, so a resumed run draws the
    same masks). On another device one draw of it seeds a generator on that device, so no
    tensor crosses from the host and nothing is read back (no host sync); the masks are
    reproducible per device type (CPU and CUDA draw different numbers). :meth:`forward` and
    :meth:`transform` each draw. In distributed training give every rank the same ``seed``
    (the masks must agree; see docs/design.md, "Distributed training").

    **Partial labels.** With only m of the K tasks present, purity and masks are formed from
    the present rows alone (a missing task has no gradient to vote with); the draws are one per
    column and do not depend on the tasks, so the generator advances as in a call with every
    task. A per-task ``leak`` (K entries) is read at the present tasks.

    Args:
        leak: :math:`\ell`, one number for all tasks or one per task, each in ``[0, 1]``.
        seed: seed of the generator.
    """

    def __init__(self, leak: float | Sequence[float] = 0.0, *, seed: int | None = None) -> None:
        values = [leak] if isinstance(leak, (int, float)) else list(leak)
        if not values or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and 0.0 <= v <= 1.0
            for v in values
        ):
            raise ValueError(
                f"leak must be a number or a sequence of numbers in [0, 1], got {leak!r}"
            )
        self.leak = float(leak) if isinstance(leak, (int, float)) else tuple(map(float, values))
        super().__init__(seed)

    def forward(self, jacobian: Tensor) -> Tensor:
        return self.transform(jacobian).sum(dim=0)

    def transform(self, jacobian: Tensor) -> Tensor:
        work = jacobian.detach()
        dtype = work.dtype if work.dtype in (torch.float32, torch.float64) else torch.float32
        return self.drop(jacobian, self.draw(work.shape[1], dtype, work.device))

    def draw(self, d: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        """The ``(d,)`` uniform draws :math:`U` for a ``J`` with ``d`` columns (advances the
        generator); ``dtype`` is float32 or float64."""
        gen = self.generator_on(device)
        return torch.rand(d, generator=gen, dtype=dtype, device=device)

    def drop(self, jacobian: Tensor, draw: Tensor) -> Tensor:
        """The rows of :meth:`transform` for given draws ``U`` (one per column of ``J``).

        Every column is handled on its own, so a block of ``J``'s columns with the matching
        block of ``U`` gives the matching block of the result."""
        k = jacobian.shape[0]
        work = jacobian.detach()
        if work.dtype not in (torch.float32, torch.float64):
            work = work.float()
        total = work.abs().sum(dim=0)
        nonzero = total > 0
        purity = 0.5 * (
            1.0 + torch.where(nonzero, work.sum(dim=0) / torch.where(nonzero, total, 1.0), 0.0)
        )
        draw = draw.to(work.dtype)
        keep = ((purity > draw) & (work > 0)) | ((purity < draw) & (work < 0))

        # (ℓ + (1 - ℓ) M) ⊙ g with a 0/1 mask M; leaks stay Python floats (no host-to-device copy)
        if isinstance(self.leak, float):
            rows = torch.where(keep, work, self.leak * work)
        else:
            index, num_tasks = present_tasks(self, k)
            if len(self.leak) != num_tasks:
                raise ValueError(
                    f"leak has {len(self.leak)} entries but there are {num_tasks} tasks"
                )
            leaks = self.leak if index is None else [self.leak[i] for i in index.tolist()]
            rows = torch.stack([torch.where(m, g, ell * g) for m, g, ell in zip(keep, work, leaks)])
        return rows.to(jacobian.dtype)

    def __repr__(self) -> str:
        return f"GradDrop(leak={self.leak}, seed={self.seed})"
