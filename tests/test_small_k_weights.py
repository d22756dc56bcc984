"""The plain-float path for small CPU Gramians (UPGrad, DualProj, MGDA, IMTL-G) against the
tensor path it replaces for K <= SMALL_K: the same weights to float64 rounding on random and
adversarial Gramians, the dual cone's KKT conditions, NaN for non-finite input, partial labels,
and which calls take which path. (Timings: ``benchmarks/small_k_weights.py``.)"""

from __future__ import annotations

import contextlib
import warnings

import numpy as np
import pytest
import torch
from conftest import F64, examples, matrices
from hypothesis import given, settings
from hypothesis import strategies as st
from test_dual_cone import assert_kkt

from mtl_optim.aggregators import IMTLG, MGDA, DualProj, UPGrad, _dual_cone, _small_k
from mtl_optim.aggregators import _imtlg as imtlg_module
from mtl_optim.aggregators import _mgda as mgda_module
from mtl_optim.aggregators._small_k import small_cpu_entries

SETTINGS = settings(max_examples=examples(60))
EPS = torch.finfo(F64).eps


@contextlib.contextmanager
def small_k(value: int):
    """Run with ``SMALL_K = value`` (0: every call takes the tensor path)."""
    saved = _small_k.SMALL_K
    _small_k.SMALL_K = value
    try:
        yield
    finally:
        _small_k.SMALL_K = saved


