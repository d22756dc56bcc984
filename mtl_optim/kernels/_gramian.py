r"""Fused Gramian :math:`M = J J^\top` of the engine's ``(K, d)`` per-task gradients.

The engine's :func:`mtl_optim.engine.gramian` accumulates in float64 by upcasting ``J`` in
column chunks and calling ``addmm``: it reads the float32 ``J`` once, then writes and reads a
float64 copy, :math:`4Kd + 8Kd + 8Kd = 20Kd` bytes. This kernel reads ``J`` once
(:math:`4Kd` bytes) and forms the float64 products in registers: each of ``P`` programs
walks over column tiles ``(K, BLOCK)`` of ``J`` and accumulates, for each row ``i``,
:math:`\sum_c J_{jc} J_{ic}` for all ``j`` in float64; the ``P`` partial ``K×K`` matrices
are summed by torch (deterministic: no atomics). ``M`` is exactly symmetric, since entry
``(i, j)`` and ``(j, i)`` sum the same products in the same order.

Whether this beats ``J @ J.T`` (float32 cuBLAS, which reads ``J`` once but accumulates in
float32) and the engine's float64 route is for ``benchmarks/kernels.py`` to say on a GPU;
the engine keeps torch's matmul by default.
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

from .._backend import interpreted
from .._linalg import gramian as _engine_gramian
from ._launch import _on

__all__ = ["gramian", "gramian_reference"]


@triton.jit
def _gramian_kernel(
    j_ptr, out_ptr, d, stride, K: tl.constexpr, K_PAD: tl.constexpr, BLOCK: tl.constexpr
):
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    rows = tl.arange(0, K_PAD)
    offsets = tl.arange(0, BLOCK)
    row_ptrs = j_ptr + rows.to(tl.int64)[:, None] * stride
    acc = tl.zeros([K_PAD, K_PAD], dtype=tl.float64)
    for tile in range(pid, tl.cdiv(d, BLOCK), programs):
        cols = tl.cast(tile, tl.int64) * BLOCK + offsets
        in_cols = cols < d
        mask = (rows[:, None] < K) & in_cols[None, :]
        x = tl.load(row_ptrs + cols[None, :], mask=mask, other=0.0).to(tl.float64)
        row_ptr = j_ptr
        for i in tl.static_range(K):
            x_i = tl.load(row_ptr + cols, mask=in_cols, other=0.0).to(tl.float64)
            dots = tl.sum(x * x_i[None, :], axis=1)
            acc += tl.where(rows[None, :] == i, dots[:, None], 0.0)
            row_ptr += stride
    out = out_ptr + pid * K_PAD * K_PAD + rows[:, None] * K_PAD + rows[None, :]
    tl.store(out, acc)


def gramian(jacobian: Tensor, *, block: int | None = None, programs: int | None = None) -> Tensor:
    """``J Jᵀ`` (K×K float64) of a float32 ``(K, d)`` matrix, in one pass over ``J``.

    Args:
        jacobian: ``(K, d)`` float32, rows with column stride 1 (the engine's ``J``).
        block: columns per tile, a power of two (default: tiles of 2048 elements for K <= 8,
            1024 above, on a GPU; 4096 columns in the interpreter).
        programs: number of programs (default four per multiprocessor on a GPU, four in the
            interpreter; at most one per tile).
    """
    if jacobian.dim() != 2 or jacobian.dtype != torch.float32:
        raise TypeError(
            f"gramian expects a (K, d) float32 matrix, got {tuple(jacobian.shape)} "
            f"{jacobian.dtype}; use mtl_optim.engine.gramian for other dtypes"
        )
    if jacobian.stride(1) != 1:
        jacobian = jacobian.contiguous()
    k, d = jacobian.shape
    k_pad = triton.next_power_of_2(k)
    if block is None:  # tiles of 2048 (K <= 8) or 1024 elements: <= 128 registers per thread
        block = 4096 if interpreted() else max(32, (2048 if k_pad <= 8 else 1024) // k_pad)
    if block < 16 or block & (block - 1):
        raise ValueError(f"block must be a power of two >= 16, got {block}")
    tiles = triton.cdiv(d, block)
    if programs is None:
        programs = 4
        if jacobian.is_cuda:
            programs *= torch.cuda.get_device_properties(jacobian.device).multi_processor_count
    programs = max(1, min(programs, tiles))
    partials = torch.zeros(programs, k_pad, k_pad, dtype=torch.float64, device=jacobian.device)
    if d > 0 and k > 0:
        with _on(jacobian.device):
            _gramian_kernel[(programs,)](
                jacobian,
                partials,
                d,
                jacobian.stride(0),
                K=k,
                K_PAD=k_pad,
                BLOCK=block,
                num_warps=8,
            )
    return partials.sum(0)[:k, :k]


def gramian_reference(jacobian: Tensor) -> Tensor:
    """Twin of :func:`gramian`: :func:`mtl_optim.engine.gramian` (float64 ``addmm`` chunks)."""
    return _engine_gramian(jacobian)
