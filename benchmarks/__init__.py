"""Benchmarks for mtl_optim; run each as ``python -m benchmarks.<name>`` from the repo root."""
