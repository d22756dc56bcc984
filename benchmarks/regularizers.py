"""Regularisers and pruning on MultiDigits, each against its baseline (3 seeds).

* **SRDML** (:class:`mtl_optim.regularizers.SaliencyRelation`): the three tasks with
  μ = 0.1 · R (saliency at the trunk output, ``output_reduce="max"``, the top logit), vs the same
  model without it;
* **XTasC-Net** (:class:`mtl_optim.regularizers.CrossTaskConsistency`): the pair left digit /
  digit sum with MLP transfer networks, λ = 0.1 for both groups, in its consistency
  (``target="prediction"``) and alignment (``target="label"``) modes, vs the direct losses, all
  with the paper's uncertainty weighting (``Uncertainty(2, factors=(4, 4))``);
* **MTPSL** (:class:`mtl_optim.regularizers.PairwiseTaskConsistency`): partial labels, each
  training batch labels one random task (the two others' labels are removed); supervised loss
  on the labelled task only vs plus λ = 1 × the pairwise consistency; full labels for
  reference;
* **DiSparse** (:class:`mtl_optim.pruning.DiSparse`): 90% of the Linear weights pruned at
  initialisation (SNIP scores on 20 batches, union arbiter) or by dynamic sparse training
  (ERK, prune-and-grow every 50 steps until 75% of training), vs the dense model and a single
  SNIP mask scored on the summed loss (no per-task disentanglement).

Model: two shared Linear(·, 128) + ReLU layers and per task Linear(128, 64) + ReLU +
Linear(64, classes); Adam lr 1e-3, batch 64; the same seed gives the same initial weights and
batches to every variant; the first 4000 of MultiDigits' 8000 training pairs (``--train``) and
its 2000 test pairs. Test accuracy (%) after the last epoch, mean ± std over seeds.

    python -m benchmarks.regularizers                 # 3 seeds, 4 epochs -> benchmarks/out/
    python -m benchmarks.regularizers --quick         # 1 seed, 1 epoch, 2000 pairs
    python -m benchmarks.regularizers --out benchmarks/results   # the committed table
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn import functional as F

import mtl_optim
from mtl_optim.pruning import DiSparse
from mtl_optim.regularizers import CrossTaskConsistency, PairwiseTaskConsistency, SaliencyRelation
from mtl_optim.weighting import Uncertainty

from ._timing import machine_line, markdown_table
from .data import MTLData, multidigits

BATCH, LR = 64, 1e-3
SRDML_MU = 0.1
XTASC_LAMBDA = 0.1
MTPSL_LAMBDA = 1.0
DENSITY = 0.1
SCORE_BATCHES = 20
OUT = Path(__file__).resolve().parent / "out"


class Net(nn.Module):
    """Two shared Linear + ReLU layers and one two-layer head per task."""

    def __init__(self, classes: tuple[int, ...], width: int = 128) -> None:
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Flatten(), nn.Linear(128, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU()
        )
        self.heads = nn.ModuleList(
            nn.Sequential(nn.Linear(width, 64), nn.ReLU(), nn.Linear(64, c)) for c in classes
        )

    def forward(self, x: Tensor) -> tuple[list[Tensor], Tensor]:
        z = self.trunk(x)
        return [h(z) for h in self.heads], z


def batches(n: int, seed: int, epoch: int) -> list[Tensor]:
    g = torch.Generator().manual_seed(seed * 1000 + epoch)
    return list(torch.randperm(n, generator=g).split(BATCH))


def accuracy(model: Net, data: MTLData, tasks: list[int]) -> list[float]:
    with torch.no_grad():
        preds, _ = model(data.test.x)
    return [
        (p.argmax(1) == data.test.ys[t]).float().mean().item() * 100 for p, t in zip(preds, tasks)
    ]


def model_for(data: MTLData, tasks: list[int], seed: int) -> Net:
    torch.manual_seed(seed)
    return Net(tuple(data.tasks[t].classes for t in tasks))


def train(
    data: MTLData,
    tasks: list[int],
    seed: int,
    epochs: int,
    step: Callable[[Net, Tensor, list[Tensor], int], None],
    model: Net,
) -> tuple[list[float], float]:
    """Run ``step(model, x, ys, i)`` on every batch; test accuracies and seconds per epoch."""
    x, ys = data.train.x, [data.train.ys[t] for t in tasks]
    start, i = time.perf_counter(), 0
    for epoch in range(epochs):
        for idx in batches(len(x), seed, epoch):
            step(model, x[idx], [y[idx] for y in ys], i)
            i += 1
    return accuracy(model, data, list(range(len(tasks)))), (time.perf_counter() - start) / epochs


def ce(preds: list[Tensor], ys: list[Tensor]) -> list[Tensor]:
    return [F.cross_entropy(p, y) for p, y in zip(preds, ys)]


# --- SRDML ------------------------------------------------------------------------------------
def run_srdml(
    data: MTLData, seed: int, epochs: int, use: bool
) -> tuple[list[float], float, Tensor]:
    tasks = [0, 1, 2]
    model = model_for(data, tasks, seed)
    reg = SaliencyRelation(3, output_reduce="max")
    groups = [{"params": list(model.parameters())}] + ([reg.param_group()] if use else [])
    opt = mtl_optim.MTLOptimizer(groups, torch.optim.Adam, lr=LR)

    def step(m: Net, x: Tensor, ys: list[Tensor], _: int) -> None:
        preds, z = m(x)
        opt.zero_grad()
        if use:
            (SRDML_MU * reg(z, preds)).backward(retain_graph=True)
        opt.backward(ce(preds, ys))
        opt.step()

    acc, sec = train(data, tasks, seed, epochs, step, model)
    return acc, sec, reg.relations()


# --- XTasC-Net ---------------------------------------------------------------------------------
def run_xtasc(
    data: MTLData, seed: int, epochs: int, target: str | None
) -> tuple[list[float], float]:
    tasks = [0, 2]  # left digit (10 classes) and the digit sum (19)
    model = model_for(data, tasks, seed)
    ca, cb = (data.tasks[t].classes for t in tasks)

    def mlp(i: int, o: int) -> nn.Module:
        return nn.Sequential(nn.Linear(i, 64), nn.ReLU(), nn.Linear(64, o))

    def class_loss(p: Tensor, y: Tensor, _: Tensor | None) -> Tensor:
        return F.cross_entropy(p, y)

    def log_probs(p: Tensor) -> Tensor:
        return F.log_softmax(p, 1)

    def top(p: Tensor) -> Tensor:
        return p.argmax(1)

    xt = CrossTaskConsistency(
        mlp(ca, cb),
        mlp(cb, ca),
        class_loss,
        class_loss,
        target=target or "prediction",
        input_a=log_probs,
        input_b=log_probs,
        pseudo_label_a=top,
        pseudo_label_b=top,
        weights=(XTASC_LAMBDA, XTASC_LAMBDA),
    )
    groups = [{"params": list(model.parameters())}]
    if target is not None:
        groups.append({"params": list(xt.parameters())})
    opt = mtl_optim.MTLOptimizer(
        groups, torch.optim.Adam, lr=LR, weighting=Uncertainty(2, factors=(4, 4))
    )

    def step(m: Net, x: Tensor, ys: list[Tensor], _: int) -> None:
        preds, _ = m(x)
        direct = torch.stack(ce(preds, ys))
        objectives = direct if target is None else xt.objectives(direct, xt(*preds, *ys))
        opt.zero_grad()
        opt.backward(objectives)
        opt.step()

    return train(data, tasks, seed, epochs, step, model)


# --- MTPSL -------------------------------------------------------------------------------------
def run_mtpsl(data: MTLData, seed: int, epochs: int, mode: str) -> tuple[list[float], float]:
    """``mode``: "full" (every label), "partial" (one task per batch), "partial + MTPSL"."""
    tasks = [0, 1, 2]
    model = model_for(data, tasks, seed)
    classes = [data.tasks[t].classes for t in tasks]
    reg = PairwiseTaskConsistency(
        classes, 128, kinds=["categorical"] * 3, widths=(128, 128), dense=False
    )
    groups = [{"params": list(model.parameters())}]
    if mode == "partial + MTPSL":
        groups += reg.param_groups()
    # partial labels through the optimizer: None for the unlabelled tasks (no method: the
    # equal-weight sum of the present tasks' losses; the trunk named, as the first batch
    # already misses tasks)
    opt = mtl_optim.MTLOptimizer(
        groups, base=torch.optim.Adam, lr=LR, shared=list(model.trunk.parameters())
    )
    label_draws = torch.Generator().manual_seed(10_000 + seed)

    def step(m: Net, x: Tensor, ys: list[Tensor], _: int) -> None:
        preds, z = m(x)
        if mode == "full":
            labelled = [True, True, True]
        else:
            labelled = [False] * 3
            labelled[int(torch.randint(3, (), generator=label_draws))] = True
        losses = [F.cross_entropy(p, y) if lab else None for p, y, lab in zip(preds, ys, labelled)]
        opt.zero_grad()
        if mode == "partial + MTPSL":  # its gradients are kept and added to by opt.backward
            labels = [y if lab else None for y, lab in zip(ys, labelled)]
            (MTPSL_LAMBDA * reg(preds, labels, losses, z)).backward(retain_graph=True)
        opt.backward(losses)
        opt.step()

    return train(data, tasks, seed, epochs, step, model)


# --- DiSparse ----------------------------------------------------------------------------------
def run_disparse(
    data: MTLData, seed: int, epochs: int, mode: str
) -> tuple[list[float], float, float]:
    """``mode``: "dense", "DiSparse static", "DiSparse dynamic", "SNIP on the summed loss"."""
    tasks = [0, 1, 2]
    model = model_for(data, tasks, seed)
    ds = DiSparse(model, model.trunk, list(model.heads))
    x, ys = data.train.x, data.train.ys
    score_batches = [idx for idx in batches(len(x), seed, -1)[:SCORE_BATCHES]]

    def losses_of(idx: Tensor) -> list[Tensor]:
        return ce(model(x[idx])[0], [y[idx] for y in ys])

    opt = mtl_optim.MTLOptimizer(
        model.parameters(), torch.optim.Adam, lr=LR, shared=list(model.trunk.parameters())
    )
    steps = epochs * len(batches(len(x), seed, 0))
    if mode == "DiSparse static":
        ds.prune(DENSITY, score_batches, losses_of)
    elif mode == "DiSparse dynamic":
        ds.dynamic(opt, DENSITY, steps, every=50)
    elif mode == "SNIP on the summed loss":
        weights = [ds.weight(lyr) for lyr in ds.layers]
        sums = [torch.zeros_like(w) for w in weights]
        for idx in score_batches:
            grads = torch.autograd.grad(sum(losses_of(idx)), weights)
            for s, w, g in zip(sums, weights, grads):
                s += (w.detach() * g).abs()
        flat = torch.cat([s.flatten() for s in sums])
        keep = torch.zeros_like(flat, dtype=torch.bool)
        keep[flat.topk(round(DENSITY * len(flat))).indices] = True
        parts = keep.split([w.numel() for w in weights])
        ds.apply({lyr.name: p.view(w.shape) for lyr, p, w in zip(ds.layers, parts, weights)})

    def step(m: Net, xb: Tensor, yb: list[Tensor], _: int) -> None:
        preds, _ = m(xb)
        opt.zero_grad()
        opt.backward(ce(preds, yb))
        opt.step()

    acc, sec = train(data, tasks, seed, epochs, step, model)
    return acc, sec, ds.density()


# --- report ------------------------------------------------------------------------------------
def _cell(values: list[float], digits: int = 1) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}f} ± {sd:.{digits}f}"


def _table(names: list[str], runs: dict[str, list[list[float]]], extra: dict[str, list[str]]):
    headers = ["variant", *(f"{n} acc %" for n in names), "mean acc %", *extra.get("_h", [])]
    rows = []
    for variant, accs in runs.items():
        cells = [_cell([a[t] for a in accs]) for t in range(len(names))]
        mean = _cell([statistics.mean(a) for a in accs])
        rows.append([variant, *cells, mean, *extra.get(variant, [])])
    return markdown_table(headers, rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, 1 epoch, 2000 pairs")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--train", type=int, default=4000, help="training pairs used")
    parser.add_argument("--out", type=Path, default=OUT, help=f"output folder (default {OUT})")
    args = parser.parse_args(argv)
    seeds = 1 if args.quick else args.seeds
    epochs = 1 if args.quick else args.epochs
    torch.set_num_threads(1)  # tiny models: one thread is fastest and fair to a shared machine

    srdml: dict[str, list[list[float]]] = {"MTL": [], "MTL + SRDML": []}
    xtasc: dict[str, list[list[float]]] = {
        "MTL (UW)": [],
        "+ consistency (prediction target)": [],
        "+ alignment (label target)": [],
    }
    mtpsl: dict[str, list[list[float]]] = {
        "full labels (reference)": [],
        "one task per batch": [],
        "one task per batch + MTPSL": [],
    }
    disparse: dict[str, list[list[float]]] = {
        "dense": [],
        "SNIP on the summed loss": [],
        "DiSparse static": [],
        "DiSparse dynamic": [],
    }
    secs: dict[str, list[float]] = {}
    densities: dict[str, list[float]] = {}
    relations = []
    total = time.perf_counter()
    for seed in range(seeds):
        data = multidigits(seed).head(2000 if args.quick else args.train)
        for variant in srdml:
            acc, sec, rel = run_srdml(data, seed, epochs, variant != "MTL")
            srdml[variant].append(acc)
            secs.setdefault(variant, []).append(sec)
            if variant != "MTL":
                relations.append(rel)
        for variant, target in zip(xtasc, (None, "prediction", "label")):
            acc, sec = run_xtasc(data, seed, epochs, target)
            xtasc[variant].append(acc)
            secs.setdefault(variant, []).append(sec)
        for variant, mode in zip(mtpsl, ("full", "partial", "partial + MTPSL")):
            acc, sec = run_mtpsl(data, seed, epochs, mode)
            mtpsl[variant].append(acc)
            secs.setdefault(variant, []).append(sec)
        for variant in disparse:
            acc, sec, density = run_disparse(data, seed, epochs, variant)
            disparse[variant].append(acc)
            secs.setdefault(variant, []).append(sec)
            densities.setdefault(variant, []).append(density)
        print(f"seed {seed} done ({time.perf_counter() - total:.0f} s)", flush=True)

    def timing(table: dict) -> dict[str, list[str]]:
        return {"_h": ["s / epoch"], **{v: [f"{statistics.mean(secs[v]):.2f}"] for v in table}}

    names = [t.name for t in data.tasks]
    rel = torch.stack(relations).mean(0)
    rel_rows = [[names[i], *(f"{v:.3f}" for v in rel[i].tolist())] for i in range(3)]
    dis_extra = {
        "_h": ["density", "s / epoch"],
        **{
            v: [f"{statistics.mean(densities[v]):.3f}", f"{statistics.mean(secs[v]):.2f}"]
            for v in disparse
        },
    }
    n_train = len(data.train)
    text = "\n\n".join(
        [
            "# Regularisers and pruning on MultiDigits (test accuracy %, mean ± std over seeds)",
            machine_line(),
            f"MultiDigits (`benchmarks/data.py`): {n_train} train / {len(data.test)} test pairs, "
            f"{epochs} epochs, batch {BATCH}, Adam lr {LR:g}, seeds {list(range(seeds))}. "
            "`python -m benchmarks.regularizers`; see its docstring for the set-up.",
            f"## SRDML: saliency-regularised task relations (μ = {SRDML_MU})",
            _table(names, srdml, timing(srdml)),
            "Learned relations ω (mean over seeds; upper triangle sums to 1):",
            markdown_table(["", *names], rel_rows),
            f"## XTasC-Net: cross-task consistency, left digit / sum (λ = {XTASC_LAMBDA})",
            _table([names[0], names[2]], xtasc, timing(xtasc)),
            f"## MTPSL: partial labels, one labelled task per batch (λ = {MTPSL_LAMBDA})",
            _table(names, mtpsl, timing(mtpsl)),
            f"## DiSparse: {100 * (1 - DENSITY):.0f}% of the Linear weights pruned",
            _table(names, disparse, dis_extra),
            f"Total wall time {time.perf_counter() - total:.0f} s.",
        ]
    )
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"regularizers{'-quick' if args.quick else ''}.md"
    path.write_text(text + "\n")
    print(f"written to {path}")


if __name__ == "__main__":
    main()
