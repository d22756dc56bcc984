r"""What every AdaTask update kernel shares: where the parameters are, and how it is launched.

The per-task gradients of one param group are a ``(K, n)`` column slice of the engine's
``J`` (row stride ``d``) and the per-task state is one contiguous ``(K, n)`` float32 buffer
per key, so column ``c`` of the group is at ``row·stride + c`` in both. Only the parameters
are scattered over separate tensors. A kernel program owns ``BLOCK`` consecutive columns of
one *segment* (a run of parameters adjacent in memory, in ``J``'s column order, of one
dtype) and finds them in one of two ways:

* **flat**: the whole group is one segment (its parameters are contiguous views of one
  buffer): program ``i`` owns columns ``[i·BLOCK, (i+1)·BLOCK)`` and the parameters are one
  ``(n,)`` view, a plain elementwise layout that Triton can vectorise;
* **table**: otherwise programs own the windows ``[j·BLOCK, (j+1)·BLOCK)`` of the group's
  columns, clipped to the segments, listed in ``(3, P)`` int64 tables (first column, stop
  column, address of the parameter element at the first column): many parameters in one
  launch, as in torch's multi-tensor apply. Full windows whose parameter address is 64-byte
  aligned go to an *even* launch that tells Triton so (``tl.multiple_of``), which then
  vectorises as in the flat layout; the segments' edge windows go to a masked launch. One or
  two launches per dtype.

Either way each parameter element is read and written once, in the kernel: the alternative,
writing the summed update to a flat buffer and ``_foreach_add_`` it, moves 8 more bytes per
element (write and read the fp32 update), i.e. :math:`20K+16` instead of :math:`20K+8`
bytes for Adam (7–14% more at K = 8…2), plus a second launch. Tables are cached by
parameter addresses, so a step uploads nothing.

Float64 scalars reach a kernel as two float32 arguments, ``hi + lo`` (:func:`split64`):
Triton passes Python floats as float32 (and the interpreter keeps them as Python floats),
but ``1 - β^k`` for :math:`\beta_2 = 0.999` loses 5 digits in float32.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import triton
import triton.language as tl
from torch import Tensor

from .._backend import interpreted

SUPPORTED_DTYPES = {
    torch.float32: tl.float32,
    torch.bfloat16: tl.bfloat16,
    torch.float16: tl.float16,
}


def default_block() -> int:
    """Columns per program: 1024 on a GPU; 4096 in the interpreter, whose cost grows with the
    number of programs."""
    return 4096 if interpreted() else 1024


def split64(x: float) -> tuple[float, float]:
    """``(hi, lo)``, both float32-representable, with ``hi + lo`` equal to ``x`` to ~2^-48."""
    hi = float(np.float32(x))
    return hi, float(np.float32(x - hi))


def lerp_weights(weight: float) -> tuple[float, float]:
    """The scalars of :func:`lerp`: ``weight`` and, exactly in float32, ``weight - 1``."""
    return weight, float(np.float32(weight)) - 1


@triton.jit
def f64(hi, lo):
    """The float64 that :func:`split64` split."""
    return tl.cast(hi, tl.float64) + tl.cast(lo, tl.float64)


@triton.jit
def pow_step(base, step):
    """``base ** step`` in float64 by repeated squaring; ``step`` is the float32 step count."""
    n = step.to(tl.int32)
    result = tl.cast(1.0, tl.float64)
    while n > 0:
        result = tl.where((n & 1) == 1, result * base, result)
        base = base * base
        n = n >> 1
    return result


@triton.jit
def lerp(start, end, weight, weight_minus_one, HIGH: tl.constexpr):
    """``torch.lerp``'s two formulas (``HIGH``: ``|weight| >= 0.5``), for identical rounding."""
    if HIGH:
        return end + weight_minus_one * (end - start)
    return start + weight * (end - start)