def both_paths(agg, gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(plain floats, tensor path)`` weights of ``agg`` for ``gram``."""
    assert gram.shape[0] <= _small_k.SMALL_K
    new = agg.weights_from_gramian(gram)
    with small_k(0):
        old = agg.weights_from_gramian(gram)
    assert new.dtype == old.dtype == F64 and new.shape == old.shape
    assert new.device == old.device == gram.device
    return new, old


def assert_same_weights(new: torch.Tensor, old: torch.Tensor, rtol: float = 1e-12) -> None:
    """Equal to ``rtol`` of the weights' scale; NaN exactly where the reference has NaN."""
    assert torch.equal(new.isnan(), old.isnan())
    scale = max(old.nan_to_num().abs().max().item(), 1e-300)
    torch.testing.assert_close(new, old, rtol=0, atol=rtol * scale, equal_nan=True)


def assert_same_direction(jacobian, new, old, rtol: float) -> None:
    """``Jᵀw`` equal to ``rtol`` of ``max|w| · max‖g_i‖`` (for non-unique weights)."""
    scale = old.abs().max().item() * jacobian.norm(dim=1).max().item()
    diff = (jacobian.T @ (new - old)).norm().item()
    assert diff <= rtol * scale, diff / scale


def bordered_condition(gram: torch.Tensor) -> float:
    """The condition number of IMTL-G's bordered system (all rows non-zero)."""
    n = gram.diagonal().sqrt()
    k = gram.shape[0]
    w = n.max() / n
    system = torch.zeros(k + 1, k + 1, dtype=F64)
    system[:k, :k] = gram / n[:, None] / n[None, :]
    system[:k, k] = -1.0
    system[k, :k] = w / w.norm()
    return torch.linalg.cond(system).item()


# ------------------------------------------------------------------------------ dual cone
@SETTINGS
@given(
    jacobian=matrices(k_min=1, k_max=8),
    cls=st.sampled_from([UPGrad, DualProj]),
    pref_seed=st.one_of(st.none(), st.integers(0, 2**32 - 1)),
)
def test_dual_cone_weights_equal_the_tensor_path(jacobian, cls, pref_seed):
    """Every rank 1..K, scales 1e-8..1e8, default or random preferences: the regularised
    Gramian is positive definite (condition number at most about 1e4), so the weights are
    unique and agree to rounding times that condition number (1e-12 of their scale for a
    well-conditioned one)."""
    k = jacobian.shape[0]
    pref = None if pref_seed is None else np.random.default_rng(pref_seed).random(k)
    agg = cls(pref)
    gram = jacobian @ jacobian.T
    new, old = both_paths(agg, gram)
    rtol = 1e-12 + 4 * torch.linalg.cond(agg.cone_gramian(gram)).item() * EPS
    assert_same_weights(new, old, rtol)
    if cls is UPGrad:  # the per-task projections too, and their KKT conditions
        with small_k(0):
            rows_old = agg.projection_weights(gram)
        rows = agg.projection_weights(gram)
        assert_same_weights(rows, rows_old, rtol)
        u = torch.diag(agg.preferences(gram))
    else:
        rows, u = new[None], agg.preferences(gram)[None]
    assert_kkt(u, rows, agg.cone_gramian(gram))


@SETTINGS
@given(jacobian=matrices(k_min=1, k_max=8), cls=st.sampled_from([UPGrad, DualProj]))
def test_unregularised_dual_cone_meets_kkt_and_gives_the_same_direction(jacobian, cls):
    """``reg_eps=0`` on a rank-deficient Gramian: the weights need not be unique, the
    projection ``Jᵀw`` is; it agrees with the tensor path's, and the KKT conditions hold."""
    agg = cls(reg_eps=0.0, norm_eps=0.0)
    gram = jacobian @ jacobian.T
    new, old = both_paths(agg, gram)
    assert torch.isfinite(new).all()
    assert_same_direction(jacobian, new, old, 1e-10)
    u = agg.preferences(gram)
    rows = agg.projection_weights(gram) if cls is UPGrad else new[None]
    assert_kkt(torch.diag(u) if cls is UPGrad else u[None], rows, agg.cone_gramian(gram))


# --------------------------------------------------------------------------- MGDA, IMTL-G
@SETTINGS
@given(
    jacobian=matrices(k_min=2, k_max=8),
    normalization=st.sampled_from(["none", "l2"]),
    exact=st.booleans(),
)
def test_mgda_weights_equal_the_numpy_solver(jacobian, normalization, exact):
    """The min-norm point ``Uᵀα`` is unique: it agrees to rounding at every rank; the weights
    agree to rounding times the KKT system's conditioning (unique for full rank)."""
    agg = MGDA(normalization, exact=exact)
    gram = jacobian @ jacobian.T
    new, old = both_paths(agg, gram)
    norms = jacobian.norm(dim=1) if normalization == "l2" else torch.ones(len(gram), dtype=F64)
    units = jacobian / norms[:, None]
    if exact or len(gram) == 2:
        assert_same_direction(units, new, old, 1e-10)
    else:  # exact=False, K > 2 stays on the NumPy path: the same numbers
        assert torch.equal(new, old)
    assert new.sum().item() == pytest.approx(1.0, abs=1e-12) and (new >= 0).all()


@SETTINGS
@given(jacobian=matrices(k_min=2, k_max=8, full_rank=True))
def test_mgda_full_rank_weights_agree_to_the_conditioning(jacobian):
    agg = MGDA()
    gram = jacobian @ jacobian.T
    new, old = both_paths(agg, gram)
    cond = torch.linalg.cond(gram).item()
    assert_same_weights(new, old, rtol=1e-12 + 1e-3 * cond * EPS)


@SETTINGS
@given(jacobian=matrices(k_min=2, k_max=8))
def test_imtlg_weights_equal_the_pseudo_inverse(jacobian):
    """Agreement to rounding times the bordered system's conditioning (where it is nearly
    singular the pseudo-inverse's cut-off decides, on the tensor path)."""
    agg = IMTLG()
    gram = jacobian @ jacobian.T
    new, old = both_paths(agg, gram)
    cond = bordered_condition(gram)
    assert_same_weights(new, old, rtol=1e-12 + 10 * cond * EPS)
    # the defining property: Mα = t·n (equal projections on the unit gradients), Σα = 1
    n = gram.diagonal().sqrt()
    t = (gram @ new) / n
    assert new.sum().item() == pytest.approx(1.0, abs=1e-9)
    if cond < 1e6:
        torch.testing.assert_close(t, t.mean().expand_as(t), rtol=1e-9, atol=1e-9 * n.max())


# ----------------------------------------------------------------------- hand-made cases
def _cases() -> dict[str, torch.Tensor]:
    g = torch.tensor([[3.0, -1.0, 2.0, 0.5]], dtype=F64)
    h = torch.tensor([[-1.0, 2.0, 0.5, 1.0]], dtype=F64)
    f = torch.tensor([[0.0, 1.0, -3.0, 2.0]], dtype=F64)
    zero = torch.zeros(1, 4, dtype=F64)
    return {
        "opposed": torch.cat([g, -g]),
        "opposed_unequal": torch.cat([g, -3 * g]),
        "parallel": torch.cat([g, 2 * g]),
        "equal": torch.cat([g, g]),
        "one_zero_row": torch.cat([g, zero]),
        "zero_row_of_three": torch.cat([g, zero, h]),
        "all_zero": torch.zeros(3, 4, dtype=F64),
        "rank_one_of_three": torch.cat([g, -2 * g, 0.5 * g]),
        "rank_two_of_four": torch.cat([g, h, g + h, g - 2 * h]),
        "conflict_three": torch.cat([g, h, f]),
        "huge": 1e150 * torch.cat([g, h, f]),
        "tiny": 1e-150 * torch.cat([g, h, f]),
        "mixed_scales": torch.cat([1e8 * g, 1e-8 * h, f]),
        "near_parallel": torch.cat([g, g + 1e-9 * h]),
        "near_opposed": torch.cat([g, -g + 1e-9 * h]),
    }


CASES = _cases()
AGGREGATORS = {
    "UPGrad": UPGrad,
    "UPGrad_noreg": lambda: UPGrad(reg_eps=0.0, norm_eps=0.0),
    "DualProj": DualProj,
    "DualProj_noreg": lambda: DualProj(reg_eps=0.0, norm_eps=0.0),
    "MGDA": MGDA,
    "MGDA_l2": lambda: MGDA("l2"),
    "MGDA_official": lambda: MGDA(exact=False),
    "IMTLG": IMTLG,
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("name", sorted(AGGREGATORS))
def test_hand_made_gramians_give_the_tensor_paths_weights(name, case):
    """Opposed, parallel, equal and zero rows, rank deficiency, 1e±150 scales: the same
    weights as the tensor path (within its own rounding), or the same direction where the
    weights are not unique (unregularised cones, MGDA on dependent rows)."""
    jacobian = CASES[case]
    agg = AGGREGATORS[name]()
    gram = jacobian @ jacobian.T
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # MGDA("l2") on a zero row
        new, old = both_paths(agg, gram)
    unique = not (
        (name.endswith("noreg") or name.startswith("MGDA"))
        and torch.linalg.matrix_rank(jacobian) < len(gram)
    )
    if unique and not case.startswith("near"):
        assert_same_weights(new, old)
    elif unique:  # nearly dependent rows: rounding times the conditioning
        assert_same_weights(new, old, rtol=1e-6)
    else:
        units = jacobian
        if name == "MGDA_l2":
            units = jacobian / jacobian.norm(dim=1).clamp_min(1e-300)[:, None]
        assert_same_direction(units, new, old, 1e-10)


@pytest.mark.parametrize("name", sorted(AGGREGATORS))
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("where", ["diagonal", "off_diagonal"])
def test_non_finite_gramian_gives_the_tensor_paths_nan(name, bad, where):
    gram = torch.tensor([[2.0, -1.0, 0.5], [-1.0, 3.0, 0.2], [0.5, 0.2, 1.0]], dtype=F64)
    i, j = (1, 1) if where == "diagonal" else (0, 2)
    gram[i, j] = gram[j, i] = bad
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        new, old = both_paths(AGGREGATORS[name](), gram)
    assert torch.equal(new.isnan(), old.isnan())
    torch.testing.assert_close(new, old, rtol=1e-12, atol=0, equal_nan=True)


# ------------------------------------------------------------------------ the dispatch
def test_small_cpu_gramians_take_the_plain_float_path(monkeypatch):
    """K <= SMALL_K on the CPU never reaches the tensor solvers; K > SMALL_K does."""

    def refuse(*args, **kwargs):
        raise AssertionError("the tensor path ran")

    monkeypatch.setattr(_dual_cone, "dual_cone_weights", refuse)
    monkeypatch.setattr("mtl_optim.aggregators._upgrad.dual_cone_weights", refuse)
    monkeypatch.setattr("mtl_optim.aggregators._dualproj.dual_cone_weights", refuse)
    monkeypatch.setattr(mgda_module, "_min_norm_weights", refuse)
    monkeypatch.setattr(imtlg_module, "imtlg_weights", refuse)
    rng = np.random.default_rng(0)
    for k in range(1, _small_k.SMALL_K + 1):
        j = torch.from_numpy(rng.standard_normal((k, 12)))
        for dtype in (torch.float64, torch.float32):
            gram = (j @ j.T).to(dtype)
            for agg in (UPGrad(), DualProj(), MGDA(), IMTLG()):
                w = agg.weights_from_gramian(gram)
                assert w.dtype == F64 and w.shape == (k,) and w.device.type == "cpu"
    big = torch.eye(_small_k.SMALL_K + 1, dtype=F64)
    for agg in (UPGrad(), DualProj(), MGDA(), IMTLG()):
        with pytest.raises(AssertionError, match="tensor path ran"):
            agg.weights_from_gramian(big)


def test_float32_gramian_is_read_exactly_as_float64():
    j = torch.from_numpy(np.random.default_rng(1).standard_normal((4, 7))).float()
    gram = j @ j.T
    for agg in (UPGrad(), DualProj(), MGDA(), IMTLG()):
        new, old = both_paths(agg, gram)
        assert_same_weights(new, old)


def test_only_plain_cpu_tensors_without_grad_are_read_into_floats():
    gram = torch.eye(3, dtype=F64)
    assert small_cpu_entries(gram) == [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]
    assert small_cpu_entries(torch.eye(3, dtype=F64, device="meta")) is None  # an accelerator
    assert small_cpu_entries(gram.clone().requires_grad_(True)) is None
    assert small_cpu_entries(gram.to_sparse()) is None
    assert small_cpu_entries(gram.half()) is None
    assert small_cpu_entries(torch.eye(_small_k.SMALL_K + 1, dtype=F64)) is None
    assert small_cpu_entries(torch.zeros(0, 0, dtype=F64)) is None


def test_a_gramian_requiring_grad_keeps_the_tensor_path():
    j = torch.tensor([[1.0, 0.5], [-1.0, 0.2]], dtype=F64)
    gram = (j @ j.T).requires_grad_(True)
    with small_k(0):
        old = UPGrad().weights_from_gramian(gram)
    assert torch.equal(UPGrad().weights_from_gramian(gram), old)


# ----------------------------------------------------------------------- partial labels
@pytest.mark.parametrize("cls", [UPGrad, DualProj])
def test_partial_labels_read_the_preferences_at_the_present_tasks(cls):
    j = torch.from_numpy(np.random.default_rng(2).standard_normal((3, 5)))
    j[1] = -j[0] + 0.2 * j[1]
    gram = j @ j.T
    agg = cls([0.5, 0.1, 0.3, 0.1, 0.9])
    agg.present, agg.all_tasks = torch.tensor([0, 2, 4]), 5
    new, old = both_paths(agg, gram)
    assert_same_weights(new, old)
    reference = cls([0.5, 0.3, 0.9]).weights_from_gramian(gram)  # the m-task problem
    assert_same_weights(new, reference)
    default = cls()
    default.present, default.all_tasks = torch.tensor([1, 3, 4]), 5
    assert_same_weights(*both_paths(default, gram))
    agg.present, agg.all_tasks = torch.tensor([0, 1, 3]), 4  # pref_vector does not match K
    with pytest.raises(ValueError, match="pref_vector has 5 entries but there are 4 tasks"):
        agg.weights_from_gramian(gram)


def test_mgda_loss_normalisation_with_a_zero_loss_warns_once_and_agrees():
    j = torch.tensor([[1.0, 2.0, 0.0], [-1.0, 0.5, 1.0], [0.3, -2.0, 1.0]], dtype=F64)
    gram = j @ j.T
    agg = MGDA("loss+")
    agg.set_losses(torch.tensor([0.5, 0.0, 2.0], dtype=F64))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        new = agg.weights_from_gramian(gram)
    assert [str(w.message) for w in caught] == [
        "MGDA(normalization='loss+'): a normaliser (gradient norm or loss) is zero or "
        "negative; it is replaced by eps"
    ]
    assert caught[0].filename == __file__  # points at the caller
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with small_k(0):
            old = agg.weights_from_gramian(gram)
    assert_same_weights(new, old)
    agg.present, agg.all_tasks = torch.tensor([0, 2]), 3
    sub = torch.tensor([[1.0, 0.2], [0.2, 3.0]], dtype=F64)
    assert_same_weights(*both_paths(agg, sub))
