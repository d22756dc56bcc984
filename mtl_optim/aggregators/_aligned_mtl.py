r"""Aligned-MTL: align the task gradients' principal components to equal magnitude."""

from __future__ import annotations

from typing import Literal, get_args

import torch
from torch import Tensor

from .._linalg import gramian
from .._validation import positive
from ._base import GramianWeightedAggregator

ScaleMode = Literal["min", "median", "rmse"]
_SCALE_MODES = get_args(ScaleMode)


class AlignedMTL(GramianWeightedAggregator):
    r"""Aligned-MTL: make the gradient system's condition number 1, then sum.

    Senushkin et al., *Independent Component Alignment for Multi-Task Learning*, CVPR 2023,
    arXiv `2305.19000 <https://arxiv.org/abs/2305.19000>`_ (official code: SamsungLabs/MTL,
    ``ProcrustesSolver``). With the eigen-decomposition of the Gramian
    :math:`M = JJ^\top = V\Lambda V^\top`, the eigenvalues :math:`\lambda_k` above
    :math:`\tau = K\,\lambda_{\max}\,` ``rtol`` kept (the rank :math:`r` of ``J``; the others are
    dropped, with their eigenvectors), the balance transform is

    .. math::
        B = \sigma\, V_r \Lambda_r^{-1/2} V_r^\top, \qquad
        \hat J = B J, \qquad d = \mathbf 1^\top \hat J = J^\top (B\mathbf 1),

    so the aligned gradients :math:`\hat J` (the rows of :meth:`transform`) are orthogonal with
    all :math:`r` singular values equal to :math:`\sigma` (:math:`\hat J \hat J^\top =
    \sigma^2 V_r V_r^\top`): condition number 1. :math:`B` is the closest such map
    (orthogonal Procrustes). The scale :math:`\sigma^2` is, over the kept eigenvalues,

    * ``"min"`` (official default): the smallest, :math:`\sigma = \sigma_{\min}`;
    * ``"median"``: their median (the lower middle value for an even count, as
      ``torch.median``);
    * ``"rmse"``: their mean, so :math:`\sigma` is the root mean square singular value.

    The weights are :math:`w = B\mathbf 1`: the official ``grads.sum(-1)`` (TorchJD's
    ``AlignedMTL`` uses the mean, i.e. :math:`w/K`). They depend on ``J`` only through the
    ratios of the eigenvalues, so they are invariant to scaling ``J`` (the direction scales
    with it), and permuting the tasks permutes them. A zero ``J`` (no eigenvalue kept) gets
    :math:`B = I`; a non-finite ``J`` gives NaN weights.

    **Deviations.** ``rtol`` defaults to the float32 machine epsilon, the official tolerance
    (``torch.finfo().eps`` of the default dtype), although our Gramian is float64. The official
    ``scale_decoder_grad`` option (rescaling each head's gradient by :math:`w_i`) is not
    offered: the heads get the gradient of the summed losses. The rank is handled with masks
    instead of slicing, so nothing is read back to the host, but ``torch.linalg.eigh``
    itself synchronises a CUDA device (PyTorch documents it); the matrix is only ``K×K``.

    Args:
        scale_mode: ``"min"``, ``"median"`` or ``"rmse"``.
        rtol: relative eigenvalue cut-off (times K and the largest eigenvalue).
    """

    def __init__(
        self, scale_mode: ScaleMode = "min", *, rtol: float = torch.finfo(torch.float32).eps
    ) -> None:
        if scale_mode not in _SCALE_MODES:
            raise ValueError(f"scale_mode must be one of {_SCALE_MODES}, got {scale_mode!r}")
        self.scale_mode = scale_mode
        self.rtol = positive("rtol", rtol)

    def balance(self, gram: Tensor) -> Tensor:
        """The ``(K, K)`` float64 balance transform :math:`B` from a float64 Gramian."""
        gram = gram.to(torch.float64)
        k = gram.shape[0]
        eye = torch.eye(k, dtype=torch.float64, device=gram.device)
        finite = torch.isfinite(gram).all()
        lam, vecs = torch.linalg.eigh(torch.where(finite, gram, eye))  # ascending
        keep = (lam > k * lam[-1] * self.rtol) & (lam > 0)
        rank = keep.sum()
        if self.scale_mode == "min":
            scale = torch.where(keep, lam, torch.inf).amin()
        elif self.scale_mode == "median":  # kept = the top `rank`; lower median, as torch.median
            middle = (k - rank + (rank - 1).clamp(min=0) // 2).clamp(max=k - 1)
            scale = lam.index_select(0, middle.reshape(1)).squeeze(0)  # no host read
        else:
            scale = torch.where(keep, lam, 0.0).sum() / rank.clamp(min=1)
        inv = torch.where(keep, lam, 1.0)
        factors = torch.where(keep, (scale / inv).sqrt(), 0.0)
        balance = (vecs * factors) @ vecs.T
        balance = torch.where(rank > 0, balance, eye)
        return torch.where(finite, balance, torch.full_like(balance, torch.nan))

    def weights_from_gramian(self, gram: Tensor) -> Tensor:
        return self.balance(gram).sum(dim=1)

    def transform(self, jacobian: Tensor) -> Tensor:
        j = jacobian.detach()
        if not j.is_floating_point():
            j = j.double()
        aligned = self.balance(gramian(j))
        return aligned.to(device=jacobian.device, dtype=j.dtype) @ j

    def __repr__(self) -> str:
        return f"AlignedMTL(scale_mode={self.scale_mode!r}, rtol={self.rtol})"
