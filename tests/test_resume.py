"""Exact resume: checkpoint to disk, continue in a new process, bit-identical parameters."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _resume_worker import methods, uninterrupted

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
    out = tmp_path_factory.mktemp("resume")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), *sys.path])}
    for phase in ("first", "second"):
        subprocess.run(
            [sys.executable, str(HERE / "_resume_worker.py"), phase, str(out)],
            check=True,
            env=env,
            cwd=HERE,
        )
    return out


@pytest.mark.parametrize("name", sorted(methods()))
def test_resume_in_a_new_process_is_bit_identical(resumed, name):
    final = torch.load(resumed / f"{name}.final.pt")
    expected = uninterrupted(name)
    for p, q in zip(final, expected):
        assert torch.equal(p, q), name
