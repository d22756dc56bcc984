"""Regularisers: SaliencyRelation (SRDML), CrossTaskConsistency (XTasC-Net) and
PairwiseTaskConsistency (MTPSL)."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import mtl_optim
from mtl_optim.regularizers import (
    CrossTaskConsistency,
    PairwiseTaskConsistency,
    SaliencyRelation,
    TaskTransferNet,
    masked_cross_entropy,
    masked_l1,
)
from mtl_optim.weighting import Uncertainty

F64 = torch.float64


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=gen(seed), dtype=F64)


class TanhHead(nn.Module):
    """A nonlinear scalar head on a (N, C, H, W) map, so saliencies vary with the input."""

    def __init__(self, c: int, hw: int, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(c * hw, 4), nn.Tanh(), nn.Linear(4, 1))
        self.double()

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        return self.net(a).squeeze(1)


def _features(n: int = 5, c: int = 3, h: int = 2, w: int = 2, seed: int = 0) -> torch.Tensor:
    return randn(n, c, h, w, seed=seed).requires_grad_(True)


# --- SaliencyRelation -----------------------------------------------------------------------
def test_saliency_golden_value_with_linear_heads():
    """Linear heads f_t(A) = w_t·A: α_t = w_t, R = Σ ω_ij ‖w_i − w_j‖₁ = (2 + 1 + 1)/3."""
    w = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=F64)
    a = randn(4, 2, seed=1).requires_grad_(True)
    reg = SaliencyRelation(3, dtype=F64)
    outs = [a @ w[t] for t in range(3)]
    torch.testing.assert_close(reg(a, outs), torch.tensor(4 / 3, dtype=F64))
    terms = reg(a, outs, per_task=True)  # R_i = ½ Σ_j ω_ij d_ij
    torch.testing.assert_close(terms, torch.tensor([0.5, 0.5, 1 / 3], dtype=F64))
    alpha = reg.saliency(a, outs)
    torch.testing.assert_close(alpha, w[:, None, :].expand(3, 4, 2))


def test_saliency_linear_heads_on_a_map_pool_sum_over_positions():
    a = _features(n=3, c=2, h=2, w=3)
    ws = [randn(2, 2, 3, seed=10 + t) for t in range(3)]
    outs = [(a * w).flatten(1).sum(1) for w in ws]
    c = torch.tensor([0.5, 2.0, 1.5], dtype=F64)
    reg = SaliencyRelation(3, dtype=F64)
    with torch.no_grad():
        reg.pair_weights.copy_(c)
    alpha = [w.sum((1, 2)) for w in ws]  # Σ_{h,w} ∂f/∂A_{:,h,w}
    pairs = [(0, 1), (0, 2), (1, 2)]
    expected = sum(
        c[p] / c.sum() * (alpha[i] - alpha[j]).abs().sum() for p, (i, j) in enumerate(pairs)
    )
    torch.testing.assert_close(reg(a, outs), expected)
    mean_pool = SaliencyRelation(3, dtype=F64, pool="mean")
    with torch.no_grad():
        mean_pool.pair_weights.copy_(c)
    torch.testing.assert_close(mean_pool(a, outs), expected / 6)


def test_saliency_relation_gradient_equals_the_official_analytic_gradient():
    """∂(μR)/∂c_ij = μ (D_ij / S − Σ c D / S²) (fp64), D the batch-reduced distances."""
    a = _features()
    heads = [TanhHead(3, 4, seed=s) for s in range(4)]
    reg = SaliencyRelation(4, dtype=F64)
    with torch.no_grad():
        reg.pair_weights.copy_(torch.rand(6, generator=gen(3), dtype=F64) + 0.1)
    mu = 0.3
    outs = [h(a) for h in heads]
    (mu * reg(a, outs)).backward()
    c = reg.pair_weights.detach()
    d = reg.distances(a, [h(a) for h in heads]).detach()
    s = c.sum()
    expected = mu * (d / s - (c * d).sum() / s**2)
    torch.testing.assert_close(reg.pair_weights.grad, expected, rtol=1e-10, atol=1e-12)


def test_saliency_batched_equals_a_per_sample_loop():
    a = _features(n=4)
    heads = [TanhHead(3, 4, seed=s) for s in range(3)]
    reg = SaliencyRelation(3, dtype=F64)
    alpha = reg.saliency(a, [h(a) for h in heads])
    for t, h in enumerate(heads):
        for e in range(4):
            (g,) = torch.autograd.grad(h(a[e : e + 1]).sum(), a)
            torch.testing.assert_close(alpha[t, e], g[e].flatten(1).sum(1))
    d = (alpha[0] - alpha[1]).abs().sum(-1)  # the l1 distance, mean over the batch
    torch.testing.assert_close(reg.distances(a, [h(a) for h in heads])[0], d.mean())


def test_saliency_identical_heads_give_zero_and_no_relation_gradient():
    a = _features()
    head = TanhHead(3, 4, seed=0)
    reg = SaliencyRelation(3, dtype=F64)
    outs = [head(a) for _ in range(3)]
    r = reg(a, outs)
    r.backward()
    assert r.item() == 0.0
    assert torch.count_nonzero(reg.pair_weights.grad) == 0


@pytest.mark.parametrize("kappa", [1e-3, 0.5, 7.0, 1e4])
def test_saliency_scale_invariance_in_c(kappa):
    a = _features()
    heads = [TanhHead(3, 4, seed=s) for s in range(3)]
    reg = SaliencyRelation(3, dtype=F64)
    c = torch.tensor([0.2, 1.0, 3.0], dtype=F64)
    with torch.no_grad():
        reg.pair_weights.copy_(c)
    base = reg(a, [h(a) for h in heads]).detach()
    with torch.no_grad():
        reg.pair_weights.copy_(kappa * c)
    torch.testing.assert_close(reg(a, [h(a) for h in heads]).detach(), base)


def test_saliency_reductions_distances_and_output_reductions():
    a = _features(n=3, c=2, h=1, w=2)
    heads = [nn.Sequential(nn.Flatten(), nn.Linear(4, 5), nn.Tanh()).double() for _ in range(3)]
    mean = SaliencyRelation(3, dtype=F64)
    total = SaliencyRelation(3, dtype=F64, reduction="sum")
    outs = [h(a) for h in heads]  # (N, 5) outputs: reduced per sample
    torch.testing.assert_close(total(a, outs), 3 * mean(a, outs))
    # output_reduce="sum" equals differentiating the per-sample sum; "max" the top logit
    summed = mean(a, [o.sum(1) for o in outs])
    torch.testing.assert_close(mean(a, outs), summed)
    top = SaliencyRelation(3, dtype=F64, output_reduce="max")
    torch.testing.assert_close(top(a, outs), mean(a, [o.max(1).values for o in outs]))
    sq = SaliencyRelation(3, dtype=F64, dist="sq_l2", pool="none")
    alpha = sq.saliency(a, outs)
    assert alpha.shape == (3, 3, 4)
    expected = sum((alpha[i] - alpha[j]).pow(2).sum(-1).mean() for i, j in [(0, 1), (0, 2), (1, 2)])
    torch.testing.assert_close(sq(a, outs), expected / 3)


def test_saliency_projection_relations_and_reset():
    reg = SaliencyRelation(4)
    with torch.no_grad():
        reg.pair_weights.copy_(torch.tensor([-1.0, 2.0, 0.5, -0.1, 1.5, 0.0]))
    m = reg.relations()  # shows the projected values without writing
    assert reg.pair_weights[0].item() == -1.0
    reg.project_()
    assert (reg.pair_weights >= 0).all()
    torch.testing.assert_close(m, m.T)
    assert torch.count_nonzero(m.diagonal()) == 0
    iu = torch.triu_indices(4, 4, 1)
    torch.testing.assert_close(m[iu[0], iu[1]].sum(), torch.tensor(1.0))
    torch.testing.assert_close(m[0, 2], torch.tensor(2.0 / 4.0))
    with torch.no_grad():
        reg.pair_weights.fill_(-1.0)
    with pytest.warns(RuntimeWarning, match="re-initialised to uniform"):
        reg.project_()
    torch.testing.assert_close(reg.pair_weights.detach(), torch.ones(6))


def test_saliency_validation():
    with pytest.raises(ValueError, match="num_tasks must be an int >= 2"):
        SaliencyRelation(1)
    with pytest.raises(TypeError, match="num_tasks"):
        SaliencyRelation(2.0)
    with pytest.raises(ValueError, match="dist must be one of"):
        SaliencyRelation(2, dist="cos")
    with pytest.raises(ValueError, match="init must be finite and > 0"):
        SaliencyRelation(2, init=0.0)
    reg = SaliencyRelation(2, dtype=F64)
    a = _features()
    with pytest.raises(ValueError, match="inside the autograd graph"):
        reg(a.detach(), [a.sum((1, 2, 3))] * 2)
    with pytest.raises(ValueError, match="expected a sequence of 2 outputs"):
        reg(a, [a.sum((1, 2, 3))])
    with pytest.raises(ValueError, match="does not depend on features"):
        reg(a, [a.sum((1, 2, 3)), randn(5).requires_grad_(True)])
    with pytest.raises(ValueError, match="one prediction per sample"):
        reg(a, [a.sum(), a.sum()])


def test_saliency_trains_through_mtl_optimizer_and_lowers_the_objective():
    """The documented use: c in its own param group, R backwarded before opt.backward."""
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Linear(6, 8), nn.Tanh())
    heads = nn.ModuleList(nn.Sequential(nn.Linear(8, 4), nn.Tanh(), nn.Linear(4, 1)) for _ in "abc")
    reg = SaliencyRelation(3, lr=0.05)
    opt = mtl_optim.MTLOptimizer(
        [{"params": [*trunk.parameters(), *heads.parameters()]}, reg.param_group()],
        torch.optim.Adam,
        lr=0.02,
        aggregator=mtl_optim.aggregators.IMTLG(),
    )
    assert opt.param_groups[1]["lr"] == 0.05
    x = torch.randn(64, 6, generator=gen(1))
    ys = [x[:, :2].sum(1), x[:, 1:3].sum(1), -x[:, 4]]

    def objective() -> tuple[list[torch.Tensor], torch.Tensor]:
        z = trunk(x)
        outs = [h(z).squeeze(1) for h in heads]
        return [F.mse_loss(o, y) for o, y in zip(outs, ys)], 0.1 * reg(z, outs)

    losses, r = objective()
    first = (sum(losses) + r).item()
    c0 = reg.pair_weights.detach().clone()
    for _ in range(25):
        losses, r = objective()
        opt.zero_grad()
        r.backward(retain_graph=True)
        opt.backward(losses)
        opt.step()
    losses, r = objective()
    assert (sum(losses) + r).item() < 0.5 * first
    assert not torch.equal(reg.pair_weights.detach(), c0)  # the relations train
    assert opt.shared_params == list(trunk.parameters())  # c is not a shared parameter


# --- CrossTaskConsistency -------------------------------------------------------------------
def _pair_module(target: str = "prediction", weights=(0.3, 0.2)) -> CrossTaskConsistency:
    torch.manual_seed(0)
    return CrossTaskConsistency(
        nn.Linear(3, 2).double(),
        nn.Linear(2, 3).double(),
        masked_l1,
        masked_l1,
        target=target,
        weights=weights,
    )


def test_masked_l1_and_cross_entropy_by_hand():
    pred = torch.tensor([[[1.0, 2.0], [3.0, 4.0]], [[0.0, 0.0], [0.0, 9.0]]])[:, None]
    target = torch.zeros_like(pred)
    mask = torch.tensor([[[1, 0], [1, 0]], [[0, 0], [0, 0]]])  # image 2 has no valid pixel
    # image 1: (1 + 3)/2 = 2; image 2 left out of the batch mean
    torch.testing.assert_close(masked_l1(pred, target, mask), torch.tensor(2.0))
    torch.testing.assert_close(masked_l1(pred, target), torch.tensor((2.5 + 2.25) / 2))
    logits = randn(2, 4, 3, 3, seed=2)
    labels = torch.randint(0, 4, (2, 3, 3), generator=gen(3))
    labels[0, 0, 0] = -1
    valid = torch.rand(2, 3, 3, generator=gen(4)) > 0.4
    got = masked_cross_entropy(logits, labels, valid, ignore_index=-1)
    keep = valid & (labels != -1)
    flat_logits = logits.movedim(1, -1)[keep]
    torch.testing.assert_close(got, F.cross_entropy(flat_logits, labels[keep]))
    nothing = masked_cross_entropy(logits, labels, torch.zeros_like(valid), ignore_index=-1)
    assert nothing.item() == 0.0


def test_masked_pixels_change_neither_value_nor_gradient():
    pred = randn(2, 1, 3, 4, seed=5).requires_grad_(True)
    target = randn(2, 1, 3, 4, seed=6)
    mask = torch.rand(2, 3, 4, generator=gen(7)) > 0.5
    value = masked_l1(pred, target, mask)
    (grad,) = torch.autograd.grad(value, pred)
    poisoned = pred.detach().clone()
    poisoned[~mask[:, None]] = float("nan")
    poisoned.requires_grad_(True)
    value2 = masked_l1(poisoned, target, mask)
    (grad2,) = torch.autograd.grad(value2, poisoned)
    torch.testing.assert_close(value2, value)
    torch.testing.assert_close(grad2, grad)
    assert torch.count_nonzero(grad[~mask[:, None]]) == 0
    logits = randn(2, 3, 3, 4, seed=8).requires_grad_(True)
    labels = torch.randint(0, 3, (2, 3, 4), generator=gen(9))
    v = masked_cross_entropy(logits, labels, mask)
    (g,) = torch.autograd.grad(v, logits)
    poisoned = logits.detach().clone()
    poisoned.movedim(1, -1)[~mask] = 1e6
    poisoned.requires_grad_(True)
    v2 = masked_cross_entropy(poisoned, labels, mask)
    (g2,) = torch.autograd.grad(v2, poisoned)
    torch.testing.assert_close(v2, v)
    torch.testing.assert_close(g2, g)


def test_cross_task_terms_match_a_direct_computation():
    xt = _pair_module()
    pa = randn(5, 3, seed=1).requires_grad_(True)
    pb = randn(5, 2, seed=2).requires_grad_(True)
    terms = xt(pa, pb)
    c_ab = (xt.transfer_ab(pa) - pb.detach()).abs().mean()
    c_ba = (xt.transfer_ba(pb) - pa.detach()).abs().mean()
    torch.testing.assert_close(terms, torch.stack([c_ab, c_ba]))
    ya, yb = randn(5, 3, seed=3), randn(5, 2, seed=4)
    label = _pair_module("label")
    want = torch.stack(
        [(label.transfer_ab(pa) - yb).abs().mean(), (label.transfer_ba(pb) - ya).abs().mean()]
    )
    torch.testing.assert_close(label(pa, pb, ya, yb), want)
    with pytest.raises(ValueError, match="needs both labels"):
        label(pa, pb, ya)


def test_cross_task_prediction_target_sends_no_gradient_to_the_target_head():
    xt = _pair_module()
    pa = randn(5, 3, seed=1).requires_grad_(True)
    pb = randn(5, 2, seed=2).requires_grad_(True)
    c_ab, c_ba = xt(pa, pb)
    ga, gb = torch.autograd.grad(c_ab, (pa, pb), retain_graph=True)
    assert torch.count_nonzero(gb) == 0 and ga.abs().sum() > 0
    ga, gb = torch.autograd.grad(c_ba, (pa, pb))
    assert torch.count_nonzero(ga) == 0 and gb.abs().sum() > 0


def test_cross_task_exact_transfer_gives_zero():
    xt = _pair_module()
    pa = randn(5, 3, seed=1)
    pb = xt.transfer_ab(pa).detach()
    assert xt(pa, pb)[0].item() == 0.0


def test_cross_task_lambda_zero_is_the_plain_sum_and_transfer_nets_get_zero_gradient():
    xt = _pair_module(weights=(0.0, 0.0))
    pa = randn(5, 3, seed=1).requires_grad_(True)
    pb = randn(5, 2, seed=2).requires_grad_(True)
    direct = torch.stack([pa.pow(2).mean(), pb.pow(2).mean()])
    objectives = xt.objectives(direct, xt(pa, pb))
    torch.testing.assert_close(objectives, direct)
    objectives.sum().backward()
    for p in xt.parameters():
        assert p.grad is not None and torch.count_nonzero(p.grad) == 0
    xt2 = _pair_module(weights=(0.25, 0.5))
    terms = xt2(pa, pb)
    want = torch.stack([0.75 * direct[0] + 0.25 * terms[0], 0.5 * direct[1] + 0.5 * terms[1]])
    torch.testing.assert_close(xt2.objectives(direct, terms), want)


def test_official_uncertainty_form_is_twice_ours_with_factors_four():
    """½ e^{-σ} G + σ summed over the two groups = 2 × Uncertainty(factors=(4, 4)) (fp64)."""
    groups = torch.tensor([0.7, 2.3], dtype=F64)
    sigma = torch.tensor([0.4, -1.1], dtype=F64, requires_grad=True)
    official = (0.5 * torch.exp(-sigma) * groups + sigma).sum()
    (g_official,) = torch.autograd.grad(official, sigma)
    uw = Uncertainty(2, factors=(4, 4), dtype=F64)
    uw.log_vars = sigma.detach()
    ours = uw(groups).sum()
    g_ours = torch.stack(torch.autograd.grad(ours, uw.parameters()))
    torch.testing.assert_close(official, 2 * ours)
    torch.testing.assert_close(g_official, 2 * g_ours)


def test_segmentation_depth_factory_matches_the_official_terms():
    torch.manual_seed(0)
    xt = CrossTaskConsistency.segmentation_depth(4, ignore_index=-1, widths=(4, 4, 8)).double()
    seg = randn(2, 4, 9, 11, seed=1).requires_grad_(True)
    depth = randn(2, 1, 9, 11, seed=2).abs().requires_grad_(True)
    mask_d = torch.rand(2, 1, 9, 11, generator=gen(3)) > 0.2
    terms = xt(seg, depth, mask_b=mask_d)
    transferred_depth = xt.transfer_ab(F.log_softmax(seg, 1))
    assert transferred_depth.shape == depth.shape
    c_sd = masked_l1(transferred_depth, depth.detach(), mask_d)
    c_ds = F.cross_entropy(xt.transfer_ba(depth), seg.detach().argmax(1))
    torch.testing.assert_close(terms, torch.stack([c_sd, c_ds]))
    labels = torch.randint(0, 4, (2, 9, 11), generator=gen(4))
    labels[:, 0] = -1
    label_mode = CrossTaskConsistency.segmentation_depth(4, target="label", widths=(4, 4, 8))
    label_mode.double().load_state_dict(xt.state_dict())
    y_d = randn(2, 1, 9, 11, seed=5).abs()
    got = label_mode(seg, depth, labels, y_d, mask_b=mask_d)
    keep = labels != -1
    ce = F.cross_entropy(xt.transfer_ba(depth).movedim(1, -1)[keep], labels[keep])
    torch.testing.assert_close(got, torch.stack([masked_l1(transferred_depth, y_d, mask_d), ce]))


def test_task_transfer_net_shapes_and_validation():
    net = TaskTransferNet(3, 5, widths=(2, 3, 4), batch_norm=True)
    assert net(torch.randn(2, 3, 7, 10)).shape == (2, 5, 7, 10)
    assert net.out.bias is None
    with pytest.raises(ValueError, match="widths must be three ints"):
        TaskTransferNet(3, 5, widths=(2, 3))
    with pytest.raises(ValueError, match="target must be one of"):
        CrossTaskConsistency(nn.Identity(), nn.Identity(), masked_l1, masked_l1, target="cycle")
    with pytest.raises(ValueError, match=r"weights\[0\] must be in \[0, 1\]"):
        CrossTaskConsistency(nn.Identity(), nn.Identity(), masked_l1, masked_l1, weights=(2, 0))
    with pytest.raises(TypeError, match="transfer_ab must be an nn.Module"):
        CrossTaskConsistency(lambda v: v, nn.Identity(), masked_l1, masked_l1)


def test_cross_task_short_training_run_lowers_the_objectives():
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Linear(4, 16), nn.Tanh())
    head_a, head_b = nn.Linear(16, 3), nn.Linear(16, 1)
    xt = CrossTaskConsistency(
        nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1)),
        nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 3)),
        lambda p, y, m: masked_cross_entropy(p, y, m),
        masked_l1,
        pseudo_label_a=lambda p: p.argmax(1),
        input_a=lambda p: F.log_softmax(p, 1),
        weights=(0.1, 0.1),
    )
    params = [*trunk.parameters(), *head_a.parameters(), *head_b.parameters()]
    opt = mtl_optim.MTLOptimizer(
        [{"params": params}, {"params": list(xt.parameters())}],
        torch.optim.Adam,
        lr=0.02,
        weighting=Uncertainty(2, factors=(4, 4)),
    )
    x = torch.randn(128, 4, generator=gen(0))
    ya = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    yb = x[:, :1] * 2

    def objectives() -> torch.Tensor:
        z = trunk(x)
        pa, pb = head_a(z), head_b(z)
        direct = torch.stack([F.cross_entropy(pa, ya), masked_l1(pb, yb)])
        return xt.objectives(direct, xt(pa, pb))

    first = objectives().detach()
    for _ in range(60):
        opt.zero_grad()
        opt.backward(objectives())
        opt.step()
    last = objectives().detach()
    assert (last < 0.6 * first).all(), (first, last)


# --- PairwiseTaskConsistency ----------------------------------------------------------------
def _reference_consistency(reg, preds, labels, labelled, phi):
    """Image by image and pair by pair, in eval mode (BatchNorm is then a per-sample map)."""
    n, k = phi.shape[0], len(preds)
    total = torch.zeros((), dtype=phi.dtype)
    per_task = torch.zeros(k, dtype=phi.dtype)
    for x in range(n):
        for s, t in itertools.permutations(range(k), 2):
            if labelled[x, s] or not labelled[x, t]:
                continue
            code = torch.tensor([reg.pair_index(s, t, k)])
            a = reg.mapping(reg._normalise(preds[s], s, False)[x : x + 1], s, code)
            b = reg.mapping(reg._normalise(labels[t], t, True)[x : x + 1], t, code)
            f = phi[x : x + 1]

            def one_minus_cos(u, v):
                dot = (u * v).sum(1)
                cos = dot / (u.norm(dim=1) * v.norm(dim=1)).clamp(min=1e-12)
                return (1 - cos).mean()

            c = one_minus_cos(a, b) + reg.rho * (one_minus_cos(a, f) + one_minus_cos(b, f))
            total = total + c / n
            per_task[s] += c.detach() / n
    return total, per_task


def _pairwise_setup(dense: bool = True):
    torch.manual_seed(0)
    kinds = ["none", "depth", "normal"]
    if dense:
        reg = PairwiseTaskConsistency([2, 1, 3], 4, kinds=kinds, widths=(3, 4), rho=0.5)
        shape = lambda c: (4, c, 4, 4)  # noqa: E731
        phi = randn(4, 4, 1, 1, seed=9)
    else:
        reg = PairwiseTaskConsistency([2, 1, 3], 4, kinds=kinds, widths=(5, 4), dense=False)
        shape = lambda c: (4, c)  # noqa: E731
        phi = randn(4, 4, seed=9)
    reg.double()
    with torch.no_grad():  # move the FiLM codes off their identity start
        for p in reg.film_parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=gen(p.numel()), dtype=F64))
    preds = [randn(*shape(c), seed=c).requires_grad_(True) for c in (2, 1, 3)]
    labels = [randn(*shape(c), seed=10 + c) for c in (2, 1, 3)]
    labelled = torch.tensor(
        [[True, False, True], [False, True, False], [True, True, False], [False, False, True]]
    )
    return reg, preds, labels, labelled, phi


@pytest.mark.parametrize("dense", [True, False])
def test_pairwise_consistency_matches_an_image_by_image_recomputation(dense):
    reg, preds, labels, labelled, phi = _pairwise_setup(dense)
    reg.eval()
    got = reg(preds, labels, labelled, phi)
    want, want_per_task = _reference_consistency(reg, preds, labels, labelled, phi)
    torch.testing.assert_close(got, want)
    per_task = reg(preds, labels, labelled, phi, per_task=True)
    torch.testing.assert_close(per_task.detach(), want_per_task)
    torch.testing.assert_close(per_task.sum(), got)
    # gradients by autograd through both computations agree
    g_got = torch.autograd.grad(got, [preds[0], *reg.parameters()], allow_unused=True)
    g_want = torch.autograd.grad(want, [preds[0], *reg.parameters()], allow_unused=True)
    for a, b in zip(g_got, g_want):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b)


def test_pairwise_gradient_flow_only_through_unlabelled_predictions():
    reg, preds, labels, labelled, phi = _pairwise_setup()
    phi = phi.clone().requires_grad_(True)
    labels = [y.clone().requires_grad_(True) for y in labels]
    batch_labelled = torch.tensor([True, False, True])  # per batch: task 1 unlabelled
    value = reg(preds, labels, batch_labelled, phi)
    grads = torch.autograd.grad(value, [*preds, *labels, phi], allow_unused=True, retain_graph=True)
    assert grads[0] is None and grads[2] is None  # labelled tasks' predictions
    assert grads[1] is not None and grads[1].abs().sum() > 0
    assert all(g is None for g in grads[3:])  # labels and φ are constants
    film = torch.autograd.grad(value, reg.film_parameters())
    # only the codes of the pairs (1, 0) and (1, 2) move
    used = {reg.pair_index(1, 0, 3), reg.pair_index(1, 2, 3)}
    for g in film:
        for p in range(6):
            assert (g[:, p].abs().sum() > 0) == (p in used)


def test_pairwise_labelled_forms_agree_and_all_labelled_is_a_backwardable_zero():
    reg, preds, labels, _, phi = _pairwise_setup()
    reg.eval()
    flags = torch.tensor([True, False, True])
    losses = [preds[0].sum(), None, preds[2].sum()]
    a = reg(preds, labels, flags, phi)
    b = reg(preds, labels, flags.expand(4, 3), phi)
    c = reg(preds, [labels[0], None, labels[2]], losses, phi)
    d = reg(preds, labels, [torch.tensor(True), torch.tensor(False), torch.tensor(True)], phi)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, c)
    torch.testing.assert_close(a, d)
    zero = reg(preds, labels, [True, True, True], phi)
    assert zero.item() == 0.0
    zero.backward()
    full = PairwiseTaskConsistency([2, 1, 3], 4, widths=(3, 4), pairs="all").double().eval()
    every = full(preds, labels, [True, True, True], phi, per_task=True)
    assert (every > 0).all()


def test_pairwise_normalisations():
    reg = PairwiseTaskConsistency(
        [3, 1, 3], 4, kinds=["categorical", "depth", "normal"], widths=(4,), ignore_index=-1
    )
    logits = randn(2, 3, 2, 2, seed=1).requires_grad_(True)
    torch.manual_seed(0)
    hard = reg._normalise(logits, 0, False)
    assert set(hard.sum(1).flatten().tolist()) == {1.0} and set(hard.unique().tolist()) <= {0, 1}
    (g,) = torch.autograd.grad((hard * randn(2, 3, 2, 2, seed=2)).sum(), logits)
    assert g.abs().sum() > 0  # straight-through: the soft sample's gradient
    labels = torch.tensor([[[0, 2], [-1, 1]]])
    onehot = reg._normalise(labels, 0, True)
    assert onehot[0, :, 1, 0].tolist() == [0.0, 0.0, 0.0]
    assert onehot[0, :, 0, 1].tolist() == [0.0, 0.0, 1.0]
    depth = torch.tensor([[[[1.0, 4.0]]], [[[2.0, 1.0]]]])
    torch.testing.assert_close(
        reg._normalise(depth, 1, True), depth / torch.tensor([4.0, 2.0]).view(2, 1, 1, 1)
    )
    normals = randn(1, 3, 2, 2, seed=3)
    torch.testing.assert_close(reg._normalise(normals, 2, False), (normals + 1) / 2)
    with pytest.raises(ValueError, match=r"categorical labels must lie in \[0, 3\)"):
        reg._normalise(torch.tensor([[3]]), 0, True)


def test_pairwise_pair_codes_and_param_groups():
    k = 4
    codes = [
        PairwiseTaskConsistency.pair_index(s, t, k) for s, t in itertools.permutations(range(k), 2)
    ]
    assert codes == list(range(k * (k - 1)))
    with pytest.raises(ValueError, match="not an ordered pair"):
        PairwiseTaskConsistency.pair_index(1, 1, k)
    reg = PairwiseTaskConsistency([2, 2], 8, widths=(4, 8), film_lr=1e-5)
    groups = reg.param_groups()
    assert groups[1]["lr"] == 1e-5
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in reg.film_parameters()}
    everything = {id(p) for g in groups for p in g["params"]}
    assert everything == {id(p) for p in reg.parameters()}
    for p in reg.film_parameters():
        assert p.shape[1] == 2
    assert torch.equal(reg.blocks[0].gamma, torch.ones(4, 2))
    assert torch.equal(reg.blocks[0].beta, torch.zeros(4, 2))


def test_pairwise_validation():
    with pytest.raises(ValueError, match=r"widths\[-1\] = 4\) must have the features' 8"):
        PairwiseTaskConsistency([2, 2], 8, widths=(4,))
    with pytest.raises(ValueError, match="kinds must give one of"):
        PairwiseTaskConsistency([2, 2], 4, widths=(4,), kinds=["seg", "none"])
    reg, preds, labels, labelled, phi = _pairwise_setup()
    with pytest.raises(ValueError, match=r"labelled has shape \(2,\)"):
        reg(preds, labels, torch.tensor([True, False]), phi)
    with pytest.raises(TypeError, match="bool tensor"):
        reg(preds, labels, torch.ones(3), phi)
    with pytest.raises(ValueError, match="label is None"):
        reg(preds, [labels[0], labels[1], None], torch.tensor([False, False, True]), phi)
    with pytest.raises(ValueError, match="the mapping network gives"):
        reg(preds, labels, labelled, randn(4, 4, 2, 2))
    with pytest.raises(ValueError, match=r"prediction 1 has shape"):
        reg([preds[0], preds[0], preds[2]], labels, labelled, phi)


def test_pairwise_short_training_run_lowers_the_consistency_term():
    """Two tasks that are the same function: the unlabelled one learns from the other's labels
    through the consistency term alone, and the term falls."""
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 8), nn.Tanh())
    heads = nn.ModuleList([nn.Linear(8, 3), nn.Linear(8, 3)])
    reg = PairwiseTaskConsistency(
        [3, 3], 8, kinds=["categorical", "categorical"], widths=(16, 8), dense=False
    )
    opt = torch.optim.Adam(
        [{"params": [*trunk.parameters(), *heads.parameters()]}, *reg.param_groups()], lr=0.01
    )
    x = torch.randn(256, 4, generator=gen(0))
    y = (x[:, 0] > 0.5).long() + (x[:, 0] > -0.5).long()
    labelled = torch.zeros(256, 2, dtype=torch.bool)
    labelled[:128, 0] = True  # half the images label task 0 only, the rest task 1 only
    labelled[128:, 1] = True

    def step() -> float:
        z = trunk(x)
        preds = [h(z) for h in heads]
        sup = sum(
            F.cross_entropy(p[labelled[:, t]], y[labelled[:, t]]) for t, p in enumerate(preds)
        )
        cons = reg(preds, [y, y], labelled, z)
        opt.zero_grad()
        (sup + cons).backward()
        opt.step()
        return cons.item()

    first = step()
    for _ in range(80):
        last = step()
    assert last < 0.5 * first, (first, last)


def test_pairwise_mapping_network_is_input_layer_then_film_blocks():
    torch.manual_seed(0)
    reg = PairwiseTaskConsistency([2, 3], 4, widths=(3, 4), pool=True).double().eval()
    with torch.no_grad():
        for p in reg.film_parameters():
            p.copy_(torch.randn(p.shape, generator=gen(p.numel()), dtype=F64))
    x = randn(2, 3, 8, 8, seed=1)
    code = torch.tensor([1, 0])  # the pairs (1, 0) and (0, 1)
    inp = reg.inputs[1]
    h = torch.relu(
        F.batch_norm(
            inp[0](x),
            inp[1].running_mean,
            inp[1].running_var,
            inp[1].weight,
            inp[1].bias,
            eps=inp[1].eps,
        )
    )
    for block in reg.blocks:
        bn = block.norm
        h = F.batch_norm(
            block.layer(h), bn.running_mean, bn.running_var, bn.weight, bn.bias, eps=bn.eps
        )
        h = h * block.gamma[:, code].T[:, :, None, None] + block.beta[:, code].T[:, :, None, None]
        h = F.max_pool2d(torch.relu(h), 2)
    torch.testing.assert_close(reg.mapping(x, 1, code), h)
    assert h.shape == (2, 4, 2, 2)


def test_saliency_per_task_terms_through_the_optimizer_equal_the_direct_gradient():
    """opt.backward(L + μ R_i) with shared= (no aggregator) gives ∇(Σ L + μ R) everywhere."""
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Linear(5, 6), nn.Tanh()).double()
    heads = nn.ModuleList(nn.Sequential(nn.Linear(6, 3), nn.Tanh(), nn.Linear(3, 1)) for _ in "ab")
    heads.double()
    reg = SaliencyRelation(2, dtype=F64)
    x, ys = randn(8, 5, seed=1), [randn(8, seed=2), randn(8, seed=3)]
    params = [*trunk.parameters(), *heads.parameters(), reg.pair_weights]

    def terms() -> torch.Tensor:
        z = trunk(x)
        outs = [h(z).squeeze(1) for h in heads]
        losses = torch.stack([F.mse_loss(o, y) for o, y in zip(outs, ys)])
        return losses + 0.7 * reg(z, outs, per_task=True)

    want = torch.autograd.grad(terms().sum(), params)
    opt = mtl_optim.MTLOptimizer(
        [{"params": params[:-1]}, reg.param_group()],
        torch.optim.SGD,
        lr=0.1,
        shared=list(trunk.parameters()),
    )
    opt.register_gradient_hook(lambda *_: None, needs_jacobian=True)  # per-task passes
    opt.backward(terms())
    for p, g in zip(params, want):
        torch.testing.assert_close(p.grad, g)
