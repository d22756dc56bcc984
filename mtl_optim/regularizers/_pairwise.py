r"""Pairwise task-space consistency for partially labelled data: MTPSL (Li, Liu & Bilen, 2022).

Li, Liu & Bilen, *Learning Multiple Dense Prediction Tasks from Partially Annotated Data*,
CVPR 2022, arXiv `2111.14893 <https://arxiv.org/abs/2111.14893>`_; official code
``VICO-UoE/MTPSL``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal, cast, get_args

import torch
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = ["PairwiseTaskConsistency"]

Kind = Literal["categorical", "depth", "normal", "none"]
Pairs = Literal["unlabelled", "all"]
KINDS = get_args(Kind)
PAIRS = get_args(Pairs)
#: ``F.cosine_similarity``'s eps and the floor under the depth maximum (official values).
COS_EPS = 1e-12
DEPTH_EPS = 1e-12


def _hard_gumbel(logits: Tensor, tau: float = 1.0) -> Tensor:
    r"""Straight-through hard Gumbel-softmax over dimension 1 (one-hot forward, the soft
    sample's gradient backward), on the log-probabilities as in the official code."""
    logp = F.log_softmax(logits, dim=1)
    gumbel = -torch.empty_like(logp).exponential_().log()
    soft = F.softmax((logp + gumbel) / tau, dim=1)
    hard = torch.zeros_like(soft).scatter_(1, soft.argmax(1, keepdim=True), 1.0)
    return hard - soft.detach() + soft


def _one_hot(labels: Tensor, classes: int, ignore_index: int) -> Tensor:
    """``(N, ...)`` class indices to ``(N, classes, ...)`` one-hot; ignored entries -> zeros."""
    valid = labels != ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels)).long()
    if bool(((safe < 0) | (safe >= classes)).any()):
        raise ValueError(f"categorical labels must lie in [0, {classes}) or be ignore_index")
    hot = F.one_hot(safe, classes).movedim(-1, 1).float()
    return hot * valid.unsqueeze(1)


class _FiLMBlock(nn.Module):
    """Linear or conv3×3 -> BatchNorm -> FiLM(γ = Γ a_st, β = Bₓ a_st) -> ReLU (-> max-pool)."""

    def __init__(self, c_in: int, c_out: int, num_pairs: int, dense: bool, pool: bool) -> None:
        super().__init__()
        self.layer = nn.Conv2d(c_in, c_out, 3, padding=1) if dense else nn.Linear(c_in, c_out)
        self.norm = nn.BatchNorm2d(c_out) if dense else nn.BatchNorm1d(c_out)
        self.gamma = nn.Parameter(torch.ones(c_out, num_pairs))
        self.beta = nn.Parameter(torch.zeros(c_out, num_pairs))
        self.dense, self.pool = dense, pool

    def forward(self, x: Tensor, pair: Tensor) -> Tensor:
        h = self.norm(self.layer(x))
        shape = (-1, h.shape[1]) + (1,) * (h.dim() - 2)
        h = h * self.gamma.T[pair].view(shape) + self.beta.T[pair].view(shape)
        h = torch.relu(h)
        return F.max_pool2d(h, 2) if self.dense and self.pool else h


