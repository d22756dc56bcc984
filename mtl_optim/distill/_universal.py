r"""Universal Representations: distilling single-task teachers into one network.

Li, Liu & Bilen, *Universal Representations: A Unified Look at Multiple Task and Domain
Learning*, IJCV 2023, arXiv `2204.02744 <https://arxiv.org/abs/2204.02744>`_; official code
``VICO-UoE/UniversalRepresentations`` (``DensePred/nyu_url.py``, ``VisualDecathlon``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Literal, get_args

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .._validation import check_int
from ._adaptor import Features, PerTask, TeacherMode, _TeacherDistillation, as_levels

__all__ = ["UniversalRepresentationLoss"]

Form = Literal["dense", "classification"]
FORMS = get_args(Form)
#: ``F.normalize``'s floor under the norm, as in the official code.
NORM_EPS = 1e-12
#: Floor under the median squared distance (the RBF bandwidth) and under HSIC(X, X).
CKA_EPS = 1e-12


def _rbf_kernel(x: Tensor) -> Tensor:
    r"""``K_ij = exp(-‖x_i - x_j‖² / (2 σ²))`` with :math:`\sigma^2` the median of the nonzero
    squared distances (``torch.median``: the lower middle value), floored at ``CKA_EPS``.

    The bandwidth is a constant for autograd: the official code turns it into a Python float.
    """
    gram = x @ x.T
    sq = gram.diagonal()
    dist2 = sq[:, None] + sq[None, :] - 2 * gram
    with torch.no_grad():
        nonzero = dist2[dist2 != 0]
        median = nonzero.median() if nonzero.numel() else dist2.new_zeros(())
        bandwidth = median.clamp(min=CKA_EPS)
    return torch.exp(dist2 * (-0.5 / bandwidth))


def _hsic(k: Tensor, other: Tensor) -> Tensor:
    r""":math:`\sum_{ij} (HKH)_{ij} (HLH)_{ij}` with :math:`H = I - \mathbf 1\mathbf 1^\top/n`."""

    def center(m: Tensor) -> Tensor:
        return m - m.mean(0, keepdim=True) - m.mean(1, keepdim=True) + m.mean()

    return (center(k) * center(other)).sum()


def _rbf_cka(x: Tensor, y: Tensor) -> Tensor:
    r"""Kernel CKA with RBF kernels of median bandwidth (one per matrix):

    .. math::
        \mathrm{CKA}(X, Y) = \frac{\mathrm{HSIC}(K_X, K_Y)}
            {\sqrt{\max(\mathrm{HSIC}(K_X, K_X), \epsilon)}\sqrt{\max(\mathrm{HSIC}(K_Y, K_Y),
            \epsilon)}}

    for ``(n, d_x)`` and ``(n, d_y)`` matrices of ``n`` samples.
    """
    kx, ky = _rbf_kernel(x), _rbf_kernel(y)
    norm_x = _hsic(kx, kx).clamp(min=CKA_EPS).sqrt()
    norm_y = _hsic(ky, ky).clamp(min=CKA_EPS).sqrt()
    return _hsic(kx, ky) / (norm_x * norm_y)


def _distill_kl(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    r""":math:`\frac{T^2}{N} \sum_n \mathrm{KL}(\mathrm{softmax}(y_t/T) \,\|\,
    \mathrm{softmax}(y_s/T))` over the ``(N, C)`` logits."""
    log_p_s = F.log_softmax(student / temperature, dim=1)
    p_t = F.softmax(teacher / temperature, dim=1)
    return F.kl_div(log_p_s, p_t, reduction="sum") * temperature**2 / student.shape[0]


def _nonnegative(name: str, value: float) -> float:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be finite and >= 0, got {value!r}")
    return float(value)


class UniversalRepresentationLoss(_TeacherDistillation):
    r"""Universal Representations (URL): distil K single-task teachers into one student
    through per-task adaptors (see docs/methods/distillation.md, "Universal Representations").

    Li, Liu & Bilen, *Universal Representations: A Unified Look at Multiple Task and Domain
    Learning*, IJCV 2023, arXiv `2204.02744 <https://arxiv.org/abs/2204.02744>`_.

    Each task :math:`t` has bias-free 1×1-conv adaptors :math:`A_t^l` (Xavier-normal), one per
    student feature level :math:`f^l`; :math:`\hat u = u / \max(\lVert u\rVert_2,
    10^{-12})` is the L2 normalisation along the channels (``F.normalize``). The module returns
    the ``(K,)`` per-task terms, with :math:`w(e)` the annealing weight below:

    ``form="dense"`` (``DensePred/nyu_url.py``): only the teacher's **last** feature
    :math:`f_t` is distilled, from every student level; an adapted map whose spatial size
    differs from the teacher's is resized to it (bilinear, ``align_corners=False``) before the
    normalisation:

    .. math::
        \lambda_t\, w(e)\, \sigma \sum_l \operatorname{mean}_{n,s}
            \bigl\lVert \widehat{R(A_t^l f^l)}_{n,:,s} - \widehat{f_t}_{n,:,s}\bigr\rVert_2^2 .

    ``form="classification"`` (``VisualDecathlon``): one feature level, flattened to
    ``(N, D)`` after the adaptor; an RBF-kernel CKA on the features and a temperature KL on the
    logits (teacher ``t`` returns ``(features, logits)``, the student's logits of task ``t``
    are ``logits[t]``):

    .. math::
        \lambda_t\, w(e) \Bigl[\sigma \bigl(1 - \mathrm{CKA}_{rbf}(\widehat{A_t f},
            \widehat{f_t})\bigr) + \beta\, \frac{T^2}{N} \sum_n
            \mathrm{KL}\bigl(\mathrm{softmax}(y_t/T) \,\|\, \mathrm{softmax}(y_s/T)\bigr)\Bigr].

    CKA uses :math:`K_{ij} = \exp(-\lVert x_i - x_j\rVert^2 / 2\sigma_X^2)` with
    :math:`\sigma_X^2` the median nonzero squared distance of that matrix (a constant for
    autograd), centring :math:`H = I - \mathbf 1 \mathbf 1^\top / n` and
    :math:`\mathrm{HSIC}(K, L) = \sum_{ij} (HKH)_{ij} (HLH)_{ij}`.

    Annealing: with ``total_epochs`` :math:`E`, :math:`w(e) = \max(0, 1 - e/E)` (the official
    linear ``WeightAnnealing``) at the epoch set by :meth:`step`; ``total_epochs=None`` keeps
    :math:`w = 1` (the dense code does not anneal). Call ``loss.step(epoch)`` at the start of
    each epoch; the epoch is in :meth:`state_dict`.

    Official settings: dense NYUv2 :math:`\lambda = (1, 1, 2)`, adaptors 512→64 and 64→64 trained by
    Adam (lr 1e-2, weight decay 5e-4, cosine annealing), the student Adam 1e-4; classification
    :math:`T = 8`, :math:`\sigma = \beta = 1`, :math:`\lambda` = 10 for ImageNet, 0.1 for Daimler
    pedestrians and 1 otherwise, annealed over the whole run (:math:`E` = the number of epochs).
    Decision: ``teacher_mode="eval"`` by default (see
    docs/methods/distillation.md, "Adaptor distillation"); ``"train"`` for parity. The official
    multi-domain code feeds each task its own batch: call the module once per task with
    ``tasks=[t]`` and that task's batch, and add the results.

    Args:
        teachers: one frozen single-task network per task, or ``None`` (give ``num_tasks`` and
            pass ``teacher_outputs``).
        channels: per student level, ``C`` or ``(C_student, C_teacher_last)``; exactly one
            level for ``"classification"``.
        form: ``"dense"`` or ``"classification"``.
        num_tasks: :math:`K`, when ``teachers`` is ``None``.
        weights: the :math:`\lambda_t` (default 1 each).
        sigma: :math:`\sigma`, the weight of the feature term.
        beta: :math:`\beta`, the weight of the KL term (classification only).
        temperature: :math:`T` (classification only).
        total_epochs: :math:`E` of the linear annealing, or ``None`` (no annealing).
        nonlinear: URL's nonlinear adaptors (:math:`C \to 2C`, ReLU, :math:`\to C'`).
        teacher_mode: ``"eval"`` or ``"train"``.
        teacher_forward: ``f(teacher, x)`` returning the teacher's feature level(s) (dense) or
            ``(features, logits)`` (classification); default ``teacher(x)``.
    """

    def __init__(
        self,
        teachers: Sequence[nn.Module] | None,
        channels: Sequence[int | tuple[int, int]],
        *,
        form: Form = "dense",
        num_tasks: int | None = None,
        weights: Sequence[float] | None = None,
        sigma: float = 1.0,
        beta: float = 1.0,
        temperature: float = 8.0,
        total_epochs: int | None = None,
        nonlinear: bool = False,
        teacher_mode: TeacherMode = "eval",
        teacher_forward: Callable[[nn.Module, Tensor], Any] | None = None,
    ) -> None:
        if form not in FORMS:
            raise ValueError(f"form must be one of {FORMS}, got {form!r}")
        super().__init__(
            teachers,
            channels,
            num_tasks=num_tasks,
            weights=weights,
            teacher_mode=teacher_mode,
            teacher_forward=teacher_forward,
            nonlinear=nonlinear,
        )
        if form == "classification" and len(self.levels) != 1:
            raise ValueError(
                f"form='classification' distils one feature level, got {len(self.levels)}"
            )
        if not (
            isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0
        ):
            raise ValueError(f"temperature must be a positive number, got {temperature!r}")
        check_int("total_epochs", total_epochs, 1, optional=True)
        self.form = form
        self.sigma = _nonnegative("sigma", sigma)
        self.beta = _nonnegative("beta", beta)
        self.temperature = float(temperature)
        self.total_epochs = total_epochs
        self.epoch = 0

    def step(self, epoch: int) -> None:
        """Set the current epoch (0-based) for the annealing weight."""
        self.epoch = check_int("epoch", epoch, 0)

    def annealing_weight(self, epoch: int | None = None) -> float:
        r""":math:`w(e) = \max(0, 1 - e/E)`, or 1 without ``total_epochs`` (``e``: default the
        current epoch)."""
        e = self.epoch if epoch is None else epoch
        if self.total_epochs is None:
            return 1.0
        return max(0.0, 1.0 - e / self.total_epochs)

    def forward(
        self,
        student_features: Features,
        x: Any = None,
        *,
        logits: PerTask | None = None,
        teacher_outputs: PerTask | None = None,
        tasks: Sequence[int] | None = None,
    ) -> Tensor:
        """The ``(K,)`` per-task terms.

        Args:
            student_features: the student's feature level(s), shared by all tasks.
            x: the input the teachers run on; or instead
            teacher_outputs: per task (a sequence of K entries or a mapping task -> entry),
                what ``teacher_forward`` returns.
            logits: the student's logits per task (classification only; a sequence of K
                entries or a mapping task -> ``(N, C_t)`` tensor).
            tasks: compute only these tasks' terms (the others are 0, their teachers idle).
        """
        if self.form == "dense":
            if logits is not None:
                raise ValueError("logits are used by form='classification' only")
            term = self._dense
        else:
            if logits is None:
                raise ValueError("form='classification' needs the student's logits per task")
            if isinstance(logits, Sequence) and len(logits) != self.num_tasks:
                raise ValueError(f"logits has {len(logits)} entries, expected {self.num_tasks}")

            def term(t: int, levels: list[Tensor], teacher: Any) -> Tensor:
                return self._classification(t, levels, teacher, logits[t])

        return self._per_task(student_features, x, teacher_outputs, tasks, term)

    def _dense(self, t: int, levels: list[Tensor], teacher: Any) -> Tensor:
        target = as_levels(teacher, f"teacher {t}'s features")[-1].detach()
        target_hat = F.normalize(target.to(levels[0]), dim=1, eps=NORM_EPS)
        total = levels[0].new_zeros(())
        for lvl, (f, adaptor) in enumerate(zip(levels, self.task_adaptors(t))):
            a = adaptor(f)
            if a.dim() == 4 and target.dim() == 4 and a.shape[2:] != target.shape[2:]:
                a = F.interpolate(a, size=target.shape[2:], mode="bilinear", align_corners=False)
            if a.shape != target.shape:
                raise ValueError(
                    f"task {t}, level {lvl}: the adapted student features have shape "
                    f"{tuple(a.shape)}, the teacher's last features {tuple(target.shape)}"
                )
            diff = F.normalize(a, dim=1, eps=NORM_EPS) - target_hat
            total = total + diff.pow(2).sum(1).mean()
        return self.annealing_weight() * self.sigma * total

    def _classification(self, t: int, levels: list[Tensor], teacher: Any, logits: Tensor) -> Tensor:
        if not (isinstance(teacher, Sequence) and len(teacher) == 2):
            raise TypeError(f"teacher {t} must give (features, logits), got {type(teacher)}")
        features, teacher_logits = (v.detach() for v in teacher)
        fs = self.task_adaptors(t)[0](levels[0]).flatten(1)
        ft = features.to(fs).flatten(1)
        if fs.shape != ft.shape:
            raise ValueError(
                f"task {t}: the adapted student features have shape {tuple(fs.shape)}, the "
                f"teacher's {tuple(ft.shape)}"
            )
        if logits.shape != teacher_logits.shape:
            raise ValueError(
                f"task {t}: student logits {tuple(logits.shape)} vs teacher logits "
                f"{tuple(teacher_logits.shape)}"
            )
        cka = _rbf_cka(F.normalize(fs, dim=1, eps=NORM_EPS), F.normalize(ft, dim=1, eps=NORM_EPS))
        kl = _distill_kl(logits, teacher_logits.to(logits), self.temperature)
        return self.annealing_weight() * (self.sigma * (1 - cka) + self.beta * kl)

    def get_extra_state(self) -> dict[str, int]:
        return {"epoch": self.epoch}

    def set_extra_state(self, state: dict[str, int]) -> None:
        self.step(int(state["epoch"]))

    def __repr__(self) -> str:
        parts = [f"form={self.form!r}", self._options_repr(), f"sigma={self.sigma!r}"]
        if self.form == "classification":
            parts += [f"beta={self.beta!r}", f"temperature={self.temperature!r}"]
        parts.append(f"total_epochs={self.total_epochs!r}")
        return f"UniversalRepresentationLoss({', '.join(parts)})"
