"""Distillation modules: AdaptorDistillation, UniversalRepresentationLoss, SCD.

The decisions tested are in docs/methods/distillation.md.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import examples
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn import functional as F

import mtl_optim
from mtl_optim.distill import (
    AdaptorDistillation,
    SequentialCooperativeDistillation,
    UniversalRepresentationLoss,
)
from mtl_optim.distill._adaptor import _ChannelAdaptor
from mtl_optim.distill._universal import _distill_kl, _rbf_cka

F64 = torch.float64


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


class ConvTeacher(nn.Module):
    """Two feature levels: a conv map (N, 3, H, W) with BatchNorm and a pooled (N, 3) vector."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        self.calls += 1
        h = torch.relu(self.bn(self.conv(x)))
        return [h, h.mean((2, 3))]


class ConvStudent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        h = torch.relu(self.conv(x))
        return [h, h.mean((2, 3))]


# --- AdaptorDistillation ------------------------------------------------------------------
def _reference_kd(kd: AdaptorDistillation, student, teachers, eps: float) -> list[float]:
    """λ_t Σ_l mean over n and locations of ‖â − t̂‖², location by location."""
    out = []
    for t, levels in enumerate(teachers):
        total = 0.0
        for lvl, (f, ft) in enumerate(zip(student, levels)):
            w = kd.adaptors[t][lvl].weights[0].detach().numpy()
            fs, ft = f.numpy(), ft.numpy()
            if fs.ndim == 2:
                fs, ft = fs[:, :, None, None], ft[:, :, None, None]
            acc, count = 0.0, 0
            for n in range(fs.shape[0]):
                for i in range(fs.shape[2]):
                    for j in range(fs.shape[3]):
                        a = w @ fs[n, :, i, j]
                        a = a / math.sqrt(a @ a + eps)
                        b = ft[n, :, i, j] / math.sqrt(ft[n, :, i, j] @ ft[n, :, i, j] + eps)
                        acc += float((a - b) @ (a - b))
                        count += 1
            total += acc / count
        out.append(kd.weights[t] * total)
    return out


def test_adaptor_distillation_matches_the_formula_conv_and_flat_levels():
    kd = AdaptorDistillation(None, channels=[(4, 3), 5], num_tasks=2, weights=(0.5, 2.0)).double()
    student = [randn(2, 4, 3, 2, seed=1), randn(2, 5, seed=2)]
    teachers = [[randn(2, 3, 3, 2, seed=3 + t), randn(2, 5, seed=5 + t)] for t in range(2)]
    got = kd(student, teacher_outputs=teachers)
    assert got.shape == (2,)
    torch.testing.assert_close(
        got, torch.tensor(_reference_kd(kd, student, teachers, 1e-6), dtype=F64)
    )
    # a mapping of task -> features and tasks= give the same per-task values
    only = kd(student, teacher_outputs={1: teachers[1]}, tasks=[1])
    torch.testing.assert_close(only, torch.stack([torch.zeros((), dtype=F64), got[1]]))


def test_adaptor_distillation_golden_value():
    # identity adaptor: student (3, 4) -> (0.6, 0.8); teacher (0, 1): ‖(0.6, -0.2)‖² = 0.4
    kd = AdaptorDistillation(None, channels=[2], num_tasks=1, weights=(2.0,), eps=0.0).double()
    with torch.no_grad():
        kd.adaptors[0][0].weights[0].copy_(torch.eye(2))
    got = kd(torch.tensor([[3.0, 4.0]], dtype=F64), teacher_outputs=[torch.tensor([[0.0, 1.0]])])
    torch.testing.assert_close(got, torch.tensor([0.8], dtype=F64))
    kd.eps = 1e-6  # the official eps sits inside the square root
    got = kd(torch.tensor([[3.0, 4.0]], dtype=F64), teacher_outputs=[torch.tensor([[0.0, 1.0]])])
    a = torch.tensor([3.0, 4.0], dtype=F64) / math.sqrt(25 + 1e-6)
    b = torch.tensor([0.0, 1.0], dtype=F64) / math.sqrt(1 + 1e-6)
    torch.testing.assert_close(got, 2 * ((a - b) ** 2).sum().reshape(1))