class PairwiseTaskConsistency(nn.Module):
    r"""MTPSL's cross-task consistency through one pair-conditioned mapping network.

    Li, Liu & Bilen, *Learning Multiple Dense Prediction Tasks from Partially Annotated Data*,
    CVPR 2022, arXiv `2111.14893 <https://arxiv.org/abs/2111.14893>`_. Each image :math:`x`
    carries labels for the tasks :math:`L(x)` only; :math:`U(x)` are the others. A task
    :math:`s` without a label is supervised through every labelled task :math:`t`: a mapping
    network :math:`M` sends :math:`s`'s prediction and :math:`t`'s label into a joint space,
    conditioned on the ordered pair :math:`(s, t)`, where they must agree:

    .. math::
        C_{st}(x) = \bigl[1 - \cos(M^s_{st}(\hat y_s), M^t_{st}(y_t))\bigr]
            + \rho\,\bigl(\bigl[1 - \cos(M^s_{st}(\hat y_s), \operatorname{sg}\varphi)\bigr]
            + \bigl[1 - \cos(M^t_{st}(y_t), \operatorname{sg}\varphi)\bigr]\bigr),

    with :math:`\cos` the cosine along the channels at each position, averaged over the
    positions (``F.cosine_similarity``, eps 1e-12), :math:`\varphi` the multi-task network's
    shared features for the same image (detached; the :math:`\rho` terms keep :math:`M` from
    collapsing to a constant map; official :math:`\rho = 0.5`), and

    .. math::
        \mathcal C = \frac1B \sum_{x} \sum_{s \in U(x)} \sum_{t \in L(x)} C_{st}(x).

    The training objective is :math:`\frac1B\sum_x\sum_{i\in L(x)} L_i(x) + \lambda\,\mathcal C`
    (official :math:`\lambda` = 2 on NYUv2, 1 on Cityscapes). ``pairs="all"`` uses every
    ordered pair :math:`s \ne t` with :math:`U = L` = all tasks (the official ``full`` mode).

    :math:`M`: a per-task input layer (conv3×3 or Linear :math:`C_t \to` ``widths[0]``,
    BatchNorm, ReLU), then one block per entry of ``widths`` (conv3×3 or Linear, BatchNorm,
    FiLM, ReLU, and a 2×2 max-pool after each block when ``dense`` and ``pool``). FiLM:
    :math:`\gamma = \Gamma a_{st}`, :math:`\beta = B_x a_{st}` with :math:`a_{st}` the one-hot
    code of the ordered pair among the :math:`K(K-1)` pairs (row-major, diagonal removed),
    :math:`\Gamma` starting at 1 and :math:`B_x` at 0. The output (``widths[-1]`` channels)
    must have :math:`\varphi`'s shape. Inputs are normalised per task ``kinds``:

    * ``"categorical"``: predictions become a straight-through hard Gumbel-softmax sample
      (:math:`\tau = 1`), labels one-hot vectors (``ignore_index`` -> the zero vector);
    * ``"depth"``: divided by the sample's maximum (+1e-12);
    * ``"normal"``: :math:`(n + 1)/2`;
    * ``"none"``: unchanged.

    Gradient flow: :math:`\mathcal C` reaches the multi-task network only through
    :math:`\hat y_s` (the unlabelled task's head and the trunk); :math:`M` is trained through
    both branches; labels and :math:`\varphi` are constants.

    **Use with partial labels.** ``labelled`` says which tasks have labels: a ``(K,)`` bool
    tensor (per batch), an ``(N, K)`` bool tensor (per image), or the K losses of the batch
    with ``None`` for an unlabelled task (what ``opt.backward`` receives). For example::

        losses = [loss_t if has_label[t] else None for t, loss_t in enumerate(all_losses)]
        cons = reg(preds, labels, losses, features=phi)
        (lam * cons).backward(retain_graph=True)     # the regulariser, outside the tasks
        opt.backward(losses)                         # the labelled tasks' losses

    ``per_task=True`` returns the ``(K,)`` terms :math:`\mathcal C_s = \frac1B \sum_x \sum_{t
    \in L(x)} C_{st}(x)` indexed by the unlabelled task :math:`s` (they sum to
    :math:`\mathcal C`), to add to per-task objectives instead.

    **Optimiser.** The FiLM codes :math:`\Gamma, B_x` train in their own param group with
    ``film_lr`` (official 1e-3 on NYUv2, 1e-5 on Cityscapes): :meth:`param_groups` returns
    ``[{"params": other weights of M}, {"params": FiLM codes, "lr": film_lr}]``.

    Decisions (differences from the official code): the body is a small FiLM encoder sized by
    ``widths`` (one conv per stage) instead of the SegNet encoder, and it works on vectors
    (``dense=False``) as well as maps; the :math:`2|U||L|` passes of :math:`M` per image run
    as one batched pass (per-task input layers on all their inputs, then the body once), so
    BatchNorm's statistics are over all branch inputs of the batch, where the official code
    normalises one image per call; depth is divided by each sample's own maximum (the
    official calls are per image, so this is its value).

    Args:
        task_channels: :math:`C_t` per task (classes for categorical tasks).
        feature_channels: the channels of :math:`\varphi`; must equal ``widths[-1]``.
        kinds: the normalisation of each task (default ``"none"`` for all).
        widths: channels of the FiLM blocks.
        dense: maps ``(N, C, H, W)`` (convolutions) or vectors ``(N, C)`` (linear layers).
        pool: with ``dense``, a 2×2 max-pool after each block (5 blocks: 1/32 resolution).
        rho: :math:`\rho`.
        pairs: ``"unlabelled"`` (:math:`s \in U`, :math:`t \in L`) or ``"all"``.
        film_lr: the learning rate of the FiLM codes' param group (``None``: the optimizer's).
        ignore_index: the ignored label of categorical tasks.
    """

    def __init__(
        self,
        task_channels: Sequence[int],
        feature_channels: int,
        *,
        kinds: Sequence[Kind] | None = None,
        widths: Sequence[int] = (64, 128, 256, 512, 512),
        dense: bool = True,
        pool: bool = True,
        rho: float = 0.5,
        pairs: Pairs = "unlabelled",
        film_lr: float | None = 1e-3,
        ignore_index: int = -1,
    ) -> None:
        super().__init__()
        channels = list(task_channels)
        if len(channels) < 2:
            raise ValueError(f"task_channels must list K >= 2 tasks, got {channels!r}")
        for c in (*channels, feature_channels, *widths):
            if isinstance(c, bool) or not isinstance(c, int) or c < 1:
                raise ValueError(
                    f"task_channels, feature_channels and widths must be ints >= 1, got {c!r}"
                )
        widths = tuple(widths)
        if not widths:
            raise ValueError("widths must have at least one block")
        if widths[-1] != feature_channels:
            raise ValueError(
                f"the mapping network's output (widths[-1] = {widths[-1]}) must have the "
                f"features' {feature_channels} channels"
            )
        kinds = ["none"] * len(channels) if kinds is None else list(kinds)
        if len(kinds) != len(channels) or any(k not in KINDS for k in kinds):
            raise ValueError(f"kinds must give one of {KINDS} per task, got {kinds!r}")
        if not (isinstance(rho, (int, float)) and math.isfinite(rho) and rho >= 0):
            raise ValueError(f"rho must be finite and >= 0, got {rho!r}")
        if pairs not in PAIRS:
            raise ValueError(f"pairs must be one of {PAIRS}, got {pairs!r}")
        if film_lr is not None and not (
            isinstance(film_lr, (int, float)) and math.isfinite(film_lr) and film_lr > 0
        ):
            raise ValueError(f"film_lr must be positive or None, got {film_lr!r}")
        self.num_tasks = k = len(channels)
        self.task_channels = tuple(channels)
        self.feature_channels = feature_channels
        self.kinds = tuple(kinds)
        self.widths = widths
        self.dense, self.pool = bool(dense), bool(pool)
        self.rho = float(rho)
        self.pairs = pairs
        self.film_lr = None if film_lr is None else float(film_lr)
        self.ignore_index = ignore_index

        def input_layer(c: int) -> nn.Sequential:
            if self.dense:
                return nn.Sequential(
                    nn.Conv2d(c, widths[0], 3, padding=1), nn.BatchNorm2d(widths[0]), nn.ReLU()
                )
            return nn.Sequential(nn.Linear(c, widths[0]), nn.BatchNorm1d(widths[0]), nn.ReLU())

        self.inputs = nn.ModuleList(input_layer(c) for c in channels)
        ins = (widths[0], *widths[:-1])
        self.blocks = nn.ModuleList(
            _FiLMBlock(a, b, k * (k - 1), self.dense, self.pool) for a, b in zip(ins, widths)
        )

    @staticmethod
    def pair_index(s: int, t: int, num_tasks: int) -> int:
        """The column of the ordered pair ``(s, t)``, ``s != t``, in the FiLM codes."""
        if s == t or not (0 <= s < num_tasks and 0 <= t < num_tasks):
            raise ValueError(f"({s}, {t}) is not an ordered pair of distinct tasks < {num_tasks}")
        return s * (num_tasks - 1) + (t if t < s else t - 1)

    def film_parameters(self) -> list[nn.Parameter]:
        r"""The pair codes :math:`\Gamma, B_x` of every block."""
        blocks = cast(list[_FiLMBlock], list(self.blocks))
        return [p for b in blocks for p in (b.gamma, b.beta)]

    def param_groups(self) -> list[dict[str, Any]]:
        """``[{"params": M's other weights}, {"params": FiLM codes, "lr": film_lr}]``."""
        film = {id(p) for p in self.film_parameters()}
        codes: dict[str, Any] = {"params": self.film_parameters()}
        if self.film_lr is not None:
            codes["lr"] = self.film_lr
        return [{"params": [p for p in self.parameters() if id(p) not in film]}, codes]

    def mapping(self, x: Tensor, task: int, pair: Tensor) -> Tensor:
        r""":math:`M^{task}` on normalised inputs ``x`` with per-sample pair codes ``pair``."""
        h = self.inputs[task](x)
        for block in self.blocks:
            h = block(h, pair)
        return h

    def _normalise(self, x: Tensor, t: int, is_label: bool) -> Tensor:
        kind = self.kinds[t]
        if kind == "categorical":
            if is_label:
                return _one_hot(x, self.task_channels[t], self.ignore_index)
            return _hard_gumbel(x)
        x = x.float() if not x.is_floating_point() else x
        if kind == "depth":
            peak = x.flatten(1).max(1).values.view(-1, *(1,) * (x.dim() - 1))
            return x / (peak + DEPTH_EPS)
        if kind == "normal":
            return (x + 1) / 2
        return x

    def _labelled(self, labelled: Any, n: int, device: torch.device) -> Tensor:
        k = self.num_tasks
        if isinstance(labelled, Tensor):
            if labelled.dtype != torch.bool:
                raise TypeError(f"labelled must be a bool tensor, got dtype {labelled.dtype}")
            if labelled.shape == (k,):
                return labelled.to(device).expand(n, k)
            if labelled.shape == (n, k):
                return labelled.to(device)
            raise ValueError(
                f"labelled has shape {tuple(labelled.shape)}; expected ({k},) or ({n}, {k})"
            )
        if isinstance(labelled, (str, bytes)) or not isinstance(labelled, Sequence):
            raise TypeError(
                "labelled must be a bool tensor or a sequence of K entries (a loss or True for a "
                f"labelled task, None or False for an unlabelled one), got {type(labelled)}"
            )
        if len(labelled) != k:
            raise ValueError(f"labelled has {len(labelled)} entries, expected {k}")
        flags = []
        for entry in labelled:
            if entry is None or isinstance(entry, bool):
                flags.append(bool(entry))
            elif isinstance(entry, Tensor) and entry.dtype == torch.bool and entry.numel() == 1:
                flags.append(bool(entry))
            elif isinstance(entry, Tensor):  # a loss: the task is labelled
                flags.append(True)
            else:
                raise TypeError(f"labelled entries must be losses, None or bools, got {entry!r}")
        return torch.tensor(flags, device=device).expand(n, k)

    def forward(
        self,
        preds: Sequence[Tensor],
        labels: Sequence[Tensor | None],
        labelled: Tensor | Sequence[Tensor | bool | None],
        features: Tensor,
        *,
        per_task: bool = False,
    ) -> Tensor:
        r""":math:`\mathcal C` (a scalar), or its ``(K,)`` per-task split with ``per_task``.

        Args:
            preds: the K predictions, ``(N, C_t, ...)`` (logits for categorical tasks).
            labels: the K labels (``(N, ...)`` class indices for categorical tasks, else shaped
                like the prediction); ``None`` for a task labelled in no image of the batch;
                rows of images where a task is unlabelled are ignored.
            labelled: which tasks are labelled (see the class docstring).
            features: :math:`\varphi`, ``(N, C_\varphi, ...)``, the shape of :math:`M`'s output.
            per_task: return the terms :math:`\mathcal C_s`.
        """
        k = self.num_tasks
        if len(preds) != k or len(labels) != k:
            raise ValueError(
                f"expected {k} predictions and {k} labels, got {len(preds)}, {len(labels)}"
            )
        n = features.shape[0]
        for t, p in enumerate(preds):
            if p.shape[0] != n or p.dim() < 2 or p.shape[1] != self.task_channels[t]:
                raise ValueError(
                    f"prediction {t} has shape {tuple(p.shape)}; expected ({n}, "
                    f"{self.task_channels[t]}, ...)"
                )
        mask = self._labelled(labelled, n, features.device)
        if self.pairs == "all":
            unl = lab = torch.ones(n, k, dtype=torch.bool, device=features.device)
        else:
            unl, lab = ~mask, mask
        phi = features.detach()
        groups = []  # (s, t, images) for every ordered pair with at least one image
        for s in range(k):
            for t in range(k):
                if s != t:
                    idx = (unl[:, s] & lab[:, t]).nonzero().flatten()
                    if idx.numel():
                        groups.append((s, t, idx))
        weight = cast(Tensor, next(self.inputs.parameters()))
        if not groups:  # nothing to compare: a zero that backward accepts
            zeros = torch.zeros(k, dtype=weight.dtype, device=phi.device, requires_grad=True)
            return zeros if per_task else zeros.sum()
        # normalise each task once; run each task's input layer once on every row it feeds
        pred_in = {s: self._normalise(preds[s], s, False) for s in {s for s, _, _ in groups}}
        label_in = {}
        for t in {t for _, t, _ in groups}:
            y = labels[t]
            if y is None:
                raise ValueError(f"task {t} is labelled in some image, but its label is None")
            label_in[t] = self._normalise(y.detach(), t, True)
        parts: dict[tuple[str, int], list[tuple[Tensor, Tensor]]] = {}
        starts = []  # per group: (row of its prediction branch, row of its label branch)
        for s, t, idx in groups:
            code = torch.full_like(idx, self.pair_index(s, t, k))
            pred_rows = parts.setdefault(("pred", s), [])
            label_rows = parts.setdefault(("label", t), [])
            starts.append(
                (
                    (("pred", s), sum(len(c) for _, c in pred_rows)),
                    (("label", t), sum(len(c) for _, c in label_rows)),
                )
            )
            pred_rows.append((pred_in[s][idx], code))
            label_rows.append((label_in[t][idx].to(weight.dtype), code))
        hidden, codes, offsets, offset = [], [], {}, 0
        for (side, task), rows in parts.items():
            x = torch.cat([r for r, _ in rows])
            hidden.append(self.inputs[task](x))
            codes.append(torch.cat([c for _, c in rows]))
            offsets[(side, task)] = offset
            offset += len(x)
        h, code = torch.cat(hidden), torch.cat(codes)
        for block in self.blocks:
            h = block(h, code)
        if h.shape[1:] != phi.shape[1:]:
            raise ValueError(
                f"the mapping network gives {tuple(h.shape[1:])} per sample, the features are "
                f"{tuple(phi.shape[1:])}: match widths[-1] and the pooling to the features"
            )
        per_task_sums: list[list[Tensor]] = [[] for _ in range(k)]
        for (s, _, idx), ((key_a, off_a), (key_b, off_b)) in zip(groups, starts):
            m = len(idx)
            a = h[offsets[key_a] + off_a : offsets[key_a] + off_a + m]
            b = h[offsets[key_b] + off_b : offsets[key_b] + off_b + m]
            f = phi[idx].to(h.dtype)
            c = self._one_minus_cos(a, b) + self.rho * (
                self._one_minus_cos(a, f) + self._one_minus_cos(b, f)
            )
            per_task_sums[s].append(c.sum())
        zero = h.new_zeros(())
        terms = torch.stack([sum(v, zero) for v in per_task_sums]) / n
        return terms if per_task else terms.sum()

    @staticmethod
    def _one_minus_cos(u: Tensor, v: Tensor) -> Tensor:
        """``1 - cos`` along the channels at each position, averaged per sample: ``(m,)``."""
        one_minus = 1 - F.cosine_similarity(u, v, dim=1, eps=COS_EPS)
        return one_minus.flatten(1).mean(1) if one_minus.dim() > 1 else one_minus

    def extra_repr(self) -> str:
        return (
            f"task_channels={self.task_channels}, feature_channels={self.feature_channels}, "
            f"kinds={self.kinds}, widths={self.widths}, dense={self.dense}, rho={self.rho}, "
            f"pairs={self.pairs!r}, film_lr={self.film_lr}"
        )