@triton.jit
def columns(
    params_ptr,
    table_ptr,
    programs,
    n,
    BLOCK: tl.constexpr,
    P: tl.constexpr,
    FLAT: tl.constexpr,
    EVEN: tl.constexpr,
):
    """This program's group columns, their mask, and pointers to the matching param elements."""
    offsets = tl.arange(0, BLOCK)
    pid = tl.program_id(0)
    if FLAT:
        cols = pid.to(tl.int64) * BLOCK + offsets
        return cols, cols < n, params_ptr + cols
    start = tl.load(table_ptr + pid)
    stop = tl.load(table_ptr + programs + pid)
    address = tl.load(table_ptr + 2 * programs + pid)
    p_ptr = address.to(tl.pointer_type(P))
    if EVEN:
        start = tl.multiple_of(start, BLOCK)
        stop = tl.multiple_of(stop, BLOCK)
        p_ptr = tl.multiple_of(p_ptr, 16)
    cols = start + offsets
    return cols, cols < stop, p_ptr + offsets


@triton.jit
def task_gradient(ptr, mask, theta, l2, MAXIMIZE: tl.constexpr, L2: tl.constexpr):
    """One task's gradient block as the torch rules see it: negated for ``maximize``, plus the
    task's share ``l2 * theta`` of coupled weight decay."""
    g = tl.load(ptr, mask=mask, other=0.0)
    if MAXIMIZE:
        g = -g
    if L2:
        g = g + l2 * theta
    return g


@triton.jit
def round_to(x, P: tl.constexpr):
    """Round float32 ``x`` to the parameter dtype ``P``, to nearest even.

    bfloat16 is rounded by hand: the interpreter's float32 -> bfloat16 cast truncates (a GPU
    rounds to nearest even, as torch does), and the two must give the same parameters.
    """
    if P == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        rounded = bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
        return tl.where(x != x, x.to(tl.bfloat16), rounded)
    return x.to(P)


@dataclass(frozen=True)
class Launch:
    """One kernel launch over (some of) the parameters of one dtype."""

    dtype: torch.dtype
    programs: int
    params: Tensor  # flat: the (n,) view over all parameters; table: the table (unused)
    table: Tensor  # table: (3, programs) int64; flat: the flat view (unused)
    flat: bool
    even: bool  # table of full, aligned blocks: the kernel may vectorise


def _segments(params: Sequence[Tensor]) -> list[tuple[int, int, int, torch.dtype]]:
    """``(first column, stop column, address, dtype)`` of each run of memory-adjacent params."""
    out: list[list] = []
    col = 0
    for p in params:
        n, address, size = p.numel(), p.data_ptr(), p.element_size()
        if n == 0:
            continue
        last = out[-1] if out else None
        if last and last[3] == p.dtype and last[2] + (last[1] - last[0]) * size == address:
            last[1] += n
        else:
            out.append([col, col + n, address, p.dtype])
        col += n
    return [tuple(s) for s in out]