def test_gradients_reach_student_and_adaptors_not_teachers_which_stay_in_eval():
    torch.manual_seed(0)
    student, teachers = ConvStudent(), [ConvTeacher(), ConvTeacher()]
    for m in teachers:
        m.train()
        m.bn.running_mean.fill_(0.5)
    kd = AdaptorDistillation(teachers, channels=[(4, 3), (4, 3)], weights=(1.0, 2.0))
    x = torch.randn(4, 2, 5, 5)
    out = kd(student(x), x)
    assert out.shape == (2,) and (out > 0).all()
    out.sum().backward()
    assert all(p.grad is None for m in teachers for p in m.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in kd.parameters())
    assert not any(m.training for m in teachers)
    assert all(torch.equal(m.bn.running_mean, torch.full((3,), 0.5)) for m in teachers)

    # teacher features handed in are detached as well
    given_feats = [
        [torch.randn(4, 3, 5, 5, requires_grad=True), torch.randn(4, 3)] for _ in range(2)
    ]
    kd(student(x), teacher_outputs=given_feats).sum().backward()
    assert given_feats[0][0].grad is None and given_feats[1][0].grad is None

    # "train" mode (the official behaviour): batch statistics, running stats drift
    kd_train = AdaptorDistillation(teachers, channels=[(4, 3), (4, 3)], teacher_mode="train")
    kd_train(student(x), x)
    assert all(m.training for m in teachers)
    assert not torch.equal(teachers[0].bn.running_mean, torch.full((3,), 0.5))


def test_adaptors_are_bias_free_xavier_normal_and_the_only_parameters():
    torch.manual_seed(0)
    a = _ChannelAdaptor(300, 200)
    (w,) = a.weights
    assert w.shape == (200, 300)
    assert abs(w.std().item() / math.sqrt(2 / 500) - 1) < 0.03
    assert abs(w.mean().item()) < 3 * math.sqrt(2 / 500) / math.sqrt(w.numel())
    # a 1×1 convolution on maps, a linear map on vectors
    x = torch.randn(2, 300, 3, 4)
    torch.testing.assert_close(a(x), F.conv2d(x, w[:, :, None, None]), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(a(x[:, :, 0, 0]), x[:, :, 0, 0] @ w.T, rtol=1e-4, atol=1e-5)
    nonlinear = _ChannelAdaptor(6, 3, nonlinear=True)
    w1, w2 = nonlinear.weights
    assert w1.shape == (12, 6) and w2.shape == (3, 12)
    v = torch.randn(5, 6)
    torch.testing.assert_close(nonlinear(v), torch.relu(v @ w1.T) @ w2.T)

    teachers = [ConvTeacher() for _ in range(3)]
    kd = AdaptorDistillation(teachers, channels=[(4, 3), 3])
    names = [n for n, _ in kd.named_parameters()]
    assert len(names) == 3 * 2 and all(n.endswith("weights.0") for n in names)
    assert all(p.dim() == 2 for p in kd.parameters())
    assert not any("bias" in k for k in kd.state_dict())
    teacher_ids = {id(p) for m in teachers for p in m.parameters()}
    assert not teacher_ids & {id(p) for p in kd.parameters()}
    assert "AdaptorDistillation(num_tasks=3, channels=[(4, 3), (3, 3)]" in repr(kd)


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"teachers": None, "channels": [3]}, ValueError),  # neither teachers nor num_tasks
        ({"teachers": None, "channels": [3], "num_tasks": 0}, ValueError),
        ({"teachers": nn.Linear(2, 2), "channels": [3]}, TypeError),
        ({"teachers": None, "channels": [], "num_tasks": 2}, ValueError),
        ({"teachers": None, "channels": [(3, 0)], "num_tasks": 2}, ValueError),
        ({"teachers": None, "channels": 3, "num_tasks": 2}, TypeError),
        ({"teachers": None, "channels": [3], "num_tasks": 2, "weights": (1.0,)}, ValueError),
        ({"teachers": None, "channels": [3], "num_tasks": 1, "weights": (-1.0,)}, ValueError),
        ({"teachers": None, "channels": [3], "num_tasks": 1, "eps": -1.0}, ValueError),
        ({"teachers": None, "channels": [3], "num_tasks": 1, "teacher_mode": "x"}, ValueError),
        ({"teachers": [ConvTeacher()], "channels": [3], "num_tasks": 2}, ValueError),
    ],
)
def test_adaptor_distillation_validates_hyperparameters(kwargs, error):
    with pytest.raises(error):
        AdaptorDistillation(**kwargs)


