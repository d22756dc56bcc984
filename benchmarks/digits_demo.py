"""AdaTask vs. Adam on MultiDigits, built from scikit-learn's bundled digits (no download).

Each sample pastes two 8×8 digits side by side (8×16). Three tasks of different difficulty
share one MLP trunk: the left digit (10 classes), the right digit (10 classes) and their sum
(19 classes). Both optimizers get the same seeds, model, data order and epochs; the table
reports per-task test accuracy (mean ± std over seeds) and the time per epoch.

    python -m benchmarks.digits_demo            # 3 seeds
    python -m benchmarks.digits_demo --quick    # 1 seed, a few seconds
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

import mtl_optim

TASKS = ("left digit", "right digit", "sum")


def multidigits(n_train: int, n_test: int, seed: int):
    """Pairs of sklearn digits (left image from the first half of the data, right from the
    second, so train and test pairs never share an image). Returns tensors and 3 label sets."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - message for users without the extra
        raise SystemExit("this demo needs scikit-learn: pip install 'mtl_optim[bench]'") from e
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32) / 16.0
    labels = torch.tensor(digits.target)
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(labels), generator=g)
    cut = int(0.8 * len(order))

    def pairs(pool: torch.Tensor, n: int):
        a = pool[torch.randint(len(pool), (n,), generator=g)]
        b = pool[torch.randint(len(pool), (n,), generator=g)]
        x = torch.cat([images[a], images[b]], dim=2).reshape(n, -1)
        return x, [labels[a], labels[b], labels[a] + labels[b]]

    return pairs(order[:cut], n_train), pairs(order[cut:], n_test)


class Net(nn.Module):
    def __init__(self, width: int = 128) -> None:
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Linear(128, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU()
        )
        self.heads = nn.ModuleList(
            [nn.Linear(width, 10), nn.Linear(width, 10), nn.Linear(width, 19)]
        )

    def forward(self, x):
        z = self.trunk(x)
        return [h(z) for h in self.heads]


def run(method: str, seed: int, epochs: int, data) -> tuple[list[float], float]:
    (xtr, ytr), (xte, yte) = data
    torch.manual_seed(seed)
    model = Net()
    if method == "AdaTask":
        opt = mtl_optim.AdaTask(model.parameters(), base=torch.optim.Adam, lr=1e-3)
    else:
        opt = mtl_optim.MTLOptimizer(model.parameters(), base=torch.optim.Adam, lr=1e-3)
    g = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    for _ in range(epochs):
        for idx in torch.randperm(len(xtr), generator=g).split(64):
            opt.zero_grad()
            outs = model(xtr[idx])
            opt.backward([nn.functional.cross_entropy(o, y[idx]) for o, y in zip(outs, ytr)])
            opt.step()
    per_epoch = (time.perf_counter() - start) / epochs
    with torch.no_grad():
        outs = model(xte)
    acc = [(o.argmax(1) == y).float().mean().item() * 100 for o, y in zip(outs, yte)]
    return acc, per_epoch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, 3 epochs")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=8)
    args = parser.parse_args()
    seeds = 1 if args.quick else args.seeds
    epochs = 3 if args.quick else args.epochs
    # The models are tiny: one thread is fastest, and OpenMP threads spin badly when another
    # process holds a core (measured 300x slower per step on the 2-core CI machine).
    torch.set_num_threads(1)
    data = multidigits(n_train=8000, n_test=2000, seed=0)
    print(
        f"MultiDigits (sklearn digits pairs): 8000 train / 2000 test, {epochs} epochs, "
        f"batch 64, Adam lr 1e-3, seeds {list(range(seeds))}\n"
    )
    header = "| method | " + " | ".join(f"{t} acc %" for t in TASKS) + " | s / epoch |"
    print(header)
    print("|" + "---|" * (len(TASKS) + 2))
    for method in ("Adam (equal weights)", "AdaTask"):
        results = [run(method, s, epochs, data) for s in range(seeds)]
        cells = []
        for t in range(len(TASKS)):
            vals = [r[0][t] for r in results]
            sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
            cells.append(f"{statistics.mean(vals):.1f} ± {sd:.1f}")
        secs = statistics.mean(r[1] for r in results)
        print(f"| {method} | " + " | ".join(cells) + f" | {secs:.2f} |")


if __name__ == "__main__":
    main()
