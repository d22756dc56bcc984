r"""Knowledge distillation for MTL with task-specific adaptors.

Li & Bilen, *Knowledge Distillation for Multi-task Learning*, ECCV Workshops 2020,
arXiv `2007.06889 <https://arxiv.org/abs/2007.06889>`_; official code ``VICO-UoE/KD4MTL``.

Also home of what every distillation module here shares (:class:`_TeacherDistillation`): the
frozen single-task teachers, the per-task adaptors and the per-task output.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, cast, get_args

import torch
from torch import Tensor, nn

__all__ = ["AdaptorDistillation"]

#: A feature level, or several: a tensor ``(N, C, *spatial)`` / ``(N, C)``, or a sequence of them.
Features = Tensor | Sequence[Tensor]
#: Per-task values: a sequence with one entry per task, or a mapping task index -> entry.
PerTask = Sequence[Any] | Mapping[int, Any]

TeacherMode = Literal["eval", "train"]
TEACHER_MODES = get_args(TeacherMode)


def as_levels(features: Features, what: str) -> list[Tensor]:
    """The feature levels as a non-empty list of tensors of shape ``(N, C, ...)``."""
    items = [features] if isinstance(features, Tensor) else features
    if isinstance(items, (str, bytes)) or not isinstance(items, Sequence) or not items:
        raise TypeError(f"{what} must be a tensor or a non-empty sequence of tensors")
    for i, f in enumerate(items):
        if not isinstance(f, Tensor) or f.dim() < 2:
            raise TypeError(f"{what}[{i}] must be a tensor of shape (N, C, ...), got {f!r:.60}")
    return list(items)


def _channel_pairs(channels: Sequence[int | tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    """``channels`` per level: ``C`` (a ``C -> C`` adaptor) or ``(C_student, C_teacher)``."""
    if isinstance(channels, (int, str, bytes)) or not isinstance(channels, Sequence):
        raise TypeError(f"channels must be a sequence with one entry per level, got {channels!r}")
    if not channels:
        raise ValueError("channels is empty: give one entry per feature level")
    pairs = []
    for entry in channels:
        pair = (entry, entry) if isinstance(entry, int) else tuple(entry)
        if len(pair) != 2 or not all(
            isinstance(c, int) and not isinstance(c, bool) and c >= 1 for c in pair
        ):
            raise ValueError(
                f"each channels entry must be an int >= 1 or a pair of them, got {entry!r}"
            )
        pairs.append((pair[0], pair[1]))
    return tuple(pairs)


def _task_weights(weights: Sequence[float] | None, num_tasks: int) -> tuple[float, ...]:
    if weights is None:
        return (1.0,) * num_tasks
    values = tuple(float(w) for w in weights)
    if len(values) != num_tasks:
        raise ValueError(f"weights has {len(values)} entries, expected one per task ({num_tasks})")
    if not all(math.isfinite(w) and w >= 0 for w in values):
        raise ValueError(f"weights must be finite and >= 0, got {values!r}")
    return values


class _ChannelAdaptor(nn.Module):
    r"""A bias-free 1×1 convolution: :math:`y_{n,:,s} = W x_{n,:,s}` at every location ``s``
    of ``(N, C_in, *spatial)`` features (for ``(N, C_in)`` features, a bias-free linear map).

    ``nonlinear=True`` is URL's nonlinear adaptor :math:`W_2\,\mathrm{ReLU}(W_1 x)` with a hidden
    width of :math:`2 C_{in}`. Every :math:`W` (``out × in``) is Xavier-normal initialised,
    :math:`\mathcal N(0, 2/(C_{in} + C_{out}))`, as the official ``nn.Conv2d(.., 1,
    bias=False)`` weights are (a 1×1 kernel has the same fans).
    """

    def __init__(self, in_channels: int, out_channels: int, nonlinear: bool = False) -> None:
        super().__init__()
        self.in_channels, self.out_channels, self.nonlinear = in_channels, out_channels, nonlinear
        dims = [in_channels, 2 * in_channels] if nonlinear else [in_channels]
        dims.append(out_channels)
        self.weights = nn.ParameterList(
            nn.Parameter(nn.init.xavier_normal_(torch.empty(o, i))) for i, o in zip(dims, dims[1:])
        )

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() < 2 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"expected features of shape (N, {self.in_channels}, ...), got {tuple(x.shape)}"
            )
        h = x.movedim(1, -1)
        for i, w in enumerate(self.weights):
            h = nn.functional.linear(torch.relu(h) if i else h, w)
        return h.movedim(-1, 1)

    def extra_repr(self) -> str:
        kind = ", nonlinear=True" if self.nonlinear else ""
        return f"{self.in_channels}, {self.out_channels}{kind}"


class _TeacherDistillation(nn.Module):
    """Frozen single-task teachers, per-task adaptors, and one distillation term per task.

    The teachers are **not** submodules: :meth:`parameters`, :meth:`state_dict` and ``.to()``
    cover the adaptors only (so ``parameters()`` goes straight into an optimizer group of its
    own), and moving the teachers to a device is the caller's job. Subclasses pass the term of
    one task to :meth:`_per_task`.
    """

    def __init__(
        self,
        teachers: Sequence[nn.Module] | None,
        channels: Sequence[int | tuple[int, int]],
        *,
        num_tasks: int | None,
        weights: Sequence[float] | None,
        teacher_mode: str,
        teacher_forward: Callable[[nn.Module, Tensor], Any] | None,
        nonlinear: bool = False,
    ) -> None:
        super().__init__()
        if teachers is not None:
            if isinstance(teachers, nn.Module) or not isinstance(teachers, Sequence):
                raise TypeError("teachers must be a sequence of nn.Modules, one per task")
            teachers = tuple(teachers)
            if not teachers or not all(isinstance(m, nn.Module) for m in teachers):
                raise TypeError("teachers must be a non-empty sequence of nn.Modules")
            if num_tasks is not None and num_tasks != len(teachers):
                raise ValueError(f"num_tasks={num_tasks} but {len(teachers)} teachers were given")
            num_tasks = len(teachers)
        if isinstance(num_tasks, bool) or not isinstance(num_tasks, int) or num_tasks < 1:
            raise ValueError(f"give teachers, or num_tasks as an int >= 1; got {num_tasks!r}")
        if teacher_mode not in TEACHER_MODES:
            raise ValueError(f"teacher_mode must be one of {TEACHER_MODES}, got {teacher_mode!r}")
        if teacher_forward is not None and not callable(teacher_forward):
            raise TypeError(f"teacher_forward must be callable, got {teacher_forward!r}")
        self.num_tasks = num_tasks
        self._teachers = teachers
        self.levels = _channel_pairs(channels)
        self.weights = _task_weights(weights, num_tasks)
        self.teacher_mode = teacher_mode
        self.teacher_forward = teacher_forward
        self.nonlinear = bool(nonlinear)
        self.adaptors = nn.ModuleList(
            nn.ModuleList(_ChannelAdaptor(ci, co, self.nonlinear) for ci, co in self.levels)
            for _ in range(num_tasks)
        )

    def task_adaptors(self, t: int) -> nn.ModuleList:
        """Task ``t``'s adaptors, one per feature level."""
        return cast(nn.ModuleList, self.adaptors[t])

    @property
    def teachers(self) -> tuple[nn.Module, ...] | None:
        return self._teachers

    def teacher_outputs(self, x: Any, tasks: Sequence[int] | None = None) -> dict[int, Any]:
        """Run the teachers of ``tasks`` (default all) on ``x`` under ``no_grad``.

        Each teacher is put in ``teacher_mode`` first (``"eval"``: BN uses running statistics
        and never updates them) and is left in that mode.
        """
        if self._teachers is None:
            raise ValueError(
                f"{type(self).__name__} was built without teachers: pass teacher_outputs"
            )
        run = self.teacher_forward or (lambda m, inp: m(inp))
        out = {}
        with torch.no_grad():
            for t in self._check_tasks(tasks):
                teacher = self._teachers[t]
                teacher.train(self.teacher_mode == "train")
                out[t] = run(teacher, x)
        return out

    def _check_tasks(self, tasks: Sequence[int] | None) -> list[int]:
        if tasks is None:
            return list(range(self.num_tasks))
        chosen = list(tasks)
        if any(isinstance(t, bool) or not isinstance(t, int) for t in chosen) or not all(
            0 <= t < self.num_tasks for t in chosen
        ):
            raise ValueError(f"tasks must be task indices in [0, {self.num_tasks}), got {tasks!r}")
        if len(set(chosen)) != len(chosen):
            raise ValueError(f"tasks has repeated entries: {tasks!r}")
        return chosen

    def _per_task(
        self,
        student_features: Features,
        x: Any,
        teacher_outputs: PerTask | None,
        tasks: Sequence[int] | None,
        term: Callable[[int, list[Tensor], Any], Tensor],
    ) -> Tensor:
        r"""``(K,)``: :math:`\lambda_t` times ``term`` for each task in ``tasks``, 0 elsewhere."""
        levels = as_levels(student_features, "student_features")
        if len(levels) != len(self.levels):
            raise ValueError(
                f"got {len(levels)} student feature levels, the adaptors were built for "
                f"{len(self.levels)}"
            )
        chosen = self._check_tasks(tasks)
        if (x is None) == (teacher_outputs is None):
            raise ValueError("pass exactly one of x (to run the teachers) and teacher_outputs")
        if teacher_outputs is None:
            teacher_outputs = self.teacher_outputs(x, chosen)
        elif isinstance(teacher_outputs, Sequence) and len(teacher_outputs) != self.num_tasks:
            raise ValueError(
                f"teacher_outputs has {len(teacher_outputs)} entries, expected {self.num_tasks}"
            )
        zero = levels[0].new_zeros(())
        terms = [zero] * self.num_tasks
        for t in chosen:
            terms[t] = self.weights[t] * term(t, levels, teacher_outputs[t])
        return torch.stack(terms)

    def _options_repr(self) -> str:
        parts = [f"num_tasks={self.num_tasks}", f"channels={list(self.levels)}"]
        parts.append(f"weights={list(self.weights)}")
        parts.append(f"teacher_mode={self.teacher_mode!r}")
        return ", ".join(parts)