def test_adaptor_distillation_validates_inputs():
    kd = AdaptorDistillation(None, channels=[(4, 3)], num_tasks=2)
    f, ft = torch.randn(2, 4), torch.randn(2, 3)
    with pytest.raises(ValueError, match="exactly one"):
        kd(f)
    with pytest.raises(ValueError, match="without teachers"):
        kd(f, torch.randn(2, 4))
    with pytest.raises(ValueError, match="levels"):
        kd([f, f], teacher_outputs=[ft, ft])
    with pytest.raises(ValueError, match="shape"):
        kd(f, teacher_outputs=[torch.randn(2, 5), ft])
    with pytest.raises(ValueError, match="expected 2"):
        kd(f, teacher_outputs=[ft])
    with pytest.raises(ValueError, match="task indices"):
        kd(f, teacher_outputs=[ft, ft], tasks=[2])


# --- UniversalRepresentationLoss ----------------------------------------------------------
def test_url_dense_matches_a_direct_computation_with_resizing():
    url = UniversalRepresentationLoss(
        None, channels=[(6, 3), (4, 3)], num_tasks=2, weights=(1.0, 2.0)
    ).double()
    student = [randn(2, 6, 2, 3, seed=1), randn(2, 4, 4, 6, seed=2)]
    # only the teacher's last level counts; a bare tensor is one level
    teachers = [[randn(2, 5, 2, 2, seed=3), randn(2, 3, 4, 6, seed=4)], randn(2, 3, 4, 6, seed=5)]
    got = url(student, teacher_outputs=teachers)

    def unit(v: torch.Tensor) -> torch.Tensor:
        return v / v.norm(dim=1, keepdim=True).clamp(min=1e-12)

    expect = []
    for t, target in enumerate([teachers[0][1], teachers[1]]):
        total = 0.0
        for lvl, f in enumerate(student):
            w = url.adaptors[t][lvl].weights[0].detach()
            a = torch.einsum("oc,nchw->nohw", w, f)
            if a.shape[2:] != target.shape[2:]:
                a = F.interpolate(a, size=(4, 6), mode="bilinear", align_corners=False)
            total += ((unit(a) - unit(target)) ** 2).sum(1).mean()
        expect.append(url.weights[t] * total)
    torch.testing.assert_close(got, torch.stack(expect))

    # a constant 1×1 map resizes to a constant map: the golden value of one location
    url1 = UniversalRepresentationLoss(None, channels=[2], num_tasks=1).double()
    with torch.no_grad():
        url1.adaptors[0][0].weights[0].copy_(torch.eye(2))
    f = torch.tensor([3.0, 4.0], dtype=F64).view(1, 2, 1, 1)
    target = torch.tensor([0.0, 1.0], dtype=F64).view(1, 2, 1, 1).expand(1, 2, 3, 5)
    torch.testing.assert_close(url1(f, teacher_outputs=[target]), torch.tensor([0.4], dtype=F64))


