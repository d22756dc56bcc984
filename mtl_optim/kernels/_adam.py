r"""Fused AdaTask-Adam/AdamW: K per-task moment updates and the summed step in one pass.

For each column of a param group and each task :math:`i = 1..K` (Yang et al., AAAI 2023, arXiv
2211.15055, see docs/methods/adatask.md, "Update rules"; torch's Adam for the details):

.. math::
    g_i \leftarrow \pm g_i\ (\text{maximize}) + \tfrac{\lambda}{K}\theta\ (\text{L2}), \quad
    m_i \leftarrow \mathrm{lerp}(m_i, g_i, 1-\beta_1), \quad
    v_i \leftarrow \beta_2 v_i + (1-\beta_2) g_i^2, \quad
    \hat v_i = \max(\hat v_i, v_i)\ (\text{amsgrad}), \\
    \theta \leftarrow \theta\,(1-\eta\lambda)\ (\text{AdamW})
        - \sum_i \frac{\eta}{1-\beta_1^k}\,
        \frac{m_i}{\sqrt{v_i}/\sqrt{1-\beta_2^k} + \epsilon}.

One program reads the K gradients, reads and writes the 2K (3K with amsgrad) moments and
reads and writes the parameter once: :math:`20K + 2s` bytes per element for Adam (4 for the
gradient, 8 + 8 for the moments per task; :math:`s` = parameter size), :math:`28K + 2s`
with amsgrad. The bias corrections come from the ``step`` tensor on the device, in float64,
so no step synchronises with the host. Parameters are updated in float32 and rounded once
to their dtype (the torch path rounds the decay and the update separately).
"""

import triton
import triton.language as tl
from torch import Tensor

from .._backend import scalar
from ._launch import (
    check,
    columns,
    f64,
    lerp,
    lerp_weights,
    next_step,
    pow_step,
    round_to,
    run,
    split64,
    task_gradient,
)
from ._launch import state_buffer as _buffer

__all__ = ["adam_update"]


@triton.jit
def _adam_kernel(
    grads_ptr,
    grads_stride,
    params_ptr,
    table_ptr,
    programs,
    n,
    step_ptr,
    exp_avg_ptr,
    exp_avg_sq_ptr,
    max_exp_avg_sq_ptr,
    lr_hi,
    lr_lo,
    beta1_hi,
    beta1_lo,
    beta2_hi,
    beta2_lo,
    weight,
    weight_minus_one,
    beta2,
    one_minus_beta2,
    eps,
    l2,
    decay,
    K: tl.constexpr,
    BLOCK: tl.constexpr,
    P: tl.constexpr,
    FLAT: tl.constexpr,
    EVEN: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    L2: tl.constexpr,
    DECOUPLED: tl.constexpr,
    AMSGRAD: tl.constexpr,
    LERP_HIGH: tl.constexpr,
):
    cols, mask, p_ptrs = columns(params_ptr, table_ptr, programs, n, BLOCK, P, FLAT, EVEN)
    step = tl.load(step_ptr)
    bias1 = 1.0 - pow_step(f64(beta1_hi, beta1_lo), step)
    bias2 = 1.0 - pow_step(f64(beta2_hi, beta2_lo), step)
    neg_step_size = -((f64(lr_hi, lr_lo) / bias1).to(tl.float32))
    bias2_sqrt = tl.sqrt(bias2).to(tl.float32)

    theta = tl.load(p_ptrs, mask=mask, other=0.0).to(tl.float32)
    if DECOUPLED:
        theta = theta * decay
    update = tl.zeros([BLOCK], dtype=tl.float32)
    g_off = cols
    s_off = cols
    for _ in tl.static_range(K):
        g = task_gradient(grads_ptr + g_off, mask, theta, l2, MAXIMIZE, L2)
        m = tl.load(exp_avg_ptr + s_off, mask=mask, other=0.0)
        v = tl.load(exp_avg_sq_ptr + s_off, mask=mask, other=0.0)
        m = lerp(m, g, weight, weight_minus_one, LERP_HIGH)
        v = v * beta2 + one_minus_beta2 * g * g
        tl.store(exp_avg_ptr + s_off, m, mask=mask)
        tl.store(exp_avg_sq_ptr + s_off, v, mask=mask)
        if AMSGRAD:
            v_max = tl.load(max_exp_avg_sq_ptr + s_off, mask=mask, other=0.0)
            v = tl.maximum(v_max, v, propagate_nan=tl.PropagateNan.ALL)
            tl.store(max_exp_avg_sq_ptr + s_off, v, mask=mask)
        denom = tl.div_rn(tl.sqrt_rn(v), bias2_sqrt) + eps
        update += tl.div_rn(m * neg_step_size, denom)
        g_off += grads_stride
        s_off += n
    tl.store(p_ptrs, round_to(theta + update, P), mask=mask)


def adam_update(
    group: dict, grads: Tensor, params: tuple[Tensor, ...], state: dict, *, block: int | None = None
) -> None:
    """One fused AdaTask step of Adam/AdamW for one param group, in place.

    Args:
        group: the torch param group (``lr``, ``betas``, ``eps``, ``weight_decay``,
            ``amsgrad``, ``maximize`` and, for AdamW, ``decoupled_weight_decay``).
        grads: ``(K, n)`` float32 per-task gradients (any strides; J's column slice needs no copy).
        params: the group's shared parameters, ``n`` elements in all (float32/bf16/fp16).
        state: ``step`` and the ``(K, n)`` float32 ``exp_avg``, ``exp_avg_sq`` (and
            ``max_exp_avg_sq``) buffers, created on the first call; the same keys and numbers
            as :func:`~mtl_optim.kernels.adam_update_reference`.
        block: columns per program (default :func:`default_block`).
    """
    grads, k, n = check(grads, params)
    device = grads.device
    beta1, beta2 = (scalar(b) for b in group["betas"])
    lr, wd = scalar(group["lr"]), group["weight_decay"]
    decoupled = wd != 0 and group.get("decoupled_weight_decay", False)
    step = next_step(state, device)
    exp_avg = _buffer(state, "exp_avg", k, n, device)
    exp_avg_sq = _buffer(state, "exp_avg_sq", k, n, device)
    max_sq = _buffer(state, "max_exp_avg_sq", k, n, device) if group["amsgrad"] else exp_avg_sq
    weight = 1 - beta1
    scalars = [
        *split64(lr),
        *split64(beta1),
        *split64(beta2),
        *lerp_weights(weight),
        beta2,
        1 - beta2,
        group["eps"],
        wd / k,
        1 - lr * wd,
    ]
    flags = {
        "MAXIMIZE": bool(group["maximize"]),
        "L2": wd != 0 and not decoupled,
        "DECOUPLED": bool(decoupled),
        "AMSGRAD": bool(group["amsgrad"]),
        "LERP_HIGH": abs(weight) >= 0.5,
    }
    run(_adam_kernel, grads, params, step, [exp_avg, exp_avg_sq, max_sq], scalars, flags, block)
