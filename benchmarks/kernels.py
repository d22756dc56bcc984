r"""Fused AdaTask kernels and the Triton Gramian against the torch paths, on a GPU.

Run ``python -m benchmarks.kernels`` on a CUDA machine (``--quick`` for a smoke run,
``--sizes 1e6 1e7`` to choose the parameter counts). For K in {2, 4, 8} and ``n`` float32
shared parameters in one param group (many tensors of realistic sizes), one AdaTask step of
each base optimizer is timed, interleaved round by round with CUDA events (median of the
rounds after a warm-up), as:

* **fused**: :mod:`mtl_optim.kernels` (``adam_update`` …) on separate parameter tensors
  (the block-table launch), and **fused flat** on the same parameters as views of one buffer
  (the flat launch);
* **torch**: AdaTask's vectorised torch path (its rules on the ``(K, n)`` slice, the sum over
  tasks, one ``_foreach_add_``), i.e. the kernels' twins;
* **naive**: a per-task Python loop as in the official AdaTask code: for each task and each
  parameter, torch's single-tensor update of that task's state, applied to the parameter;
* **copy**: a device-to-device ``copy_`` of ``min(Kn, 2^28)`` floats, the bandwidth yardstick.

Bandwidth = bytes that must move / time, with ``s = 4`` bytes per float32 parameter:
Adam :math:`n(20K + 2s)` (gradient 4, two moments read and written 16, per task; the
parameter read and written once), RMSprop and Adagrad :math:`n(12K + 2s)`; the copy moves
:math:`2 \cdot 4` bytes per float. Targets: fused >= 80% of the copy's bandwidth and >= 3x the
naive loop. The Gramian table times ``kernels.gramian(J)``, ``J @ J.T`` (float32 cuBLAS) and
the engine's float64 ``gramian`` on the same ``(K, n)`` float32 ``J`` (:math:`4Kn` bytes).

Before timing, each fused kernel is checked against its twin on the device (3 steps).
Without CUDA the script stops, unless ``--cpu``: then only the torch paths, the naive loop, the
copy and the torch Gramians are timed, at small sizes and on one thread (a check that the
script works; the kernels are not timed through Triton's interpreter).
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from mtl_optim.adatask.rules import adagrad as _adagrad
from mtl_optim.adatask.rules import adam as _adam
from mtl_optim.adatask.rules import chunked_update
from mtl_optim.adatask.rules import rmsprop as _rmsprop
from mtl_optim.engine import gramian as engine_gramian

from ._timing import cuda_event_times, markdown_table, report, time_fns

# parameter shapes of one "layer", cycled until n elements: matrices and their biases
_LAYER = [(1024, 1024), (1024,), (4096, 1024), (4096,), (1024, 4096), (1024,), (1024,)]
_GROUPS = {
    "adam": (torch.optim.Adam, _adam, 20),
    "rmsprop": (torch.optim.RMSprop, _rmsprop, 12),
    "adagrad": (torch.optim.Adagrad, _adagrad, 12),
}


def _shapes(n: int) -> list[tuple[int, ...]]:
    """Layer shapes cycled up to ``n`` elements; the last tensor takes the remainder."""
    out, total = [], 0
    while total < n:
        for shape in _LAYER:
            size = torch.Size(shape).numel()
            if total + size > n:
                out.append((n - total,))
                return out
            out.append(shape)
            total += size
    return out


def _params(n: int, device: torch.device, flat: bool) -> tuple[Tensor, ...]:
    shapes = _shapes(n)
    if flat:
        buf = torch.randn(n, device=device)
        sizes = [torch.Size(s).numel() for s in shapes]
        return tuple(c.view(s) for c, s in zip(buf.split(sizes), shapes))
    return tuple(torch.randn(s, device=device) for s in shapes)


def _naive(name: str, group: dict, grads: Tensor, params: tuple, state: dict) -> Callable:
    """One step of the official code's structure: per task, per parameter, torch's
    single-tensor update of that task's state, applied to the parameter in place."""
    sizes = [p.numel() for p in params]
    grad_rows = [[g.view_as(p) for g, p in zip(row.split(sizes), params)] for row in grads]
    rows = {
        key: [[b.view_as(p) for b, p in zip(row.split(sizes), params)] for row in buf]
        for key, buf in state.items()
        if key != "step"
    }
    counter = [0]
    lr, eps = group["lr"], group["eps"]

    def step() -> None:
        counter[0] += 1
        k = counter[0]
        for i, task_grads in enumerate(grad_rows):
            if name == "adam":
                beta1, beta2 = group["betas"]
                size, bc2 = lr / (1 - beta1**k), (1 - beta2**k) ** 0.5
                moments = zip(rows["exp_avg"][i], rows["exp_avg_sq"][i])
                for p, g, (m, v) in zip(params, task_grads, moments):
                    m.lerp_(g, 1 - beta1)
                    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                    p.addcdiv_(m, v.sqrt().div_(bc2).add_(eps), value=-size)
            elif name == "rmsprop":
                alpha = group["alpha"]
                for p, g, sq in zip(params, task_grads, rows["square_avg"][i]):
                    sq.mul_(alpha).addcmul_(g, g, value=1 - alpha)
                    p.addcdiv_(g, sq.sqrt().add_(eps), value=-lr)
            else:
                clr = lr / (1 + (k - 1) * group["lr_decay"])
                for p, g, acc in zip(params, task_grads, rows["sum"][i]):
                    acc.addcmul_(g, g, value=1)
                    p.addcdiv_(g, acc.sqrt().add_(eps), value=-clr)

    return step