def _np_rbf_cka(x: np.ndarray, y: np.ndarray) -> float:
    def kernel(a: np.ndarray) -> np.ndarray:
        d2 = ((a[:, None, :] - a[None, :, :]) ** 2).sum(-1)
        nonzero = np.sort(d2[d2 != 0])
        median = nonzero[(len(nonzero) - 1) // 2]  # torch.median: the lower middle value
        return np.exp(-d2 / (2 * median))

    n = len(x)
    h = np.eye(n) - np.ones((n, n)) / n
    kx, ky = kernel(x), kernel(y)

    def hsic(k: np.ndarray, other: np.ndarray) -> float:
        return float(np.trace(k @ h @ other @ h))

    return hsic(kx, ky) / math.sqrt(hsic(kx, kx) * hsic(ky, ky))


def test_rbf_cka_matches_numpy():
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((7, 3)), rng.standard_normal((7, 5))
    y[:, :3] += 2 * x  # partly related
    got = _rbf_cka(torch.from_numpy(x), torch.from_numpy(y)).item()
    assert got == pytest.approx(_np_rbf_cka(x, y), rel=1e-10)
    assert 0.1 < got < 1.0


@settings(max_examples=examples(30))
@given(
    n=st.integers(3, 10),
    d=st.integers(1, 5),
    seed=st.integers(0, 2**32 - 1),
    log_scale=st.floats(-3, 3),
)
def test_rbf_cka_invariances(n, d, seed, log_scale):
    rng = np.random.default_rng(seed)
    x = torch.from_numpy(rng.standard_normal((n, d)))
    y = torch.from_numpy(rng.standard_normal((n, d + 1)))
    q, _ = torch.linalg.qr(torch.from_numpy(rng.standard_normal((d, d))))
    moved = 10.0**log_scale * x @ q + torch.from_numpy(rng.standard_normal(d))
    # the median bandwidth makes the kernel invariant to isotropic scaling, rotation, shift
    assert _rbf_cka(x, moved).item() == pytest.approx(1.0, abs=1e-9)
    c = _rbf_cka(x, y).item()
    assert -1e-12 <= c <= 1 + 1e-12
    assert c == pytest.approx(_rbf_cka(y, x).item(), abs=1e-12)
    perm = torch.from_numpy(rng.permutation(n))
    assert c == pytest.approx(_rbf_cka(x[perm], y[perm]).item(), abs=1e-9)


def test_distill_kl_matches_numpy_and_vanishes_on_equal_logits():
    rng = np.random.default_rng(1)
    ys, yt = rng.standard_normal((4, 6)) * 5, rng.standard_normal((4, 6)) * 5
    temperature = 8.0

    def softmax(v: np.ndarray) -> np.ndarray:
        e = np.exp(v - v.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)

    ps, pt = softmax(ys / temperature), softmax(yt / temperature)
    expect = temperature**2 * (pt * np.log(pt / ps)).sum() / 4
    got = _distill_kl(torch.from_numpy(ys), torch.from_numpy(yt), temperature).item()
    assert got == pytest.approx(expect, rel=1e-10)
    assert _distill_kl(torch.from_numpy(ys), torch.from_numpy(ys), 2.0).item() == pytest.approx(
        0.0, abs=1e-12
    )


def test_url_classification_value_and_linear_annealing():
    url = UniversalRepresentationLoss(
        None,
        channels=[(5, 4)],
        form="classification",
        num_tasks=2,
        weights=(10.0, 0.1),
        total_epochs=10,
    ).double()
    assert url.temperature == 8.0 and url.sigma == 1.0 and url.beta == 1.0
    fs = randn(6, 5, seed=1)
    teachers = [(randn(6, 4, seed=2 + t), 3 * randn(6, 3 + t, seed=4 + t)) for t in range(2)]
    logits = [3 * randn(6, 3 + t, seed=6 + t) for t in range(2)]

    def unit(v: torch.Tensor) -> np.ndarray:
        return (v / v.norm(dim=1, keepdim=True)).detach().numpy()

    base = []
    for t in range(2):
        a = fs @ url.adaptors[t][0].weights[0].detach().T
        cka = _np_rbf_cka(unit(a), unit(teachers[t][0]))
        kl = _distill_kl(logits[t], teachers[t][1], 8.0).item()
        base.append(url.weights[t] * ((1 - cka) + kl))
    for epoch, w in [(0, 1.0), (3, 0.7), (10, 0.0), (12, 0.0)]:
        url.step(epoch)
        assert url.annealing_weight() == pytest.approx(w)
        got = url(fs, teacher_outputs=teachers, logits=logits)
        torch.testing.assert_close(got, w * torch.tensor(base, dtype=F64))
    # the epoch is checkpointed
    fresh = UniversalRepresentationLoss(
        None, channels=[(5, 4)], form="classification", num_tasks=2, total_epochs=10
    ).double()
    fresh.load_state_dict(url.state_dict())
    assert fresh.epoch == 12
    assert UniversalRepresentationLoss(None, [3], num_tasks=1).annealing_weight(50) == 1.0


def test_url_teachers_run_detached_in_eval_and_gradients_flow():
    torch.manual_seed(0)

    class Classifier(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.ReLU())
            self.head = nn.Linear(5, 3)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            z = self.body(x)
            return z, self.head(z)

    student, teachers = Classifier(), [Classifier(), Classifier()]
    url = UniversalRepresentationLoss(teachers, channels=[5], form="classification")
    x = torch.randn(8, 6)
    z, y = student(x)
    url(z, x, logits=[y, y]).sum().backward()
    assert all(p.grad is None for m in teachers for p in m.parameters())
    assert all(p.grad is not None for p in student.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in url.parameters())
    assert not any(m.training for m in teachers)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"form": "x"},
        {"form": "classification", "channels": [3, 3]},
        {"temperature": 0.0},
        {"sigma": -1.0},
        {"beta": float("nan")},
        {"total_epochs": 0},
    ],
)
def test_url_validates_hyperparameters(kwargs):
    kwargs = {"channels": [3], "num_tasks": 2, **kwargs}
    with pytest.raises(ValueError):
        UniversalRepresentationLoss(None, **kwargs)


