r"""Fused AdaTask-Adagrad: K per-task sums of squares and the summed step in one pass.

For each column of a param group and each task :math:`i` (see
docs/methods/adatask.md, "Update rules"; torch's Adagrad for the options), at step :math:`k`:

.. math::
    g_i \leftarrow \pm g_i + \tfrac{\lambda}{K}\theta, \quad
    s_i \leftarrow s_i + g_i^2, \quad
    \theta \leftarrow \theta - \frac{\eta}{1 + (k-1)\,\delta}
        \sum_i \frac{g_i}{\sqrt{s_i} + \epsilon}

(:math:`\delta` = ``lr_decay``; :math:`s_i` starts at ``initial_accumulator_value``). The
decayed learning rate comes from the ``step`` tensor on the device, in float64. Bytes per
element: :math:`12K + 2s` (``s`` the parameter size).
"""

import triton
import triton.language as tl
from torch import Tensor

from .._backend import scalar
from ._launch import (
    check,
    columns,
    f64,
    next_step,
    round_to,
    run,
    split64,
    task_gradient,
)
from ._launch import state_buffer as _buffer

__all__ = ["adagrad_update"]


@triton.jit
def _adagrad_kernel(
    grads_ptr,
    grads_stride,
    params_ptr,
    table_ptr,
    programs,
    n,
    step_ptr,
    sum_ptr,
    lr_hi,
    lr_lo,
    lr_decay_hi,
    lr_decay_lo,
    eps,
    l2,
    K: tl.constexpr,
    BLOCK: tl.constexpr,
    P: tl.constexpr,
    FLAT: tl.constexpr,
    EVEN: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    L2: tl.constexpr,
):
    cols, mask, p_ptrs = columns(params_ptr, table_ptr, programs, n, BLOCK, P, FLAT, EVEN)
    step = tl.load(step_ptr).to(tl.float64)
    decayed = f64(lr_hi, lr_lo) / (1.0 + (step - 1.0) * f64(lr_decay_hi, lr_decay_lo))
    neg_clr = -(decayed.to(tl.float32))
    theta = tl.load(p_ptrs, mask=mask, other=0.0).to(tl.float32)
    update = tl.zeros([BLOCK], dtype=tl.float32)
    g_off = cols
    s_off = cols
    for _ in tl.static_range(K):
        g = task_gradient(grads_ptr + g_off, mask, theta, l2, MAXIMIZE, L2)
        acc = tl.load(sum_ptr + s_off, mask=mask, other=0.0)
        acc = acc + g * g
        tl.store(sum_ptr + s_off, acc, mask=mask)
        update += tl.div_rn(g * neg_clr, tl.sqrt_rn(acc) + eps)
        g_off += grads_stride
        s_off += n
    tl.store(p_ptrs, round_to(theta + update, P), mask=mask)


def adagrad_update(
    group: dict, grads: Tensor, params: tuple[Tensor, ...], state: dict, *, block: int | None = None
) -> None:
    """One fused AdaTask step of Adagrad for one param group, in place.

    Args:
        group: the torch param group (``lr``, ``lr_decay``, ``eps``, ``weight_decay``,
            ``initial_accumulator_value``, ``maximize``).
        grads: ``(K, n)`` float32 per-task gradients (any strides; J's column slice needs no copy).
        params: the group's shared parameters, ``n`` elements in all (float32/bf16/fp16).
        state: ``step`` and the ``(K, n)`` float32 ``sum`` buffer; the same keys and numbers
            as :func:`~mtl_optim.kernels.adagrad_update_reference`.
        block: columns per program (default :func:`default_block`).
    """
    grads, k, n = check(grads, params)
    device = grads.device
    wd = group["weight_decay"]
    step = next_step(state, device)
    acc = _buffer(state, "sum", k, n, device, group["initial_accumulator_value"])
    scalars = [*split64(scalar(group["lr"])), *split64(group["lr_decay"]), group["eps"], wd / k]
    flags = {"MAXIMIZE": bool(group["maximize"]), "L2": wd != 0}
    run(_adagrad_kernel, grads, params, step, [acc], scalars, flags, block)
