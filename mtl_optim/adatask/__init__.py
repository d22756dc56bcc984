r"""AdaTask: task-wise adaptive optimizer state (Yang et al., AAAI 2023, arXiv 2211.15055).

For every shared parameter each task ``i`` keeps its own adaptive accumulators, fed only by its
own gradient :math:`g_i = \nabla_{\theta_s} L_i`; the shared update is the sum of the K
per-task adaptive steps. Adam:

.. math::
    m_i \leftarrow \beta_1 m_i + (1-\beta_1) g_i, \qquad
    v_i \leftarrow \beta_2 v_i + (1-\beta_2) g_i^2, \\
    \theta_s \leftarrow \theta_s - \sum_i \frac{\eta}{1-\beta_1^k}\,
        \frac{m_i}{\sqrt{v_i}/\sqrt{1-\beta_2^k} + \epsilon}.

RMSprop: :math:`v_i \leftarrow \rho v_i + (1-\rho) g_i^2`; Adagrad:
:math:`v_i \leftarrow v_i + g_i^2`; both then
:math:`\theta_s \leftarrow \theta_s - \eta \sum_i g_i / (\sqrt{v_i} + \epsilon)`.
Task-specific parameters get the plain base rule on :math:`\nabla \sum_i L_i`.

Our decisions where the official code is silent or wrong (see docs/methods/adatask.md, "Decisions"):

* weight decay is applied once per step: decoupled (AdamW) as :math:`\theta(1-\eta\lambda)`;
  coupled (L2) as :math:`\lambda\theta/K` added to every task's gradient, so the tasks'
  L2 terms sum to one :math:`\lambda\theta`;
* ``amsgrad``, ``maximize``, RMSprop ``momentum``/``centered`` and Adagrad ``lr_decay`` /
  ``initial_accumulator_value`` are honoured per task; ``capturable`` and ``differentiable``
  raise;
* per-group ``lr``, betas and ``eps`` are honoured; a task that does not reach a shared
  parameter contributes a zero gradient (its moments still decay);
* no 1/K factor: with K identical tasks the shared step is K Adam steps, as in the paper;
* partial labels (``None`` for a task in ``opt.backward``): ``missing="freeze"`` (default)
  leaves the missing task's moments and its own step counter :math:`k_i` untouched
  (``state["step"]`` becomes a ``(K,)`` tensor at the first missing task), so task
  :math:`i`'s moments are the base rule run on the batches where it was present, with
  :math:`1-\beta^{k_i}` bias corrections; L2 weight decay is then shared among the present
  tasks. ``missing="zero"`` feeds the task a zero gradient instead (moments decay, one
  counter). See docs/methods/partial-labels.md.

With K = 1 every rule performs exactly torch's single-tensor operations, so AdaTask equals its base
bit for bit. With an ``aggregator``, task ``i``'s moments receive row ``i`` of
``aggregator.transform(J)`` (e.g. the PCGrad-projected gradient; see
docs/methods/adatask.md, "With an aggregator").

``AdaTask(..., fused=...)`` chooses how the shared update runs: ``None`` (default) uses the
Triton kernels of :mod:`mtl_optim.kernels` (one pass per param group: the K gradients, the
per-task moments, the summed step and the parameter write) when Triton is installed and the
shared parameters are float32/bf16/fp16 CUDA tensors, else the vectorised torch rules below;
``True`` requires the kernels (CUDA, or ``TRITON_INTERPRET=1`` to run them on CPU through
Triton's interpreter) and raises otherwise; ``False`` always uses torch. Both compute the same
numbers up to float32 rounding (see :mod:`mtl_optim.kernels`' twins; bf16/fp16 parameters are
rounded once by the kernels, twice by the torch path). While an observer is attached (e.g.
:class:`~mtl_optim.diagnostics.TaskDominance`) the torch rules run, since only they form
the per-task steps. ``fused`` is a property of this optimizer, never handed to the base (torch's
own Adam ``fused`` flag, per param group, still drives the task-specific parameters' update),
and not saved in ``state_dict``: a checkpoint written with either path loads into the other.

Per-task state lives in one ``(K, n)`` buffer per key and param group, in J's column order;
``state_dict()["mtl"]["task_state"]`` holds it per group index, and :meth:`AdaTask.task_state`
gives the per-parameter views.
"""

from ._optimizer import AdaTask

__all__ = ["AdaTask"]