def test_url_validates_inputs():
    dense = UniversalRepresentationLoss(None, channels=[3], num_tasks=1)
    f = torch.randn(2, 3)
    with pytest.raises(ValueError, match="used by form"):
        dense(f, teacher_outputs=[f], logits=[f])
    cls = UniversalRepresentationLoss(None, channels=[3], num_tasks=1, form="classification")
    with pytest.raises(ValueError, match="logits"):
        cls(f, teacher_outputs=[(f, f)])
    with pytest.raises(TypeError, match="features, logits"):
        cls(f, teacher_outputs=[f], logits=[f])
    with pytest.raises(ValueError, match="epoch"):
        cls.step(-1)


# --- SCD: scheduling on scripted inputs ---------------------------------------------------
S4 = torch.tensor(
    [[1.0, 0.8, 0.1, -0.2], [0.8, 1.0, 0.0, -0.1], [0.1, 0.0, 1.0, 0.5], [-0.2, -0.1, 0.5, 1.0]],
    dtype=F64,
)


def base4() -> AdaptorDistillation:
    return AdaptorDistillation(None, channels=[3], num_tasks=4)


def test_scd_blocks_order_stages_and_weights_by_hand():
    scd = SequentialCooperativeDistillation(
        base4(), 10, warmup_epochs=2, similarity="affinity", complexity=(1.0, 1.2, 3.0, 2.0)
    )
    skew = randn(4, 4, seed=3)
    scd.observe(affinity=S4 + 0.1 * skew)  # the running mean of the two is S4
    scd.observe(affinity=S4 - 0.1 * skew)
    torch.testing.assert_close(scd.similarity_matrix, S4)
    for epoch in (0, 1):
        scd.step(epoch)
        assert scd.measuring and scd.stage() is None
        assert torch.equal(scd.weights(), torch.zeros(4, dtype=F64))
    scd.step(2)
    # merges (0,1) at 0.8, then (2,3) at 0.5; their link mean(0.1, -0.2, 0, -0.1) < 0 stops it
    assert scd.blocks == ((0, 1), (2, 3))
    # block complexities 1.1 and 2.5: the complex block (2, 3) goes first
    assert scd.order == (1, 0)
    assert scd.stage_boundaries == (2, 6)
    expected = {
        2: [0, 0, 1, 1],
        5: [0, 0, 1, 1],
        6: [1, 1, 1, 1],  # block (2, 3) starts its linear decay at the end of its stage
        7: [1, 1, 0.75, 0.75],
        9: [1, 1, 0.25, 0.25],
    }
    for epoch, w in expected.items():
        torch.testing.assert_close(scd.weights(epoch), torch.tensor(w, dtype=F64))
    assert [scd.stage(e) for e in (1, 2, 5, 6, 9)] == [None, 0, 0, 1, 1]
    scd.observe(affinity=torch.ones(4, 4))  # a no-op once built
    torch.testing.assert_close(scd.similarity_matrix, S4)
    assert "blocks=[[0, 1], [2, 3]], order=[1, 0], stage_boundaries=[2, 6]" in repr(scd)


@pytest.mark.parametrize(
    "kwargs, blocks",
    [
        ({"threshold": 0.6}, ((0, 1), (2,), (3,))),
        ({"threshold": -0.5}, ((0, 1, 2, 3),)),
        ({"n_blocks": 1}, ((0, 1, 2, 3),)),
        ({"n_blocks": 3}, ((0, 1), (2,), (3,))),
        ({"n_blocks": 4}, ((0,), (1,), (2,), (3,))),
        ({"grouping": lambda s: [[3, 0], [2, 1]]}, ((0, 3), (1, 2))),
    ],
)
def test_scd_clustering_options(kwargs, blocks):
    scd = SequentialCooperativeDistillation(
        base4(), 12, similarity="affinity", complexity=(1, 2, 3, 4), **kwargs
    )
    scd.observe(affinity=S4)
    scd.step(1)
    assert scd.blocks == blocks
    assert len(scd.stage_boundaries) == len(blocks)


