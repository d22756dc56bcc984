r"""Section 2: AdaTask's fused update against the memory bandwidth it could reach.

One AdaTask-Adam step of one param group of ``n`` shared parameters (separate tensors of
transformer-like layer shapes, :func:`layer_shapes`) and K tasks must read the K
gradients and read and write the 2K moments and the parameters once:
:math:`B = n(20K + 2s)` bytes (:math:`s` = 4 for float32, 2 for bf16 parameters; gradients
and moments are float32). Timed, each with CUDA events (median, L2 flushed before each run):

* **copy**: a device-to-device ``copy_`` of :math:`B/2` bytes (capped at 2 GiB), i.e. B bytes
  read and written: the physical limit;
* **fused**: :func:`mtl_optim.kernels.adam_update` on the separate tensors (the block-table
  launch) and **fused flat** on views of one buffer (the flat launch);
* **torch path**: what ``AdaTask(fused=False)`` runs (``mtl_optim.adatask.rules.chunked_update``);
* **Adam(fused) loop**: K ``torch.optim.Adam(fused=True)``, one per task, each stepping the
  same parameters with its task's gradient (what AdaTask computes, without weight decay, in
  K multi-tensor launches; its state has the parameters' dtype);
* **per-parameter loop**: the official AdaTask code's structure, per task and per parameter
  torch's single-tensor Adam operations (``benchmarks/kernels.py``).

Every variant is rated on the same B: effective bandwidth ``B / time`` and its percentage of
the copy's. Targets: fused >= 80 % of the copy at n >= 1e7, and >= 3x the per-task
``Adam(fused)`` loop (the per-parameter loop is reported beside it). A second table checks that
every variant computes the same update as the torch path.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch
from torch import Tensor, nn

from mtl_optim.adatask.rules import RULES as _RULES
from mtl_optim.adatask.rules import chunked_update

from ..kernels import _naive
from ._common import Check, Run, Stat, bench_cuda, bench_host, compare, table, tolerance

NAME = "02-adatask-bandwidth"
COPY_CAP = 2**29  # floats: 2 GiB copied, 4 GiB moved
#: parameters of the same-update check (on CUDA: several tensors, so the table launch runs)
CHECK_N = {"cuda": 3 * 10**6, "cpu": 2 * 10**4}


def plan(run: Run) -> tuple[list[int], list[int], list[torch.dtype]]:
    """``(Ks, ns, dtypes)``; ``n = 1e7`` first: the target's size, reported even if the time
    guard cuts the rest."""
    if not run.cuda:
        return [2, 4], [10**5] if run.quick else [10**5, 10**6], [torch.float32, torch.bfloat16]
    if run.quick:
        return [2, 8], [10**7, 10**6], [torch.float32, torch.bfloat16]
    return [2, 4, 8, 16], [10**7, 10**8, 10**6], [torch.float32, torch.bfloat16]


def layer_shapes(n: int) -> list[tuple[int, ...]]:
    """Parameter shapes of transformer-like layers (a ``w×w`` and a ``4w×w`` and ``w×4w``
    matrix, their biases, a norm's weight) cycled up to ``n`` elements, the last tensor
    taking the remainder; ``w`` = 1024 from n = 1e7 on, else 256 (several tensors at 1e6)."""
    w = 1024 if n >= 10**7 else 256
    layer = [(w, w), (w,), (4 * w, w), (4 * w,), (w, 4 * w), (w,), (w,)]
    out: list[tuple[int, ...]] = []
    total = 0
    while total < n:
        for shape in layer:
            size = math.prod(shape)
            if total + size >= n:
                out.append((n - total,))
                return out
            out.append(shape)
            total += size
    return out


def make_params(n: int, dtype: torch.dtype, device: torch.device, flat: bool) -> tuple:
    shapes = layer_shapes(n)
    sizes = [math.prod(s) for s in shapes]
    if flat:
        buf = torch.randn(n, device=device).to(dtype)
        return tuple(c.view(s) for c, s in zip(buf.split(sizes), shapes))
    return tuple(torch.randn(s, device=device).to(dtype) for s in shapes)


def moved_bytes(k: int, n: int, dtype: torch.dtype) -> int:
    """Bytes one fused AdaTask-Adam step must move: ``n(20K + 2s)``."""
    return n * (20 * k + 2 * torch.empty((), dtype=dtype).element_size())


def variants(
    k: int, n: int, dtype: torch.dtype, device: torch.device, kernels: object
) -> tuple[dict[str, Callable[[], object]], int]:
    """The functions to time and the number of floats the copy moves."""
    group = torch.optim.Adam([torch.zeros(1)], lr=1e-4).param_groups[0]
    grads = torch.randn(k, n, device=device)
    params = make_params(n, dtype, device, flat=False)
    # small random moments (never time on zeros), shared by the fused and the torch path
    moments = {
        "exp_avg": torch.randn(k, n, device=device).mul_(1e-3),
        "exp_avg_sq": torch.rand(k, n, device=device).mul_(1e-6),
    }
    torch_state = {"step": torch.zeros((), dtype=torch.float32), **moments}
    copy_n = min(moved_bytes(k, n, dtype) // 8, COPY_CAP)
    src, dst = torch.randn(copy_n, device=device), torch.empty(copy_n, device=device)
    fns: dict[str, Callable[[], object]] = {"copy": lambda: dst.copy_(src)}
    if kernels is not None:
        fused_state, flat_state = dict(moments), dict(moments)
        flat_params = make_params(n, dtype, device, flat=True)
        fns["fused"] = lambda: kernels.adam_update(group, grads, params, fused_state)
        fns["fused flat"] = lambda: kernels.adam_update(group, grads, flat_params, flat_state)
    rule = _RULES[torch.optim.Adam]
    fns["torch path"] = lambda: chunked_update(rule, group, grads, params, torch_state, k)

    loop_params = [nn.Parameter(p.detach().clone()) for p in params]
    rows = grads if dtype == torch.float32 else grads.to(dtype)
    sizes = [p.numel() for p in loop_params]
    task_grads = [[g.view_as(p) for g, p in zip(r.split(sizes), loop_params)] for r in rows]
    opts = [torch.optim.Adam(loop_params, lr=1e-4, fused=True) for _ in range(k)]

    def loop() -> None:
        for opt, gs in zip(opts, task_grads):
            for p, g in zip(loop_params, gs):
                p.grad = g
            opt.step()

    fns["Adam(fused) loop"] = loop
    naive_state = {key: v.clone() for key, v in moments.items()}
    naive_params = tuple(p.detach() for p in loop_params)  # the same storage, no autograd
    fns["per-parameter loop"] = _naive("adam", group, grads, naive_params, naive_state)
    return fns, copy_n


def same_update(k: int, n: int, device: torch.device, kernels: object) -> dict[str, Check]:
    """Does every timed variant compute AdaTask's update? One step of each from the same
    float32 parameters and zero state (lr 1e-2, so the change dwarfs the parameters'
    rounding); each variant's parameter change against the torch path's."""
    torch.manual_seed(0)
    base = make_params(n, torch.float32, device, flat=False)
    grads = torch.randn(k, n, device=device)
    group = torch.optim.Adam([torch.zeros(1)], lr=1e-2).param_groups[0]

    def fresh(flat: bool = False) -> tuple:
        if not flat:
            return tuple(b.clone() for b in base)
        buf = torch.cat([b.reshape(-1) for b in base])
        return tuple(c.view_as(b) for c, b in zip(buf.split([b.numel() for b in base]), base))

    def change(params: tuple) -> list[Tensor]:
        return [p - b for p, b in zip(params, base)]

    ps = fresh()
    state = {"step": torch.zeros((), dtype=torch.float32)}
    chunked_update(_RULES[torch.optim.Adam], group, grads, ps, state, k)
    ref = change(ps)
    out = {}
    if kernels is not None:
        for name, flat in (("fused", False), ("fused flat", True)):
            ps = fresh(flat)
            kernels.adam_update(group, grads, ps, {})
            out[name] = compare(change(ps), ref, tolerance(torch.float32))
    loop = [nn.Parameter(b.clone()) for b in base]
    for row in grads:
        opt = torch.optim.Adam(loop, lr=1e-2, fused=True)
        for p, g in zip(loop, row.split([b.numel() for b in base])):
            p.grad = g.view_as(p)
        opt.step()
    out["Adam(fused) loop"] = compare(change(tuple(loop)), ref, tolerance(torch.float32))
    ps = fresh()
    zeros = {key: torch.zeros(k, n, device=device) for key in ("exp_avg", "exp_avg_sq")}
    _naive("adam", group, grads, ps, zeros)()
    out["per-parameter loop"] = compare(change(ps), ref, tolerance(torch.float32))
    return out


def _cell(t: dict[str, Stat], key: str, moved: int, copy_bw: float) -> str:
    if key not in t:
        return "—"
    rate = moved / t[key].median
    return f"{t[key].ms()} ({rate / 1e9:.0f} GB/s, {rate / copy_bw:.0%})"


def measure(run: Run, k: int, n: int, dtype: torch.dtype, kernels: object) -> tuple[list, dict]:
    """One row and the numbers the targets need."""
    fns, copy_n = variants(k, n, dtype, run.device, kernels)
    if run.cuda:
        t = bench_cuda(fns, run.device, rep_ms=50.0, min_reps=3, max_reps=50)
    else:
        t = bench_host(fns, warmup=1, repeat=3 if run.quick else 5)
    del fns
    moved = moved_bytes(k, n, dtype)
    copy_bw = 8 * copy_n / t["copy"].median
    ratio = {
        key: t["Adam(fused) loop"].median / t[key].median
        for key in ("fused", "torch path")
        if key in t
    }
    naive = t["per-parameter loop"].median / t["fused"].median if "fused" in t else None
    row = [
        str(dtype).replace("torch.", ""),
        str(k),
        f"{n:.0e}",
        f"{moved / 1e6:,.0f}",
        f"{t['copy'].ms()} ({copy_bw / 1e9:.0f} GB/s)",
        _cell(t, "fused", moved, copy_bw),
        _cell(t, "fused flat", moved, copy_bw),
        _cell(t, "torch path", moved, copy_bw),
        _cell(t, "Adam(fused) loop", moved, copy_bw),
        _cell(t, "per-parameter loop", moved, copy_bw),
        f"{ratio['fused']:.1f}×" if "fused" in ratio else "—",
        f"{ratio['torch path']:.1f}×",
        f"{naive:.1f}×" if naive is not None else "—",
    ]
    facts = {
        "pct": moved / t["fused"].median / copy_bw if "fused" in t else None,
        "speedup": ratio.get("fused"),
    }
    return row, facts


CHECKED = ["fused", "fused flat", "Adam(fused) loop", "per-parameter loop"]
HEADERS = [
    "params",
    "K",
    "n",
    "MB moved",
    "copy ms (GB/s)",
    "fused ms (GB/s, % copy)",
    "fused flat ms (GB/s, % copy)",
    "torch path ms (GB/s, % copy)",
    "Adam(fused) loop ms (GB/s, % copy)",
    "per-parameter loop ms (GB/s, % copy)",
    "fused speed-up over the Adam(fused) loop",
    "torch path speed-up over the Adam(fused) loop",
    "fused speed-up over the per-parameter loop",
]


def main(run: Run, budget: float) -> None:
    end = time.monotonic() + budget
    ks, ns, dtypes = plan(run)
    kernels = None
    note = "Triton kernels not timed: no CUDA (the torch paths only)."
    if run.cuda:
        try:
            from mtl_optim import kernels
        except ImportError as e:
            note = f"Triton kernels not timed: {e}."
        else:
            note = "fused: mtl_optim.kernels.adam_update."
    rows: list[list[str]] = []
    facts: list[tuple[int, dict]] = []
    check_n = CHECK_N["cuda" if run.cuda else "cpu"]
    checks: list[list[str]] = []
    failed_checks = 0
    for k in ks:
        try:
            result = same_update(k, check_n, run.device, kernels)
        except Exception as e:
            checks.append([str(k), f"**error** {type(e).__name__}: {str(e)[:100]}", "", "", ""])
            failed_checks += 1
            continue
        failed_checks += sum(not c.ok for c in result.values())
        checks.append([str(k)] + [result[v].cell() if v in result else "—" for v in CHECKED])
    check_text = (
        f"Same update (float32, n = {check_n:.0e}, one step from zero state, lr 1e-2): each "
        "variant's parameter change against the torch path's, ‖Δ − Δ_torch‖/‖Δ_torch‖.\n\n"
        + table(["K"] + CHECKED, checks)
    )
    notes = (
        f"{note} Cells: median ±IQR ({'CUDA events, L2 flushed' if run.cuda else 'wall clock'});"
        " bandwidth = B / time with B = n(20K + 2s), the bytes one fused AdaTask-Adam step must "
        "move (s = parameter bytes; gradients and moments float32), for every variant; % = of "
        "the copy's bandwidth (8 bytes per float copied). The loop keeps its moments in the "
        "parameters' dtype and, for bf16, reads bf16 copies of the gradients made outside the "
        "timing. Targets: fused ≥ 80 % of the copy at n ≥ 1e7 and ≥ 3× the loop."
    )

    def write(verdict: str = "") -> None:
        body = table(HEADERS, rows) + "\n\n" + check_text
        run.write(NAME, "GPU suite 2: AdaTask update bandwidth", verdict + body, notes)

    for n in ns:
        for dtype in dtypes:
            for k in ks:
                label = [str(dtype).replace("torch.", ""), str(k), f"{n:.0e}"]
                if time.monotonic() > end or run.deadline.expired(20):
                    rows.append(label + ["skipped: time guard"] + [""] * (len(HEADERS) - 4))
                    continue
                run.log(f"2/5 bandwidth: {label}")
                try:
                    row, fact = measure(run, k, n, dtype, kernels)
                except Exception as e:  # e.g. out of memory: a result, not the end
                    row, fact = label + [f"**error** {type(e).__name__}: {str(e)[:100]}"], {}
                    row += [""] * (len(HEADERS) - len(row))
                rows.append(row)
                facts.append((n, fact))
                if run.cuda:
                    torch.cuda.empty_cache()
                write()
    if failed_checks:
        run.targets.append(f"AdaTask bandwidth: {failed_checks} variants do not compute the update")
    big = [f for n, f in facts if n >= 10**7 and f.get("pct") is not None]
    if big:
        pct = min(f["pct"] for f in big)
        speed = min(f["speedup"] for f in big)
        verdict = "met" if pct >= 0.8 and speed >= 3 else "**missed**"
        line = (
            f"AdaTask fused update at n ≥ 1e7: worst {pct:.0%} of copy bandwidth (target 80 %), "
            f"worst {speed:.1f}× the per-task Adam(fused) loop (target 3×): {verdict}"
        )
        run.targets.append(line)
    else:
        line = f"{len(facts)} configurations timed; {note}"
    run.status[NAME] = line
    write(line + "\n\n")
