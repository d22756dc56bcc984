"""Benchmarks for mtl_optim, run from the repository root.

``python -m benchmarks`` is the main job: real-data training benchmarks (MultiDigits and
MultiMNIST; Census on demand) with a results table, plots and an imbalance page, written to
``benchmarks/out/``. Microbenchmarks: ``python -m benchmarks.<name>``
(``aggregators``, ``weightings``, ``step_overhead``, ``engine_strategies``, ``ddp``,
``kernels``, ``distill``).
"""