def test_scd_decay_modes_and_even_stages():
    def make(decay: str) -> SequentialCooperativeDistillation:
        return SequentialCooperativeDistillation(
            base4(), 9, warmup_epochs=1, blocks=[[0], [1, 2], [3]], order=[2, 0, 1], decay=decay
        )

    scd = make("drop")
    assert scd.built and scd.stage_boundaries == (1, 3, 6)  # 1 + floor(k * 8 / 3)
    torch.testing.assert_close(scd.weights(0), torch.zeros(4, dtype=F64))
    torch.testing.assert_close(scd.weights(2), torch.tensor([0, 0, 0, 1.0], dtype=F64))
    torch.testing.assert_close(scd.weights(4), torch.tensor([1.0, 0, 0, 0], dtype=F64))
    torch.testing.assert_close(scd.weights(8), torch.tensor([0, 1.0, 1.0, 0], dtype=F64))
    torch.testing.assert_close(make("keep").weights(8), torch.ones(4, dtype=F64))
    # linear: block [3] ended at 3 -> 1 - (8-3)/(9-3); block [0] ended at 6 -> 1 - 2/3
    torch.testing.assert_close(
        make("linear").weights(8), torch.tensor([1 / 3, 1.0, 1.0, 1 / 6], dtype=F64)
    )
    custom = SequentialCooperativeDistillation(
        base4(), 9, blocks=[[0, 1], [2, 3]], order=[0, 1], stage_boundaries=[0, 7]
    )
    assert custom.warmup_epochs == 0 and custom.stage_boundaries == (0, 7)
    torch.testing.assert_close(custom.weights(0), torch.tensor([1.0, 1, 0, 0], dtype=F64))


def test_scd_gradient_cosine_from_a_jacobian():
    scd = SequentialCooperativeDistillation(base4(), 5, complexity=(1, 1, 1, 1))
    jac = torch.tensor([[1.0, 0, 0], [2, 0.1, 0], [-1, 0, 0], [0, 0, 0]], dtype=F64)
    scd.observe(jacobian=jac)
    s = scd.similarity_matrix
    c01 = 2 / math.sqrt(4.01)
    assert s[0, 1].item() == pytest.approx(c01) and s[0, 2].item() == pytest.approx(-1.0)
    assert s[1, 2].item() == pytest.approx(-c01)
    assert (s[3] == 0).all()  # a zero gradient is similar to nothing
    scd.step(1)
    assert scd.blocks == ((0, 1), (2,), (3,))


def test_scd_gradient_cosine_from_losses_uses_the_engine_and_keeps_the_graph():
    torch.manual_seed(0)
    trunk, heads = nn.Linear(3, 4), [nn.Linear(4, 1) for _ in range(4)]
    x = torch.randn(8, 3)
    z = torch.tanh(trunk(x))
    losses = [h(z).pow(2).mean() for h in heads]
    scd = SequentialCooperativeDistillation(base4(), 5, complexity=(1, 1, 1, 1))
    scd.observe(losses=losses, shared=trunk.parameters())
    rows = []
    for loss in losses:
        grads = torch.autograd.grad(loss, list(trunk.parameters()), retain_graph=True)
        rows.append(torch.cat([g.flatten() for g in grads]))
    jac = torch.stack(rows).double()
    unit = jac / jac.norm(dim=1, keepdim=True)
    torch.testing.assert_close(scd.similarity_matrix, unit @ unit.T)
    sum(losses).backward()  # the user's own backward still works
    assert trunk.weight.grad is not None


def test_scd_complexity_uses_the_last_warmup_epoch_only():
    scd = SequentialCooperativeDistillation(
        AdaptorDistillation(None, channels=[3], num_tasks=2), 6, warmup_epochs=2, blocks=[[0], [1]]
    )

    def v(*xs: float) -> torch.Tensor:
        return torch.tensor(xs)

    scd.step(0)
    scd.observe(losses=v(10.0, 1.0), stl_losses=v(1.0, 1.0))  # discarded: epoch 0
    scd.step(1)
    scd.observe(losses=v(2.0, 3.0), stl_losses=v(1.0, 1.0))
    scd.observe(losses=v(4.0, 3.0), stl_losses=v(1.0, 0.5))
    scd.step(2)
    # means: MTL (3, 3), STL (1, 0.75) -> complexity (3, 4): task 1's block first
    torch.testing.assert_close(scd.complexity, torch.tensor([3.0, 4.0], dtype=F64))
    assert scd.order == (1, 0) and scd.stage_boundaries == (2, 4)


