"""DB-MTL: log objectives, the averaged rows rescaled to the largest norm, one step per optimizer
step, guards and state.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import (
    F64,
    J_GOLDEN,
    examples,
    jacobian,
    leaf,
    matrices,
    t,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from mtl_optim.weighting import DBMTL

SETTINGS = settings(max_examples=examples(40))


SQ18, SQ38 = math.sqrt(18.0), math.sqrt(38.0)  # the row norms of J_GOLDEN


# --- DB-MTL ------------------------------------------------------------------------------
def test_dbmtl_log_objectives_ema_and_max_norm_rescaling_by_hand():
    db = DBMTL()  # beta = 0.9, beta_sigma = 0
    o = db(leaf(2.0, 0.5))
    torch.testing.assert_close(o.detach(), torch.log(t(2.0, 0.5)))
    torch.testing.assert_close(db.weights, t(1.0, 1.0))
    torch.testing.assert_close(jacobian(db, t(2.0, 0.5)), torch.diag(t(0.5, 2.0)))
    # step 1: ĝ = 0.1 J; both rows rescaled to the larger norm 0.1√38
    out = db.observe(J_GOLDEN)
    torch.testing.assert_close(out, 0.1 * torch.stack([J_GOLDEN[0] * SQ38 / SQ18, J_GOLDEN[1]]))
    torch.testing.assert_close(db.scales, t(SQ38 / SQ18, 1.0))
    db.after_step()
    assert db.steps == 1
    # step 2: ĝ = 0.9 ĝ_1 + 0.1 J_2
    j2 = t(1.0, 0.0, 0.0, 0.0, 2.0, 0.0).view(2, 3)
    ema = 0.09 * J_GOLDEN + 0.1 * j2  # rows (-0.26, .09, .09), (.54, .29, .09)
    n = torch.linalg.vector_norm(ema, dim=1)
    out = db.observe(j2)
    torch.testing.assert_close(out, ema * (n.max() / n)[:, None])
    torch.testing.assert_close(torch.linalg.vector_norm(out, dim=1), n.max().expand(2))


def test_dbmtl_beta_decays_with_sigma_and_advances_once_per_step():
    db = DBMTL(beta=0.5, beta_sigma=0.5)
    j = J_GOLDEN
    db.observe(j)
    db.observe(2 * j)  # a second backward in the same window replaces the first average
    db.after_step()
    torch.testing.assert_close(db.average, 0.5 * 2 * j)  # β_1 = 0.5
    db.observe(5 * j)  # a skipped step: no after_step, nothing committed
    db.observe(torch.zeros_like(j))
    db.after_step()
    db.after_step()  # a step without backward changes nothing
    assert db.steps == 2
    # β_2 = 0.5/√2 applied to the committed average j (the 5 j window was dropped)
    torch.testing.assert_close(db.average, 0.5 / math.sqrt(2) * j)
    half = J_GOLDEN * t(0.0, 1.0)[:, None]  # a zero row stays zero, the other keeps its norm
    torch.testing.assert_close(DBMTL().observe(half), 0.1 * half)
    with pytest.raises(ValueError, match="shape"):
        db.observe(torch.zeros(2, 4, dtype=F64))


@SETTINGS
@given(j=matrices(exponent=8.0), beta=st.floats(0.0, 0.99))
def test_dbmtl_rows_have_the_max_norm_and_keep_their_directions(j, beta):
    db = DBMTL(beta=beta)
    out = db.observe(j)
    ema = (1 - beta) * j
    norms = torch.linalg.vector_norm(ema, dim=1)
    torch.testing.assert_close(
        torch.linalg.vector_norm(out, dim=1), norms.max().expand_as(norms), rtol=1e-12, atol=0
    )
    unit = ema / norms[:, None]  # every row a positive multiple of its average
    torch.testing.assert_close(out / norms.max(), unit, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(DBMTL(beta=beta).observe(3.0 * j), 3.0 * out, rtol=1e-12, atol=0)


def test_dbmtl_guards_state_and_repr():
    for kwargs, match in [
        ({"beta": 1.0}, "beta"),
        ({"beta": -0.1}, "beta"),
        ({"beta_sigma": -1.0}, "beta_sigma"),
        ({"eps": 0.0}, "eps"),
    ]:
        with pytest.raises(ValueError, match=match):
            DBMTL(**kwargs)
    db = DBMTL()
    with pytest.raises(ValueError, match=">= 0"):
        db(leaf(1.0, -1.0))
    db.observe(J_GOLDEN)
    db.after_step()
    restored = DBMTL()
    restored.load_state_dict(db.state_dict())
    assert restored.steps == 1
    j2 = J_GOLDEN.flip(0)
    torch.testing.assert_close(restored.observe(j2), db.observe(j2), rtol=0, atol=0)
    with pytest.raises(ValueError, match="average"):
        restored.load_state_dict({})
    assert repr(DBMTL()) == "DBMTL(beta=0.9, beta_sigma=0.0, eps=1e-08)"
