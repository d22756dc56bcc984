r"""The GPU suite: kernels, sync-free solvers and step time on one CUDA device, in one command.

    python -m benchmarks.gpu                    # -> benchmarks/results/gpu/*.md
    python -m benchmarks.gpu --quick --out DIR  # a subset of the sizes, tables under DIR

Five sections, each written to its own Markdown table as soon as it is done (device name,
driver, CUDA, torch/triton versions, sizes and date in every header), so a run cut short still
leaves what it finished:

1. ``01-correctness.md``: the kernel tests (``tests/test_kernels.py`` in a subprocess, compiled
   on the GPU, not interpreted) and a short training run of every exported aggregator and
   weighting and of AdaTask on each base, on CUDA against the same run on the CPU (float64
   and float32; tolerance from the dtype).
2. ``02-adatask-bandwidth.md``: one fused AdaTask-Adam step against a device-to-device copy of
   the same bytes, AdaTask's torch path and a per-task loop of ``torch.optim.Adam(fused=True)``,
   for K in {2, 4, 8, 16}, n in {1e6, 1e7, 1e8} parameters, float32 and bf16.
3. ``03-host-syncs.md``: one full training step per aggregator, weighting and AdaTask base
   under ``torch.cuda.set_sync_debug_mode``: every host sync, where and why.
4. ``04-step-time-torchjd.md``: ours against TorchJD (``mtl_backward`` + ``jac_to_grad``,
   and its autogram ``Engine``) on an MLP, a conv net and a transformer block; the Gramian
   route against the Jacobian route (time and peak memory).
5. ``05-gramian.md``: the Triton Gramian kernel against the float64 torch routes.

``00-summary.md`` lists each section's status and the targets (fused AdaTask >= 80 % of the
copy's bandwidth at n >= 1e7 and >= 3x the per-task loop; <= 1 host sync per step; our step
no slower than TorchJD's). A global time guard (``--budget`` seconds, default 420) skips the
remaining work and says so in the tables.

Without CUDA the suite runs what it can (``--quick``: the torch paths, the method runs in
float32 against float64, the torch-path timings, TorchJD on the CPU if installed) and marks
the CUDA-only parts as skipped; ``tests/test_gpu_suite.py`` runs that part in CI.

**On a lent GPU machine** (Python 3.12, torch 2.11, triton 3.6, pytest, hypothesis and
pytest-xdist; no TorchJD, no package index): first, on the development machine,
``bash benchmarks/gpu/prepare_wheels.sh`` puts the wheels of TorchJD 0.18.0 and its QP solver
(qpsolvers, quadprog; under 1 MiB) into ``.whl/``, which git ignores. Then one device command
that carries ``.whl`` (timeout 540 s: the suite's own guard stops it after 420 s)::

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit; \
    mkdir -p $OUT/gpu; set -o pipefail; \
    PYTHONUNBUFFERED=1 python3 -m benchmarks.gpu --out $OUT/gpu 2>&1 | tee $OUT/gpu/log.txt

It writes seven files under ``$OUT/gpu`` (six tables and the log); copy the returned
``gpu/*.md`` into ``benchmarks/results/gpu/`` and commit them. ``--sections 2,4`` reruns some
sections only (with a smaller ``--budget``).
"""