def _time_cuda(
    fns: dict[str, Callable[[], object]], warmup: int, repeat: int
) -> dict[str, tuple[float, float]]:
    """``(median, IQR)`` seconds per function from CUDA events, interleaved round by round."""
    out = {}
    for name, seconds in cuda_event_times(fns, warmup, repeat).items():
        times = sorted(seconds)
        q = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
        out[name] = (statistics.median(times), q[2] - q[0])
    return out


def _ms(t: tuple[float, float]) -> str:
    return f"{t[0] * 1e3:.3f} ±{t[1] * 1e3:.3f}"


def _check_kernels(kernels: Any, device: torch.device) -> str:
    """Fused vs twin on the device: the largest error relative to each buffer's scale."""
    worst = 0.0
    n, k = 100_003, 4
    for name, (base, _, _) in _GROUPS.items():
        fused = getattr(kernels, f"{name}_update")
        twin = getattr(kernels, f"{name}_update_reference")
        group = base([torch.zeros(1)], lr=0.01).param_groups[0]
        params = _params(n, device, False)
        ref = tuple(p.clone() for p in params)
        state: dict = {}
        ref_state: dict = {}
        for _ in range(3):
            grads = torch.randn(k, n, device=device)
            fused(group, grads, params, state)
            twin(group, grads, ref, ref_state)
        pairs = list(zip(params, ref)) + [(state[key], ref_state[key]) for key in ref_state]
        for a, b in pairs:
            a, b = a.double().cpu().reshape(-1), b.double().cpu().reshape(-1)
            worst = max(worst, ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item())
    return f"fused vs twin on {device.type} (3 steps, K={k}, n={n}): max error {worst:.1e} of scale"


def measure_update(
    name: str, k: int, n: int, device: torch.device, timer: Callable, kernels: Any
) -> list[str]:
    base, rule, per_task = _GROUPS[name]
    group = base([torch.zeros(1)], lr=1e-4).param_groups[0]
    grads = torch.randn(k, n, device=device)
    params = _params(n, device, flat=False)
    state: dict = {"step": torch.zeros((), dtype=torch.float32)}  # the torch path's: on the host
    rule(group, grads, params, state, k)  # creates the (K, n) buffers
    state["step"].zero_()
    copy_n = min(k * n, 1 << 28)
    src, dst = torch.randn(copy_n, device=device), torch.empty(copy_n, device=device)
    fns: dict[str, Callable[[], object]] = {
        "copy": lambda: dst.copy_(src),
        "torch": lambda: _torch_step(rule, group, grads, params, state, k),
        "naive": _naive(name, group, grads, params, state),
    }
    if kernels is not None:
        fused = getattr(kernels, f"{name}_update")
        fused_state = {key: v for key, v in state.items() if key != "step"}  # shares the buffers
        flat_params, flat_state = _params(n, device, flat=True), dict(fused_state)
        fns["fused"] = lambda: fused(group, grads, params, fused_state)
        fns["fused flat"] = lambda: fused(group, grads, flat_params, flat_state)
    t = timer(fns)
    moved = n * (per_task * k + 2 * 4)
    copy_bw = 2 * 4 * copy_n / t["copy"][0]

    def bw(key: str) -> str:
        if key not in t:
            return "—"
        rate = moved / t[key][0]
        return f"{_ms(t[key])} ({rate / 1e9:.0f} GB/s, {rate / copy_bw:.0%})"

    speedup = (
        f"{t['naive'][0] / t['fused'][0]:.1f}× / {t['torch'][0] / t['fused'][0]:.1f}×"
        if "fused" in t
        else "—"
    )
    return [
        name,
        str(k),
        f"{n:,}",
        f"{moved / 1e6:,.1f}",
        f"{_ms(t['copy'])} ({copy_bw / 1e9:.0f} GB/s)",
        bw("fused"),
        bw("fused flat"),
        bw("torch"),
        bw("naive"),
        speedup,
    ]


def _torch_step(rule: Callable, group: dict, grads: Tensor, params: tuple, state: dict, k: int):
    """AdaTask's torch path for one group (what ``AdaTask.apply_update`` runs: column chunks)."""
    chunked_update(rule, group, grads, params, state, k)