@functools.lru_cache(maxsize=256)
def _tables(segments: tuple, dtype: torch.dtype, block: int, device: torch.device) -> list:
    """``[(table, even)]``: programs own the columns ``[j·BLOCK, (j+1)·BLOCK)`` of a segment.

    A block that fills its whole window and whose parameter address is 64-byte aligned goes
    to the ``even`` table, whose launch tells Triton so (``tl.multiple_of``), which lets it
    vectorise; the segments' edge blocks go to a second, masked launch.
    """
    size = torch.empty((), dtype=dtype).element_size()
    rows: dict[bool, list] = {True: [], False: []}
    for start, stop, address, dt in segments:
        if dt != dtype:
            continue
        for j in range(start // block, triton.cdiv(stop, block)):
            lo, hi = max(start, j * block), min(stop, (j + 1) * block)
            at = address + (lo - start) * size
            even = hi - lo == block and lo == j * block and at % 64 == 0
            rows[even].append((lo, hi, at))
    return [
        (torch.tensor(r, dtype=torch.int64).T.contiguous().to(device), even)
        for even, r in rows.items()
        if r
    ]


def plan(params: Sequence[Tensor], n: int, block: int) -> list[Launch]:
    """The launches that cover ``params`` (contiguous tensors, ``n`` elements in all)."""
    segments = tuple(_segments(params))
    if len(segments) == 1 and segments[0][:2] == (0, n):
        first = next(p for p in params if p.numel())
        flat = torch.as_strided(first, (n,), (1,), first.storage_offset())
        return [Launch(first.dtype, triton.cdiv(n, block), flat, flat, True, False)]
    return [
        Launch(dtype, table.shape[1], table, table, False, even)
        for dtype in dict.fromkeys(s[3] for s in segments)
        for table, even in _tables(segments, dtype, block, params[0].device)
    ]


def state_buffer(state: dict, key: str, k: int, n: int, device: torch.device, fill: float = 0.0):
    """``state[key]``, a contiguous ``(K, n)`` float32 buffer on ``device`` (created on demand)."""
    buf = state.get(key)
    if buf is None:
        buf = state[key] = torch.full((k, n), fill, dtype=torch.float32, device=device)
    elif buf.shape != (k, n) or buf.dtype != torch.float32:
        raise ValueError(
            f"state {key!r} has shape {tuple(buf.shape)} and dtype {buf.dtype}, expected "
            f"({k}, {n}) float32"
        )
    elif buf.device != device or not buf.is_contiguous():
        buf = state[key] = buf.to(device=device, memory_format=torch.contiguous_format)
    return buf


def next_step(state: dict, device: torch.device) -> Tensor:
    """Increment ``state["step"]`` (a 0-d float32 tensor, moved to ``device``) on the device."""
    step = state.get("step")
    if step is None:
        step = torch.zeros((), dtype=torch.float32, device=device)
    elif step.device != device:
        step = step.to(device)
    state["step"] = step
    return step.add_(1)


def check(grads: Tensor, params: Sequence[Tensor]) -> tuple[Tensor, int, int]:
    """Validate a group's inputs; returns ``(grads with column stride 1, K, n)``."""
    if grads.dim() != 2 or grads.dtype != torch.float32:
        raise TypeError(
            f"grads must be a (K, n) float32 tensor, got {tuple(grads.shape)} {grads.dtype}"
        )
    if grads.shape[1] > 1 and grads.stride(1) != 1:
        grads = grads.contiguous()
    k, n = grads.shape
    total = sum(p.numel() for p in params)
    if total != n:
        raise ValueError(f"grads has {n} columns but the parameters have {total} elements")
    for p in params:
        if p.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"fused kernels support float32, bfloat16 and float16, got {p.dtype}")
        if p.device != grads.device:
            raise ValueError(f"parameter on {p.device} but grads on {grads.device}")
    return grads, k, n


def run(
    kernel: Any,
    grads: Tensor,
    params: Sequence[Tensor],
    step: Tensor,
    buffers: Sequence[Tensor],
    scalars: Sequence[float],
    flags: dict[str, bool],
    block: int | None,
) -> None:
    """Launch ``kernel`` over every parameter of the group.

    Non-contiguous parameters (e.g. channels-last weights) are updated through a contiguous
    copy, since the kernel addresses elements in ``J``'s (row-major) column order. The
    parameters' autograd version counters are bumped, as any in-place update does.
    """
    k, n = grads.shape
    block = block or default_block()
    if block < 16 or block & (block - 1):
        raise ValueError(f"block must be a power of two >= 16, got {block}")
    if n == 0:
        return
    if interpreted() and grads.device.type != "cpu":
        raise RuntimeError(
            "Triton's interpreter copies tensors to the host, so the parameter addresses in the "
            "kernels' block tables would be wrong: use CPU tensors with TRITON_INTERPRET=1"
        )
    work = [p.detach() if p.is_contiguous() else p.detach().contiguous() for p in params]
    with _on(grads.device):
        for launch in plan(work, n, block):
            kernel[(launch.programs,)](
                grads,
                grads.stride(0),
                launch.params,
                launch.table,
                launch.programs,
                n,
                step,
                *buffers,
                *scalars,
                K=k,
                BLOCK=block,
                P=SUPPORTED_DTYPES[launch.dtype],
                FLAT=launch.flat,
                EVEN=launch.even,
                **flags,
            )
    for p, w in zip(params, work):
        if w.data_ptr() != p.data_ptr():
            p.detach().copy_(w)
        else:
            torch.autograd.graph.increment_version(p)


def _on(device: torch.device) -> contextlib.AbstractContextManager:
    """Launch on ``device``'s GPU (Triton launches on the current one)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
