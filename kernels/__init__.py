"""Triton kernels, shipped as ``mtl_optim.kernels`` (filled by the kernel work)."""
