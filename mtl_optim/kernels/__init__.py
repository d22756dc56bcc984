"""Triton kernels for mtl_optim, each with a pure-torch twin that computes the same numbers.

* :func:`adam_update`, :func:`rmsprop_update`, :func:`adagrad_update`: one fused AdaTask step
  for one param group (K per-task moment updates, the summed step and the parameter write in
  one pass); twins ``*_reference`` apply the same rules with plain tensor operations.
* :func:`gramian`: ``J Jᵀ`` of the engine's ``(K, d)`` per-task gradients, accumulated in
  float64; twin :func:`gramian_reference` (the engine's float64 ``J Jᵀ``).

Importing this package needs Triton (``pip install 'mtl_optim[kernels]'``); it runs on CUDA
tensors, or on CPU tensors through Triton's interpreter when ``TRITON_INTERPRET=1`` is set
before the import. :class:`mtl_optim.AdaTask` selects the update kernels with ``fused=``.
"""

from .._backend import interpreted
from ._adagrad import adagrad_update
from ._adam import adam_update
from ._gramian import gramian, gramian_reference
from ._launch import default_block
from ._reference import adagrad_update_reference, adam_update_reference, rmsprop_update_reference
from ._rmsprop import rmsprop_update

__all__ = [
    "adagrad_update",
    "adagrad_update_reference",
    "adam_update",
    "adam_update_reference",
    "default_block",
    "gramian",
    "gramian_reference",
    "interpreted",
    "rmsprop_update",
    "rmsprop_update_reference",
]
