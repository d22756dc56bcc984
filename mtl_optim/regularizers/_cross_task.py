r"""Cross-task consistency for two tasks: XTasC-Net (Nakano, Chen & Demachi, 2021).

Nakano, Chen & Demachi, *Cross-Task Consistency Learning Framework for Multi-Task Learning*,
arXiv `2111.14122 <https://arxiv.org/abs/2111.14122>`_; official code ``akarimoon/xtask_mt``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Literal, get_args

import torch
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = [
    "CrossTaskConsistency",
    "TaskTransferNet",
    "masked_cross_entropy",
    "masked_l1",
]

Target = Literal["prediction", "label"]
TARGETS = get_args(Target)

#: ``loss(prediction, target, mask) -> scalar``; ``mask`` may be ``None``.
PairLoss = Callable[[Tensor, Tensor, "Tensor | None"], Tensor]


def _spatial_mask(mask: Tensor, like: Tensor, with_channels: bool) -> Tensor:
    """``mask`` as a bool tensor broadcast to ``like``'s shape; a mask without the channel
    dimension (``(N, H, W)`` for ``(N, C, H, W)``) gets one."""
    if mask.dtype != torch.bool:
        mask = mask != 0
    if with_channels and mask.dim() == like.dim() - 1:
        mask = mask.unsqueeze(1)
    try:
        return mask.expand_as(like)
    except RuntimeError:
        raise ValueError(
            f"mask of shape {tuple(mask.shape)} does not broadcast to {tuple(like.shape)}"
        ) from None


def masked_l1(pred: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
    r"""Masked L1: the mean over each sample's valid elements, then over the samples.

    .. math::
        \ell(\hat y, y) = \operatorname{mean}_{n \in V}
            \frac{\sum_p m_{n,p}\,|\hat y_{n,p} - y_{n,p}|}{\sum_p m_{n,p}},

    with :math:`V` the samples that have at least one valid element (0 if there is none).
    Invalid elements change neither the value nor the gradient (they are selected out with
    ``torch.where``, so even a NaN there does not leak). ``mask`` (nonzero = valid) has the
    prediction's shape, or lacks its channel dimension 1.
    """
    if pred.shape != target.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    diff = (pred - target).abs()
    if mask is None:
        return diff.flatten(1).mean(1).mean() if diff.dim() > 1 else diff.mean()
    m = _spatial_mask(mask, diff, with_channels=True)
    diff = torch.where(m, diff, torch.zeros((), dtype=diff.dtype, device=diff.device))
    if diff.dim() == 1:
        return diff.sum() / m.sum().clamp(min=1)
    count = m.flatten(1).sum(1)
    per_sample = diff.flatten(1).sum(1) / count.clamp(min=1)
    has = (count > 0).to(diff.dtype)
    return (per_sample * has).sum() / has.sum().clamp(min=1)


def masked_cross_entropy(
    logits: Tensor, target: Tensor, mask: Tensor | None = None, *, ignore_index: int = -100
) -> Tensor:
    r"""Cross-entropy averaged over the valid positions only (0 if there is none).

    ``logits`` is ``(N, C, ...)`` and ``target`` ``(N, ...)`` class indices; a position is
    valid where ``target != ignore_index`` and ``mask`` (if given, nonzero = valid, shaped like
    ``target`` or with a singleton channel dimension) holds. Invalid positions change neither the
    value nor the gradient, and they do not count in the denominator (the official code's
    smoothed cross-entropy counts them; ours does not).
    """
    valid = target != ignore_index
    if mask is not None:
        if mask.dim() == target.dim() + 1 and mask.shape[1] == 1:
            mask = mask.squeeze(1)
        valid = valid & _spatial_mask(mask, target, with_channels=False)
    safe = torch.where(valid, target, torch.zeros_like(target))
    per = F.cross_entropy(logits, safe, reduction="none")
    per = torch.where(valid, per, torch.zeros((), dtype=per.dtype, device=per.device))
    return per.sum() / valid.sum().clamp(min=1)


def _conv_block(c_in: int, c_out: int, batch_norm: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    for c in (c_in, c_out):
        layers.append(nn.Conv2d(c, c_out, 3, padding=1, bias=not batch_norm))
        if batch_norm:
            layers.append(nn.BatchNorm2d(c_out))
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class TaskTransferNet(nn.Module):
    r"""The small U-Net that maps one task's dense prediction to the other task's space.

    Three down blocks (two conv3×3 + ReLU, then a 2×2 max-pool) of ``widths`` channels, a
    bottleneck block, three up blocks (bilinear resize to the skip's size, concatenation with
    the skip, two conv3×3 + ReLU) and a bias-free 1×1 output conv, as in the official
    ``transfer_net.py`` (widths 64/128/256; ``batch_norm`` adds BatchNorm after each conv).
    The up path resizes to each skip's exact size, so any input size works.

    Args:
        in_channels: the source task's channels.
        out_channels: the target task's channels.
        widths: channels of the three down blocks (the bottleneck doubles the last).
        batch_norm: BatchNorm after every conv.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        widths: Sequence[int] = (64, 128, 256),
        batch_norm: bool = False,
    ) -> None:
        super().__init__()
        for name, v in (("in_channels", in_channels), ("out_channels", out_channels)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        widths = tuple(widths)
        if len(widths) != 3 or not all(isinstance(w, int) and w >= 1 for w in widths):
            raise ValueError(f"widths must be three ints >= 1, got {widths!r}")
        w1, w2, w3 = widths
        self.down = nn.ModuleList(
            [
                _conv_block(in_channels, w1, batch_norm),
                _conv_block(w1, w2, batch_norm),
                _conv_block(w2, w3, batch_norm),
            ]
        )
        self.bottleneck = _conv_block(w3, 2 * w3, batch_norm)
        self.up = nn.ModuleList(
            [
                _conv_block(2 * w3 + w3, w3, batch_norm),
                _conv_block(w3 + w2, w2, batch_norm),
                _conv_block(w2 + w1, w1, batch_norm),
            ]
        )
        self.out = nn.Conv2d(w1, out_channels, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        skips = []
        for block in self.down:
            x = block(x)
            skips.append(x)
            x = F.max_pool2d(x, 2, ceil_mode=True)
        x = self.bottleneck(x)
        for block, skip in zip(self.up, reversed(skips)):
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = block(torch.cat([x, skip], dim=1))
        return self.out(x)


def _identity(x: Tensor) -> Tensor:
    return x


def _argmax_channels(x: Tensor) -> Tensor:
    return x.argmax(1)


def _log_softmax_channels(x: Tensor) -> Tensor:
    return F.log_softmax(x, dim=1)


def _weight(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number in [0, 1], got {value!r}")
    if not (math.isfinite(value) and 0 <= value <= 1):
        raise ValueError(f"{name} must be in [0, 1], got {value!r}")
    return float(value)


class CrossTaskConsistency(nn.Module):
    r"""XTasC-Net's cross-task terms for two tasks :math:`a, b`, with both transfer networks.

    Nakano, Chen & Demachi, *Cross-Task Consistency Learning Framework for Multi-Task
    Learning*, arXiv `2111.14122 <https://arxiv.org/abs/2111.14122>`_ (official code
    ``akarimoon/xtask_mt``). Two transfer networks map each task's prediction into the other
    task's space, :math:`\tilde y_b = T_{a\to b}(\iota_a(\hat y_a))` and
    :math:`\tilde y_a = T_{b\to a}(\iota_b(\hat y_b))` (:math:`\iota`: ``input_a`` /
    ``input_b``, e.g. ``log_softmax`` of segmentation logits), and the module returns the
    ``(2,)`` terms

    .. math::
        C_{a\to b} = \ell_b\bigl(\tilde y_b,\ \tau_b\bigr), \qquad
        C_{b\to a} = \ell_a\bigl(\tilde y_a,\ \tau_a\bigr),

    where the target :math:`\tau` depends on ``target``:

    * ``"prediction"`` (default; the official ``xtsc`` mode and our reading of the paper's
      **cross-task consistency loss**): the other head's prediction, detached and mapped by
      ``pseudo_label_a``/``_b`` (e.g. :math:`\tau_a = \arg\max_c \operatorname{sg}(\hat
      y_a)`, a hard pseudo-label, for segmentation). The transferred prediction is pulled
      towards the direct one, so the two heads must predict consistently.
    * ``"label"`` (the official ``xtc`` mode and our reading of the paper's **alignment
      loss**): the ground truth :math:`y_a`, :math:`y_b`.

    The paper's method section was not available to us; the abstract says the consistency
    loss aligns the transferred predictions with the direct ones, which is what the
    ``"prediction"`` target does, hence the reading above (documented, not verified).

    :math:`C_{a\to b}` trains :math:`T_{a\to b}`, head :math:`a` and the shared encoder
    (through :math:`\hat y_a`); its target is detached, so no gradient reaches head :math:`b`
    through it. The two per-task objectives, grouped by source head, are
    (:meth:`objectives`, :math:`\lambda` = ``weights``; official 0.01 on Cityscapes, 1e-4 on
    NYUv2)

    .. math::
        G_a = (1-\lambda_1) L_a + \lambda_1 C_{a\to b}, \qquad
        G_b = (1-\lambda_2) L_b + \lambda_2 C_{b\to a},

    handed to ``MTLOptimizer`` as the K = 2 losses; the reported setting trains them with
    uncertainty weighting :math:`\tfrac12 e^{-\sigma}G + \sigma` per task, which is 2 × our
    ``weighting.Uncertainty(2, factors=(4, 4))``. The transfer networks are this module's
    parameters: give them to the optimizer (the official code trains them with the model, from
    random weights, never frozen).

    With ``target="prediction"`` only the direct losses keep the trivial solution (constant
    predictions and constant transfer maps) away, since :math:`\lambda` is small.

    Decisions: masked pixels are excluded out of place and averaged over valid pixels only
    (:func:`masked_l1`, :func:`masked_cross_entropy`); the official smoothed cross-entropy
    counts them in the mean's denominator, and its NYUv2 script passes no depth mask (pass
    ``mask_b=(y_depth > 0)``). One backward of the sum replaces the official two
    ``retain_graph`` backwards (equal gradients). No cycle :math:`T_{b\to a}(T_{a\to b}(\cdot))`
    is composed (as in the official code). The paper covers two tasks; for more, the pairwise
    :class:`PairwiseTaskConsistency` scales to every ordered pair.

    Args:
        transfer_ab: :math:`T_{a\to b}` (an ``nn.Module``, e.g. :class:`TaskTransferNet`).
        transfer_ba: :math:`T_{b\to a}`.
        loss_a: :math:`\ell_a(\text{prediction}, \text{target}, \text{mask})` in task a's space.
        loss_b: :math:`\ell_b`, in task b's space.
        target: ``"prediction"`` or ``"label"``.
        input_a, input_b: :math:`\iota`, applied to a prediction before its transfer network
            (default identity).
        pseudo_label_a, pseudo_label_b: map a detached prediction to a target (``"prediction"``
            mode; default identity).
        weights: :math:`(\lambda_1, \lambda_2)` for :meth:`objectives`, each in [0, 1].
    """

    def __init__(
        self,
        transfer_ab: nn.Module,
        transfer_ba: nn.Module,
        loss_a: PairLoss,
        loss_b: PairLoss,
        *,
        target: Target = "prediction",
        input_a: Callable[[Tensor], Tensor] | None = None,
        input_b: Callable[[Tensor], Tensor] | None = None,
        pseudo_label_a: Callable[[Tensor], Tensor] | None = None,
        pseudo_label_b: Callable[[Tensor], Tensor] | None = None,
        weights: tuple[float, float] = (0.01, 0.01),
    ) -> None:
        super().__init__()
        for name, net in (("transfer_ab", transfer_ab), ("transfer_ba", transfer_ba)):
            if not isinstance(net, nn.Module):
                raise TypeError(f"{name} must be an nn.Module, got {type(net).__name__}")
        for name, fn in (("loss_a", loss_a), ("loss_b", loss_b)):
            if not callable(fn):
                raise TypeError(f"{name} must be callable (prediction, target, mask) -> loss")
        if target not in TARGETS:
            raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
        if not (isinstance(weights, (tuple, list)) and len(weights) == 2):
            raise ValueError(f"weights must be a pair (lambda_1, lambda_2), got {weights!r}")
        self.transfer_ab = transfer_ab
        self.transfer_ba = transfer_ba
        self.loss_a, self.loss_b = loss_a, loss_b
        self.target = target
        self.input_a = input_a or _identity
        self.input_b = input_b or _identity
        self.pseudo_label_a = pseudo_label_a or _identity
        self.pseudo_label_b = pseudo_label_b or _identity
        self.weights = (_weight("weights[0]", weights[0]), _weight("weights[1]", weights[1]))

    @classmethod
    def segmentation_depth(
        cls,
        num_classes: int,
        *,
        ignore_index: int = -1,
        target: Target = "prediction",
        widths: Sequence[int] = (64, 128, 256),
        batch_norm: bool = False,
        weights: tuple[float, float] = (0.01, 0.01),
    ) -> CrossTaskConsistency:
        r"""The paper's pair: task a = semantic segmentation (``num_classes`` logits), task b =
        depth (one channel). :math:`T_{s\to d}` reads ``log_softmax`` of the logits,
        :math:`T_{d\to s}` the raw depth; depth terms are :func:`masked_l1`, segmentation
        terms :func:`masked_cross_entropy` with ``ignore_index`` (official: 250 on Cityscapes,
        -1 on NYUv2) and, in ``"prediction"`` mode, the argmax pseudo-label."""

        def seg_loss(logits: Tensor, tgt: Tensor, mask: Tensor | None) -> Tensor:
            return masked_cross_entropy(logits, tgt, mask, ignore_index=ignore_index)

        return cls(
            TaskTransferNet(num_classes, 1, widths, batch_norm),
            TaskTransferNet(1, num_classes, widths, batch_norm),
            seg_loss,
            masked_l1,
            target=target,
            input_a=_log_softmax_channels,
            pseudo_label_a=_argmax_channels,
            weights=weights,
        )

    def forward(
        self,
        pred_a: Tensor,
        pred_b: Tensor,
        y_a: Tensor | None = None,
        y_b: Tensor | None = None,
        mask_a: Tensor | None = None,
        mask_b: Tensor | None = None,
    ) -> Tensor:
        r"""The ``(2,)`` terms :math:`(C_{a\to b}, C_{b\to a})`.

        Args:
            pred_a, pred_b: the two heads' direct predictions (in the graph).
            y_a, y_b: the labels (needed with ``target="label"``, unused otherwise).
            mask_a, mask_b: valid positions in each task's space (or ``None``).
        """
        if self.target == "label":
            if y_a is None or y_b is None:
                raise ValueError("target='label' needs both labels y_a and y_b")
            tgt_a, tgt_b = y_a, y_b
        else:
            with torch.no_grad():
                tgt_a = self.pseudo_label_a(pred_a.detach())
                tgt_b = self.pseudo_label_b(pred_b.detach())
        c_ab = self.loss_b(self.transfer_ab(self.input_a(pred_a)), tgt_b, mask_b)
        c_ba = self.loss_a(self.transfer_ba(self.input_b(pred_b)), tgt_a, mask_a)
        return torch.stack([c_ab.reshape(()), c_ba.reshape(())])

    def objectives(self, direct: Sequence[Tensor] | Tensor, terms: Tensor) -> Tensor:
        r"""The ``(2,)`` objectives :math:`G = (1-\lambda) \odot L + \lambda \odot C`.

        Args:
            direct: the direct losses :math:`(L_a, L_b)`.
            terms: what :meth:`forward` returned.
        """
        losses = direct if isinstance(direct, Tensor) else torch.stack(list(direct))
        if losses.shape != (2,) or terms.shape != (2,):
            raise ValueError(
                f"expected two direct losses and two terms, got shapes {tuple(losses.shape)} "
                f"and {tuple(terms.shape)}"
            )
        lam = torch.tensor(self.weights, dtype=terms.dtype, device=terms.device)
        return (1 - lam) * losses + lam * terms

    def extra_repr(self) -> str:
        return f"target={self.target!r}, weights={self.weights}"
