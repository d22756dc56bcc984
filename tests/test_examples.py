"""The examples run (each is skipped when its framework is not installed)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_lightning_manual_optimization_example_trains():
    pytest.importorskip("lightning", reason="Lightning is not installed")
    spec = importlib.util.spec_from_file_location(
        "lightning_example", EXAMPLES / "lightning_manual_optimization.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["lightning_example"] = module
    spec.loader.exec_module(module)
    model = module.main(max_epochs=2)
    opt = model.optimizers().optimizer
    assert opt.num_tasks == 2 and opt.last_weights.shape == (2,)
    assert all(torch.isfinite(p).all() for p in model.parameters())
