r"""Small multi-task models: a shared trunk and one head per task.

* :class:`MLP` — hard parameter sharing (HPS) for tabular data and MultiDigits.
* :class:`LeNet` — HPS MultiLeNet of Sener & Koltun (NeurIPS 2018) for MultiMNIST: a shared
  conv(5×5, 10) → pool → conv(5×5, 20) → pool → fc(50) trunk and fc(50) → fc(classes) heads.
* :class:`MTAN` — a small Multi-Task Attention Network (Liu, Johns & Davison, "End-to-End
  Multi-Task Learning with Attention", CVPR 2019) on the same conv trunk: every task owns a
  soft-attention mask per conv block,

  .. math::
      a_i^{j} = \sigma\!\big(h_i^j([u^j;\, f^j(\hat a_i^{j-1})])\big), \qquad
      \hat a_i^{j} = \operatorname{pool}(a_i^j \odot p^j),

  where :math:`u^j` is block :math:`j`'s shared conv output, :math:`p^j` its activation (the
  blocks have one conv each, so :math:`p^j = \mathrm{ReLU}(u^j)`), :math:`f^j` a conv shaped
  like the trunk's, shared by all tasks as in the official ``encoder_block_att`` (:math:`f^1` is
  absent) and :math:`h_i^j` two 1×1 convs with a ReLU between them. The attended features of
  the last block feed the task's head.
  Deviations from the SegNet-MTAN of the paper: one conv per block and no BatchNorm, so the
  attention modules are as small as the LeNet trunk they attend over.

``forward`` returns the list of K task outputs, shaped ``(N,)`` for one-output heads (binary,
regression) and ``(N, classes)`` otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .data import MTLData, Task

__all__ = ["LeNet", "MLP", "MTAN", "build_model"]


def _squeeze(out: Tensor) -> Tensor:
    return out.squeeze(-1) if out.shape[-1] == 1 else out


class MLP(nn.Module):
    """``depth`` Linear+ReLU shared layers of ``width`` units, then one linear head per task."""

    def __init__(self, in_dim: int, tasks: Sequence[Task], width: int = 128, depth: int = 2):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        for i in range(depth):
            layers += [nn.Linear(in_dim if i == 0 else width, width), nn.ReLU()]
        self.trunk = nn.Sequential(*layers)
        self.heads = nn.ModuleList(nn.Linear(width, t.outputs) for t in tasks)

    def forward(self, x: Tensor) -> list[Tensor]:
        z = self.trunk(x)
        return [_squeeze(h(z)) for h in self.heads]


def _conv_blocks(channels: Sequence[int], kernel: int, padding: int) -> nn.ModuleList:
    return nn.ModuleList(
        nn.Conv2d(c_in, c_out, kernel, padding=padding)
        for c_in, c_out in zip(channels, channels[1:])
    )


def _flat_dim(module: nn.Module, in_shape: Sequence[int]) -> int:
    with torch.no_grad():
        return module(torch.zeros(1, *in_shape)).shape[1]


class _Features(nn.Module):
    """The shared conv trunk: per block conv → max-pool(2) → ReLU, then flatten."""

    def __init__(self, channels: Sequence[int], kernel: int, padding: int) -> None:
        super().__init__()
        self.convs = _conv_blocks(channels, kernel, padding)

    def forward(self, x: Tensor) -> Tensor:
        for conv in self.convs:
            x = torch.relu(nn.functional.max_pool2d(conv(x), 2))
        return x.flatten(1)


class LeNet(nn.Module):
    """HPS MultiLeNet: shared conv trunk + fc(``hidden``), heads fc(``hidden``) → fc(out).

    The official model's dropout (with a mask shared across tasks) is left out.
    """

    def __init__(
        self,
        in_shape: Sequence[int],
        tasks: Sequence[Task],
        channels: Sequence[int] = (10, 20),
        kernel: int = 5,
        padding: int = 0,
        hidden: int = 50,
    ) -> None:
        super().__init__()
        features = _Features((in_shape[0], *channels), kernel, padding)
        self.trunk = nn.Sequential(
            features, nn.Linear(_flat_dim(features, in_shape), hidden), nn.ReLU()
        )
        self.heads = nn.ModuleList(
            nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, t.outputs))
            for t in tasks
        )

    def forward(self, x: Tensor) -> list[Tensor]:
        z = self.trunk(x)
        return [_squeeze(h(z)) for h in self.heads]


class _Attention(nn.Module):
    """:math:`h`: 1×1 conv → ReLU → 1×1 conv → sigmoid, producing a mask with ``out`` channels."""

    def __init__(self, c_in: int, out: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(c_in, out, 1), nn.ReLU(), nn.Conv2d(out, out, 1), nn.Sigmoid()
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class MTAN(nn.Module):
    """MTAN on the LeNet conv trunk (see the module docstring).

    The trunk's convs and :math:`f^j` are shared; the attention modules and the heads are
    task-specific. Each head is LeNet's trunk fc(``hidden``) followed by LeNet's head, since
    the attended features never pass through a shared layer again.
    """

    def __init__(
        self,
        in_shape: Sequence[int],
        tasks: Sequence[Task],
        channels: Sequence[int] = (10, 20),
        kernel: int = 5,
        padding: int = 0,
        hidden: int = 50,
    ) -> None:
        super().__init__()
        chans = (in_shape[0], *channels)
        self.shared = _conv_blocks(chans, kernel, padding)
        k = len(tasks)
        self.attention = nn.ModuleList(
            nn.ModuleList(_Attention(c if j == 0 else 2 * c, c) for j, c in enumerate(chans[1:]))
            for _ in range(k)
        )
        self.attended_convs = _conv_blocks(chans[1:], kernel, padding)
        flat = _flat_dim(_Features(chans, kernel, padding), in_shape)
        self.heads = nn.ModuleList(
            nn.Sequential(
                nn.Linear(flat, hidden),
                nn.ReLU(),
                nn.Linear(hidden, hidden),
                nn.ReLU(),
                nn.Linear(hidden, t.outputs),
            )
            for t in tasks
        )

    def forward(self, x: Tensor) -> list[Tensor]:
        k = len(self.heads)
        attended: list[Tensor | None] = [None] * k
        for j, conv in enumerate(self.shared):
            u = conv(x)
            p = torch.relu(u)
            for i in range(k):
                prev = attended[i]
                inp = u if prev is None else torch.cat([u, self.attended_convs[j - 1](prev)], 1)
                attended[i] = nn.functional.max_pool2d(self.attention[i][j](inp) * p, 2)
            x = nn.functional.max_pool2d(p, 2)
        return [_squeeze(h(a.flatten(1))) for h, a in zip(self.heads, attended)]


def build_model(data: MTLData, arch: str = "hps", tasks: Sequence[Task] | None = None) -> nn.Module:
    """The benchmark's model for ``data`` (``tasks`` defaults to all; one task for STL).

    ``arch="hps"``: :class:`LeNet` for MultiMNIST, :class:`MLP` otherwise (as in
    ``digits_demo.py`` for MultiDigits). ``arch="mtan"``: :class:`MTAN` for image data (3×3
    padded convs on the 8×16 MultiDigits images, LeNet's 5×5 on MultiMNIST).
    """
    tasks = data.tasks if tasks is None else tuple(tasks)
    in_shape = tuple(data.train.x.shape[1:])
    if arch == "hps":
        if data.name == "multimnist":
            return LeNet(in_shape, tasks)
        return MLP(math.prod(in_shape), tasks)
    if arch == "mtan":
        if len(in_shape) != 3:
            raise ValueError(f"arch='mtan' needs image data; {data.name} is tabular")
        kernel, padding = (5, 0) if in_shape[1] >= 28 else (3, 1)
        return MTAN(in_shape, tasks, kernel=kernel, padding=padding)
    raise ValueError(f"arch must be 'hps' or 'mtan', got {arch!r}")
