r"""Fused AdaTask-RMSprop: K per-task square averages and the summed step in one pass.

For each column of a param group and each task :math:`i` (see
docs/methods/adatask.md, "Update rules"; torch's RMSprop for the options):

.. math::
    g_i \leftarrow \pm g_i + \tfrac{\lambda}{K}\theta, \quad
    s_i \leftarrow \alpha s_i + (1-\alpha) g_i^2, \quad
    a_i = \sqrt{s_i - \bar g_i^2} + \epsilon\ \ (\text{centered: }
        \bar g_i \leftarrow \mathrm{lerp}(\bar g_i, g_i, 1-\alpha)), \
    a_i = \sqrt{s_i} + \epsilon\ \text{otherwise}, \\
    \theta \leftarrow \theta - \eta \sum_i g_i / a_i, \quad\text{or with momentum } \mu:\quad
    b_i \leftarrow \mu b_i + g_i / a_i, \ \theta \leftarrow \theta - \eta \sum_i b_i.

Bytes per element: :math:`12K + 2s` (gradient, square average read and written; ``s`` the
parameter size), plus :math:`8K` each for ``centered`` and ``momentum``.
"""

import triton
import triton.language as tl
from torch import Tensor

from .._backend import scalar
from ._launch import (
    check,
    columns,
    lerp,
    lerp_weights,
    next_step,
    round_to,
    run,
    task_gradient,
)
from ._launch import state_buffer as _buffer

__all__ = ["rmsprop_update"]


@triton.jit
def _rmsprop_kernel(
    grads_ptr,
    grads_stride,
    params_ptr,
    table_ptr,
    programs,
    n,
    step_ptr,
    square_avg_ptr,
    grad_avg_ptr,
    momentum_buffer_ptr,
    neg_lr,
    alpha,
    one_minus_alpha,
    weight_minus_one,
    eps,
    l2,
    momentum,
    K: tl.constexpr,
    BLOCK: tl.constexpr,
    P: tl.constexpr,
    FLAT: tl.constexpr,
    EVEN: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    L2: tl.constexpr,
    CENTERED: tl.constexpr,
    MOMENTUM: tl.constexpr,
    LERP_HIGH: tl.constexpr,
):
    cols, mask, p_ptrs = columns(params_ptr, table_ptr, programs, n, BLOCK, P, FLAT, EVEN)
    theta = tl.load(p_ptrs, mask=mask, other=0.0).to(tl.float32)
    update = tl.zeros([BLOCK], dtype=tl.float32)
    g_off = cols
    s_off = cols
    for _ in tl.static_range(K):
        g = task_gradient(grads_ptr + g_off, mask, theta, l2, MAXIMIZE, L2)
        sq = tl.load(square_avg_ptr + s_off, mask=mask, other=0.0)
        sq = sq * alpha + one_minus_alpha * g * g
        tl.store(square_avg_ptr + s_off, sq, mask=mask)
        if CENTERED:
            ga = tl.load(grad_avg_ptr + s_off, mask=mask, other=0.0)
            ga = lerp(ga, g, one_minus_alpha, weight_minus_one, LERP_HIGH)
            tl.store(grad_avg_ptr + s_off, ga, mask=mask)
            avg = tl.sqrt_rn(sq + -1.0 * ga * ga) + eps
        else:
            avg = tl.sqrt_rn(sq) + eps
        if MOMENTUM:
            buf = tl.load(momentum_buffer_ptr + s_off, mask=mask, other=0.0)
            buf = buf * momentum + tl.div_rn(g, avg)
            tl.store(momentum_buffer_ptr + s_off, buf, mask=mask)
            update += buf
        else:
            update += tl.div_rn(g * neg_lr, avg)
        g_off += grads_stride
        s_off += n
    if MOMENTUM:
        theta = theta + neg_lr * update
    else:
        theta = theta + update
    tl.store(p_ptrs, round_to(theta, P), mask=mask)


def rmsprop_update(
    group: dict, grads: Tensor, params: tuple[Tensor, ...], state: dict, *, block: int | None = None
) -> None:
    """One fused AdaTask step of RMSprop for one param group, in place.

    Args:
        group: the torch param group (``lr``, ``alpha``, ``eps``, ``weight_decay``,
            ``momentum``, ``centered``, ``maximize``).
        grads: ``(K, n)`` float32 per-task gradients (any strides; J's column slice needs no copy).
        params: the group's shared parameters, ``n`` elements in all (float32/bf16/fp16).
        state: ``step`` and the ``(K, n)`` float32 ``square_avg`` (``grad_avg``,
            ``momentum_buffer``) buffers; the same keys and numbers as
            :func:`~mtl_optim.kernels.rmsprop_update_reference`.
        block: columns per program (default :func:`default_block`).
    """
    grads, k, n = check(grads, params)
    device = grads.device
    alpha, wd, momentum = group["alpha"], group["weight_decay"], group["momentum"]
    step = next_step(state, device)
    square_avg = _buffer(state, "square_avg", k, n, device)
    grad_avg = _buffer(state, "grad_avg", k, n, device) if group["centered"] else square_avg
    buf = _buffer(state, "momentum_buffer", k, n, device) if momentum > 0 else square_avg
    weight = 1 - alpha
    scalars = [
        -scalar(group["lr"]),
        alpha,
        *lerp_weights(weight),
        group["eps"],
        wd / k,
        momentum,
    ]
    flags = {
        "MAXIMIZE": bool(group["maximize"]),
        "L2": wd != 0,
        "CENTERED": bool(group["centered"]),
        "MOMENTUM": momentum > 0,
        "LERP_HIGH": abs(weight) >= 0.5,
    }
    run(_rmsprop_kernel, grads, params, step, [square_avg, grad_avg, buf], scalars, flags, block)