def measure_gramian(k: int, n: int, device: torch.device, timer: Callable, kernels: Any):
    jac = torch.randn(k, n, device=device)
    fns: dict[str, Callable[[], object]] = {
        "matmul": lambda: jac @ jac.T,
        "engine": lambda: engine_gramian(jac),
    }
    if kernels is not None:
        fns["triton"] = lambda: kernels.gramian(jac)
    t = timer(fns)
    moved = 4 * k * n

    def cell(key: str) -> str:
        if key not in t:
            return "—"
        return f"{_ms(t[key])} ({moved / t[key][0] / 1e9:.0f} GB/s)"

    ratio = f"{t['matmul'][0] / t['triton'][0]:.2f}×" if "triton" in t else "—"
    return [str(k), f"{n:,}", cell("triton"), cell("matmul"), cell("engine"), ratio]


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, few rounds")
    parser.add_argument("--cpu", action="store_true", help="no CUDA: time the torch paths only")
    parser.add_argument("--sizes", type=float, nargs="+", help="parameter counts, e.g. 1e7 1e8")
    parser.add_argument("--ks", type=int, nargs="+", default=None, help="numbers of tasks")
    parser.add_argument("--bases", nargs="+", choices=list(_GROUPS), default=list(_GROUPS))
    parser.add_argument("--repeat", type=int, default=None, help="timed rounds per cell")
    args = parser.parse_args()

    if not torch.cuda.is_available() and not args.cpu:
        sys.exit(
            "benchmarks.kernels needs a CUDA GPU (the Triton kernels are not timed through the "
            "CPU interpreter); run with --cpu to time only the torch paths at small sizes"
        )
    cpu = not torch.cuda.is_available() or args.cpu
    device = torch.device("cpu" if cpu else "cuda")
    if cpu:
        torch.set_num_threads(1)
        sizes = args.sizes or ([1e4] if args.quick else [1e5, 1e6])
        device_name = "cpu"
    else:
        sizes = args.sizes or ([1e6] if args.quick else [1e7, 1e8])
        device_name = torch.cuda.get_device_name()
    ks = args.ks or ([2, 4] if args.quick else [2, 4, 8])
    repeat = args.repeat or (5 if args.quick else 20)
    warmup = 2 if args.quick else 5
    if cpu:
        kernels = None

        def timer(fns):
            return time_fns(fns, warmup=warmup, repeat=repeat)

        versions = f"torch {torch.__version__}; Triton kernels not timed on CPU"
        check = "kernels not run (CPU)"
    else:
        import triton

        from mtl_optim import kernels

        def timer(fns):
            return _time_cuda(fns, warmup, repeat)

        versions = f"torch {torch.__version__}, triton {triton.__version__}"
        check = _check_kernels(kernels, device)

    sizes = [int(s) for s in sizes]
    rows = [
        measure_update(name, k, n, device, timer, kernels)
        for name in args.bases
        for n in sizes
        for k in ks
    ]
    grams = [measure_gramian(k, n, device, timer, kernels) for n in sizes for k in ks]
    update_headers = [
        "base",
        "K",
        "n",
        "MB/step",
        "copy ms (GB/s)",
        "fused ms (GB/s, % copy)",
        "fused flat ms (GB/s, % copy)",
        "torch path ms (GB/s, % copy)",
        "naive loop ms (GB/s, % copy)",
        "fused speed-up vs naive / torch",
    ]
    gram_headers = [
        "K",
        "n",
        "triton gramian ms (GB/s)",
        "J @ J.T ms (GB/s)",
        "engine float64 ms (GB/s)",
        "J @ J.T / triton",
    ]
    table = (
        "## One AdaTask step per param group (float32 parameters)\n\n"
        + markdown_table(update_headers, rows)
        + "\n\n## Gramian J Jᵀ of a (K, n) float32 J\n\n"
        + markdown_table(gram_headers, grams)
    )
    notes = (
        f"Device: {device_name}; {versions}. {check}.\n\n"
        f"Cells: median ±IQR of {repeat} interleaved rounds after {warmup} warm-up rounds "
        f"({'wall clock, one thread' if cpu else 'CUDA events'}). Bytes that must move per "
        "step: Adam n(20K + 8), RMSprop and Adagrad n(12K + 8) (float32 parameters); the "
        "copy moves 8 bytes per float; the Gramian reads 4Kn bytes. Parameters: one group of "
        f"tensors shaped {_LAYER} cycled up to n (fused: separate tensors, block-table "
        "launch; fused flat: views of one buffer, flat launch). Targets: fused >= 80% of the "
        "copy's bandwidth and >= 3x the naive per-task loop.\n\n"
        "Gramian: the engine keeps `mtl_optim.engine.gramian` (float64 accumulation) as its "
        "default; switching it to the Triton kernel is decided from the GPU table above "
        "(the kernel reads J once and accumulates in float64; `J @ J.T` accumulates in "
        "float32)."
        + (
            " **This is a CPU run: the decision awaits a GPU run** "
            "(`python -m benchmarks.kernels` on a CUDA machine)."
            if cpu
            else ""
        )
    )
    report(
        f"kernels-{_slug(device_name)}",
        f"AdaTask kernels and Gramian: fused vs torch vs naive ({device_name})",
        table,
        notes,
        quick=args.quick,
    )


if __name__ == "__main__":
    main()