def test_scd_forward_weights_the_terms_and_skips_idle_teachers():
    torch.manual_seed(0)
    teachers = [ConvTeacher() for _ in range(3)]
    kd = AdaptorDistillation(teachers, channels=[(4, 3), (4, 3)])
    scd = SequentialCooperativeDistillation(
        kd, 4, warmup_epochs=1, blocks=[[0, 2], [1]], order=[1, 0], decay="linear"
    )
    student, x = ConvStudent(), torch.randn(2, 2, 4, 4)
    assert torch.equal(scd(student(x), x), torch.zeros(3))  # warm-up: no distillation
    assert [m.calls for m in teachers] == [0, 0, 0]
    scd.step(1)
    out = scd(student(x), x)
    assert [m.calls for m in teachers] == [0, 1, 0]
    assert out[0] == 0 and out[2] == 0 and out[1] > 0
    scd.step(3)  # stage 1: block [0, 2] at 1, block [1] decaying: 1 - (3 - 2) / (4 - 2)
    feats = student(x)
    torch.testing.assert_close(scd(feats, x), kd(feats, x) * torch.tensor([1.0, 0.5, 1.0]))
    assert list(scd.parameters()) == list(kd.parameters())
    with pytest.raises(TypeError, match="tasks"):
        scd(feats, x, tasks=[0])


def test_scd_state_dict_round_trip():
    def make() -> SequentialCooperativeDistillation:
        return SequentialCooperativeDistillation(
            base4(), 8, warmup_epochs=1, similarity="affinity", n_blocks=2
        )

    scd = make()
    scd.observe(affinity=S4, losses=torch.ones(4), stl_losses=torch.tensor([1.0, 2, 3, 4]))
    scd.step(3)
    other = make()
    other.load_state_dict(scd.state_dict())
    assert other.blocks == scd.blocks == ((0, 1), (2, 3))
    assert other.order == scd.order == (0, 1)  # complexities 0.75 and 7/24
    assert other.epoch == 3 and other.stage_boundaries == scd.stage_boundaries
    torch.testing.assert_close(other.weights(), scd.weights())
    torch.testing.assert_close(other.similarity_matrix, S4)


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"order": [0]}, ValueError),  # order without blocks
        ({"blocks": [[0, 1], [2]]}, ValueError),  # not a partition
        ({"blocks": [[0, 1], [2, 3]], "order": [0, 0]}, ValueError),
        ({"warmup_epochs": 0}, ValueError),  # nothing given, no time to measure
        ({"warmup_epochs": 8}, ValueError),
        ({"stage_boundaries": [2, 2]}, ValueError),
        ({"stage_boundaries": [2, 9]}, ValueError),
        ({"stage_boundaries": [2, 4], "warmup_epochs": 1}, ValueError),
        ({"complexity": (1.0, 2.0)}, ValueError),
        ({"similarity": "x"}, ValueError),
        ({"n_blocks": 5}, ValueError),
        ({"n_blocks": 2, "grouping": lambda s: [[0, 1, 2, 3]]}, ValueError),
        ({"decay": "x"}, ValueError),
        ({"eps": 0.0}, ValueError),
        ({"threshold": float("inf")}, ValueError),
    ],
)
def test_scd_validates_hyperparameters(kwargs, error):
    with pytest.raises(error):
        SequentialCooperativeDistillation(base4(), 8, **kwargs)
    with pytest.raises(TypeError):
        SequentialCooperativeDistillation(nn.Linear(2, 2), 8)


def test_scd_build_errors_are_clear():
    scd = SequentialCooperativeDistillation(base4(), 8, similarity="affinity")
    with pytest.raises(ValueError, match="no similarity"):
        scd.step(1)
    scd.observe(affinity=S4)
    with pytest.raises(ValueError, match="no losses"):
        scd.step(1)
    with pytest.raises(ValueError, match="not affinity"):
        SequentialCooperativeDistillation(base4(), 8).observe(affinity=S4)
    with pytest.raises(ValueError, match="stl_losses"):
        scd.observe(stl_losses=torch.ones(4))
    bad = SequentialCooperativeDistillation(
        base4(), 8, similarity="affinity", complexity=(1, 2, 3, 4), grouping=lambda s: [[0, 1]]
    )
    bad.observe(affinity=S4)
    with pytest.raises(ValueError, match="partition"):
        bad.build()
    short = SequentialCooperativeDistillation(
        base4(), 3, warmup_epochs=1, similarity="affinity", complexity=(1, 2, 3, 4), n_blocks=3
    )
    short.observe(affinity=S4)
    with pytest.raises(ValueError, match="at least one epoch"):
        short.build()