def channel_normalize(x: Tensor, eps: float) -> Tensor:
    r"""KD4MTL's channel-wise normalisation :math:`x / \sqrt{\sum_c x_c^2 + \varepsilon}`."""
    return x / (x.pow(2).sum(1, keepdim=True) + eps).sqrt()


class AdaptorDistillation(_TeacherDistillation):
    r"""Feature distillation from single-task teachers through task-specific adaptors.

    Li & Bilen, *Knowledge Distillation for Multi-task Learning*, ECCV-W 2020,
    arXiv `2007.06889 <https://arxiv.org/abs/2007.06889>`_.

    With the student's (shared) features :math:`f^l` at levels :math:`l` and teacher
    :math:`t`'s features :math:`f_t^l` at the same points, a bias-free 1×1 convolution
    :math:`A_t^l` per task and level maps the student into teacher :math:`t`'s space; both sides
    are L2-normalised along the channels at every location,
    :math:`\hat u = u / \sqrt{\sum_c u_c^2 + \varepsilon}`, and the term of task :math:`t` is

    .. math::
        \lambda_t D_t, \qquad
        D_t = \sum_l \operatorname{mean}_{n,\,s}
              \bigl\lVert \widehat{A_t^l f^l}_{n,:,s} - \widehat{f_t^l}_{n,:,s} \bigr\rVert_2^2,

    the mean running over the batch and the spatial locations ``s`` (none for ``(N, C)``
    features). The module returns the ``(K,)`` vector of these terms, so the training loss is
    :math:`\sum_t L_t + \sum_t \lambda_t D_t`, or per task for a gradient method::

        kd = AdaptorDistillation(teachers, channels=[512, 64], weights=(1, 1, 2))
        opt = mtl_optim.MTLOptimizer(
            [{"params": model.parameters()},
             {"params": kd.parameters(), "lr": 0.1, "weight_decay": 5e-4}],  # KD4MTL's adaptors
            base=torch.optim.Adam, lr=1e-4)
        preds, feats = model(x)                      # feats: the student's levels
        opt.backward(torch.stack(task_losses(preds)) + kd(feats, x))

    (the adaptors of task :math:`t` are reached by task :math:`t`'s objective only, so the
    optimizer treats them as task-specific parameters).

    The teachers run under ``no_grad`` (their features are also detached when passed in as
    ``teacher_outputs``), and each is switched to ``teacher_mode`` before it runs. Decisions (see
    docs/methods/distillation.md, "Adaptor distillation"): ``teacher_mode="eval"`` by default; the
    official code leaves the teachers in train mode (batch statistics, drifting running stats),
    available as ``"train"``. The defaults :math:`\lambda_t = 1` and :math:`\varepsilon = 10^{-6}`
    are KD4MTL's (its NYUv2 run used :math:`\lambda = (1, 1, 2)` for semantic, depth, normal); its
    adaptors were trained by a separate Adam (lr 0.1, weight decay 5e-4) while the student used lr
    1e-4.

    Args:
        teachers: one frozen single-task network per task, or ``None`` to pass the teachers'
            features to :meth:`forward` yourself (then give ``num_tasks``).
        channels: one entry per feature level: ``C`` (a ``C -> C`` adaptor) or
            ``(C_student, C_teacher)``.
        num_tasks: :math:`K`, when ``teachers`` is ``None``.
        weights: the :math:`\lambda_t` (default 1 each).
        eps: :math:`\varepsilon` inside the square root of the normalisation.
        teacher_mode: ``"eval"`` or ``"train"``.
        teacher_forward: ``f(teacher, x)`` returning the teacher's feature level(s) (default
            ``teacher(x)``), e.g. ``lambda m, x: m.embed(x)``.
    """

    def __init__(
        self,
        teachers: Sequence[nn.Module] | None,
        channels: Sequence[int | tuple[int, int]],
        *,
        num_tasks: int | None = None,
        weights: Sequence[float] | None = None,
        eps: float = 1e-6,
        teacher_mode: TeacherMode = "eval",
        teacher_forward: Callable[[nn.Module, Tensor], Features] | None = None,
    ) -> None:
        super().__init__(
            teachers,
            channels,
            num_tasks=num_tasks,
            weights=weights,
            teacher_mode=teacher_mode,
            teacher_forward=teacher_forward,
        )
        if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps >= 0):
            raise ValueError(f"eps must be finite and >= 0, got {eps!r}")
        self.eps = float(eps)

    def forward(
        self,
        student_features: Features,
        x: Any = None,
        *,
        teacher_outputs: PerTask | None = None,
        tasks: Sequence[int] | None = None,
    ) -> Tensor:
        r"""The ``(K,)`` terms :math:`\lambda_t D_t`.

        Args:
            student_features: the student's feature level(s), shared by all tasks.
            x: the input the teachers run on; or instead
            teacher_outputs: each task's teacher feature level(s) (a sequence of K entries, or
                a mapping task -> entry), as ``teacher_forward`` would return them.
            tasks: compute only these tasks' terms (the others are 0 and their teachers do not
                run).
        """
        return self._per_task(student_features, x, teacher_outputs, tasks, self._term)

    def _term(self, t: int, levels: list[Tensor], teacher: Any) -> Tensor:
        targets = as_levels(teacher, f"teacher {t}'s features")
        if len(targets) != len(levels):
            raise ValueError(
                f"teacher {t} gave {len(targets)} feature levels, the student {len(levels)}"
            )
        total = levels[0].new_zeros(())
        for lvl, (f, ft, adaptor) in enumerate(zip(levels, targets, self.task_adaptors(t))):
            a = adaptor(f)
            if a.shape != ft.shape:
                raise ValueError(
                    f"task {t}, level {lvl}: the adapted student features have shape "
                    f"{tuple(a.shape)}, the teacher's {tuple(ft.shape)}"
                )
            diff = channel_normalize(a, self.eps) - channel_normalize(ft.detach().to(a), self.eps)
            total = total + diff.pow(2).sum(1).mean()
        return total

    def __repr__(self) -> str:
        return f"AdaptorDistillation({self._options_repr()}, eps={self.eps!r})"
