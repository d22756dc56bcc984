"""Benchmarks for mtl_optim, run from the repository root.

``python -m benchmarks`` is the main job: real-data training benchmarks (MultiMNIST, Census,
MultiDigits) with a results table and plots. Microbenchmarks: ``python -m benchmarks.<name>``
(``aggregators``, ``weightings``, ``step_overhead``, ``engine_strategies``, ``ddp``,
``kernels``, ``distill``).
"""