# --- SCD: a short run on MultiDigits --------------------------------------------------------
def multidigits(n: int, seed: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """benchmarks/digits_demo.py's tasks: left digit, right digit, their sum (8×16 inputs)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32) / 16.0
    labels = torch.tensor(digits.target)
    g = torch.Generator().manual_seed(seed)
    a, b = (torch.randint(len(labels), (n,), generator=g) for _ in range(2))
    x = torch.cat([images[a], images[b]], dim=2).reshape(n, -1)
    return x, [labels[a], labels[b], labels[a] + labels[b]]


class DigitNet(nn.Module):
    def __init__(self, classes: tuple[int, ...]) -> None:
        super().__init__()
        self.l1, self.l2 = nn.Linear(128, 64), nn.Linear(64, 64)
        self.heads = nn.ModuleList(nn.Linear(64, c) for c in classes)

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        h1 = torch.relu(self.l1(x))
        return [h1, torch.relu(self.l2(h1))]

    def forward(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        feats = self.features(x)
        return [h(feats[-1]) for h in self.heads], feats


def test_scd_short_run_on_multidigits_lowers_the_losses():
    x, ys = multidigits(640, seed=0)
    classes = (10, 10, 19)
    batches = [torch.arange(i, i + 64) for i in range(0, 640, 64)]
    torch.manual_seed(0)
    teachers = [DigitNet((c,)) for c in classes]
    for t, teacher in enumerate(teachers):
        opt = torch.optim.Adam(teacher.parameters(), lr=3e-3)
        for _ in range(8):
            for idx in batches:
                opt.zero_grad()
                F.cross_entropy(teacher(x[idx])[0][0], ys[t][idx]).backward()
                opt.step()

    student = DigitNet(classes)
    kd = AdaptorDistillation(
        teachers, channels=[64, 64], teacher_forward=lambda m, v: m.features(v)
    )
    scd = SequentialCooperativeDistillation(kd, total_epochs=6, warmup_epochs=1)
    opt = mtl_optim.MTLOptimizer(
        [{"params": student.parameters()}, {"params": scd.parameters(), "lr": 1e-2}],
        base=torch.optim.Adam,
        lr=3e-3,
    )
    history, distill = [], []
    for epoch in range(6):
        scd.step(epoch)
        sup, dist = torch.zeros(3), torch.zeros(3)
        for idx in batches:
            preds, feats = student(x[idx])
            losses = [F.cross_entropy(p, y[idx]) for p, y in zip(preds, ys)]
            if scd.measuring:
                with torch.no_grad():
                    stl = [F.cross_entropy(m(x[idx])[0][0], y[idx]) for m, y in zip(teachers, ys)]
                scd.observe(losses=losses, shared=student.l1.parameters(), stl_losses=stl)
            terms = scd(feats, x[idx])
            opt.zero_grad()
            opt.backward(torch.stack(losses) + terms)
            opt.step()
            sup += torch.stack(losses).detach() / len(batches)
            dist += terms.detach() / len(batches)
        history.append(sup)
        distill.append(dist)

    assert scd.built and sorted(t for b in scd.blocks for t in b) == [0, 1, 2]
    assert sorted(scd.order) == list(range(len(scd.blocks)))
    assert scd.stage_boundaries[0] == 1 and len(scd.stage_boundaries) == len(scd.blocks)
    assert scd.complexity is None or scd.complexity.shape == (3,)
    assert torch.equal(distill[0], torch.zeros(3))  # warm-up: plain MTL
    first = scd.blocks[scd.order[0]]
    assert all(distill[1][t] > 0 for t in first)
    # the supervised losses go down (the sum task is the slow one), and so does the first
    # block's distillation term during its stage
    assert (history[-1] < history[0]).all() and history[-1].sum() < 0.8 * history[0].sum()
    second = scd.stage_boundaries[1] if len(scd.blocks) > 1 else 6
    assert all(distill[second - 1][t] < 0.5 * distill[1][t] for t in first)
    assert not any(m.training for m in teachers)
