"""Tests for VerSemi's training ops (spec versemi.md 3.0-3.3, 3.7, notes N2/N3), each against a slow
reference written from the spec text."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from medsemi.nets.task_prompted import TaskPromptedVNet
from medsemi.ops.versemi_ops import (
    LossWeights,
    aggregate_task_probs,
    binarize_label,
    box_mask,
    box_supervision_loss,
    consistency_loss,
    draw_box_ratio,
    foreground_prob,
    mix,
    sigmoid_rampup,
    soft_dice_loss,
    stage1_losses,
    stage1_mix_queries,
    stage2_losses,
    stage2_unlabeled_queries,
    supervised_loss,
    synthetic_cutmix,
    task_specific_targets,
    train_dice,
)

S = (16, 16, 16)


def ref_dice(p: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """1 - (2 sum p y + 1e-5) / (sum p^2 + sum y^2 + 1e-5), float64, over the whole batch."""
    p, y = p.double(), y.double()
    return 1 - (2 * (p * y).sum() + 1e-5) / ((p**2).sum() + (y**2).sum() + 1e-5)


def _binary(*shape: int) -> torch.Tensor:
    return (torch.rand(shape) > 0.6).long()


def test_soft_dice_is_batch_global() -> None:
    torch.manual_seed(0)
    p, y = torch.rand(3, *S), _binary(3, *S)
    y[1] = 0
    y[1, :2, :2, :2] = 1  # a tiny target next to large ones: batch-global != mean of per-sample Dice
    d = soft_dice_loss(p, y)
    assert torch.allclose(d.double(), ref_dice(p, y), atol=1e-6)
    per_sample = torch.stack([ref_dice(p[i], y[i]) for i in range(3)]).mean()
    assert not torch.allclose(d.double(), per_sample, atol=1e-4)  # not a mean of per-sample Dice
    assert soft_dice_loss(torch.zeros(2, 4), torch.zeros(2, 4)) == 0  # eps / eps
    with pytest.raises(ValueError, match="versemi_ops.py"):
        soft_dice_loss(p, y[:2])


def test_foreground_prob_and_supervised_loss() -> None:
    torch.manual_seed(1)
    z = torch.randn(2, 2, *S)
    y = _binary(2, *S)
    p = foreground_prob(z)
    torch.testing.assert_close(p, torch.sigmoid(z[:, 1] - z[:, 0]))
    dice, ce = supervised_loss(z, y)
    logp = torch.log_softmax(z.double(), 1)
    ref_ce = -(torch.where(y.bool(), logp[:, 1], logp[:, 0])).mean()
    assert torch.allclose(ce.double(), ref_ce, atol=1e-6)
    assert torch.allclose(dice.double(), ref_dice(p, y), atol=1e-6)
    assert torch.equal(binarize_label(torch.tensor([0, 1, 2, 1])), torch.tensor([0, 1, 0, 1]))


@pytest.mark.parametrize("ratio,side", [(2 / 3, 64), (0.3, 28), (0.6, 57)])
def test_box_mask_96(ratio: float, side: int) -> None:
    """Spec 7: side int(96 r), exactly s^3 zeros per sample, start in [0, 96 - s)."""
    g = torch.Generator().manual_seed(0)
    m = box_mask(4, (96, 96, 96), ratio, generator=g)
    assert m.dtype == torch.int64 and m.shape == (4, 96, 96, 96)
    for i in range(4):
        inside = m[i] == 0
        assert int(inside.sum()) == side**3
        idx = inside.nonzero()
        lo, hi = idx.min(0).values, idx.max(0).values
        assert torch.equal(hi - lo + 1, torch.tensor([side] * 3))  # one solid cube
        assert int(lo.max()) < 96 - side


def test_box_mask_start_distribution_and_errors() -> None:
    g = torch.Generator().manual_seed(1)
    m = box_mask(400, (8, 8, 8), 0.5, generator=g)  # side 4, starts uniform in {0, 1, 2, 3}
    starts = (m == 0).any(dim=(2, 3)).float().argmax(1)  # first boxed index on axis 0
    assert set(starts.tolist()) == {0, 1, 2, 3}
    with pytest.raises(ValueError, match="versemi_ops.py"):
        box_mask(1, (8, 8, 8), 1.0)
    with pytest.raises(ValueError, match="versemi_ops.py"):
        box_mask(1, (8, 8, 8), 0.1)
    r = draw_box_ratio(0.3, 0.6, torch.Generator().manual_seed(0))
    assert 0.3 <= r < 0.6


def test_mix_matches_formula() -> None:
    torch.manual_seed(2)
    m = box_mask(2, S, 0.5)
    a, b = torch.randn(2, 3, *S), torch.randn(2, 3, *S)
    out = mix(a, b, m)
    ref = a * m.unsqueeze(1) + b * (1 - m.unsqueeze(1))
    torch.testing.assert_close(out, ref)
    ya, yb = _binary(2, *S), _binary(2, *S)
    assert torch.equal(mix(ya, yb, m), ya * m + yb * (1 - m))
    with pytest.raises(ValueError, match="versemi_ops.py"):
        mix(a, b, m[:1])


def _ref_cutmix(x, y, t, m):  # noqa: ANN001, ANN202
    """Pair i with i + B/2; per-pair Python loop, straight from spec 3.1 steps 2-5."""
    h = x.shape[0] // 2
    xs, ys, tas, tbs = [], [], [], []
    for i in range(h):
        mi = m[i]
        xs.append(x[i] * mi + x[i + h] * (1 - mi))
        ymix = y[i] * mi + y[i + h] * (1 - mi)
        ys.append(ymix)
        if int(t[i]) == int(t[i + h]):
            tas.append(ymix)
            tbs.append(ymix)
        else:
            tas.append(y[i] * mi)
            tbs.append(y[i + h] * (1 - mi))
    return torch.stack(xs), torch.stack(ys), torch.stack(tas), torch.stack(tbs)


def test_synthetic_cutmix_and_targets() -> None:
    torch.manual_seed(3)
    x, y = torch.randn(6, 1, *S), _binary(6, *S)
    t = torch.tensor([1, 2, 4, 1, 3, 4])  # pairs (1,1) same, (2,3), (4,4) same
    m = box_mask(3, S, 2 / 3)
    sm = synthetic_cutmix(x, y, t, m)
    rx, ry, ra, rb = _ref_cutmix(x, y, t, m)
    torch.testing.assert_close(sm.image, rx)
    assert torch.equal(sm.label, ry) and torch.equal(sm.target_a, ra) and torch.equal(sm.target_b, rb)
    # union label: a's fg outside the box, b's fg inside
    assert torch.equal(sm.label.bool(), (y[:3].bool() & m.bool()) | (y[3:].bool() & ~m.bool()))
    # same-task override (spec 7): both targets equal the mixed label
    for i in (0, 2):
        assert torch.equal(sm.target_a[i], sm.label[i]) and torch.equal(sm.target_b[i], sm.label[i])
    assert not torch.equal(sm.target_a[1], sm.label[1])
    assert torch.equal(stage1_mix_queries(sm), torch.tensor([[5, 1, 1], [5, 2, 3], [5, 4, 4]]))
    ta, tb = task_specific_targets(y[:3], y[3:], m, t[:3], t[3:])
    assert torch.equal(ta, ra) and torch.equal(tb, rb)
    with pytest.raises(ValueError, match="even batch"):
        synthetic_cutmix(x[:5], y[:5], t[:5], m)


def test_aggregate_max_and_detach() -> None:
    torch.manual_seed(4)
    probs = torch.rand(2, 4, *S, requires_grad=True)
    q = aggregate_task_probs(probs)
    ref = probs[:, 0]
    for k in range(1, 4):
        ref = torch.maximum(ref, probs[:, k])
    torch.testing.assert_close(q, ref)
    q.sum().backward()
    onehot_argmax = torch.nn.functional.one_hot(probs.argmax(1), 4).movedim(-1, 1).float()
    torch.testing.assert_close(probs.grad, onehot_argmax)  # gradient goes to the max head only (N3)
    assert not aggregate_task_probs(probs, detach=True).requires_grad
    s = torch.rand(2, *S)
    assert torch.allclose(consistency_loss(s, q).double(), ref_dice(s, q.detach()), atol=1e-6)


def test_box_supervision_intended_and_compat() -> None:
    torch.manual_seed(5)
    s, y = torch.rand(3, *S), _binary(3, *S)
    m = box_mask(3, S, 0.5)
    box = 1 - m
    intended = box_supervision_loss(s, y, m)
    assert torch.allclose(intended.double(), ref_dice(s * box, y * box), atol=1e-6)
    # literal original broadcast (N2): (B,1,*S) mask times (B,*S) tensors -> (B,B,*S)
    img_box = (1 - m).unsqueeze(1)
    compat = box_supervision_loss(s, y, m, compat_cons_broadcast=True)
    bs, by = s * img_box, y * img_box
    assert bs.shape == (3, 3, *S)
    assert torch.allclose(compat.double(), ref_dice(bs, by), atol=1e-6)
    assert not torch.allclose(compat, intended, atol=1e-4)


def test_rampup_and_weights() -> None:
    assert sigmoid_rampup(0, 40) == pytest.approx(math.exp(-5))
    assert sigmoid_rampup(20, 40) == pytest.approx(math.exp(-5 * 0.25))
    assert sigmoid_rampup(40, 40) == 1.0 and sigmoid_rampup(100, 40) == 1.0
    assert sigmoid_rampup(-3, 40) == pytest.approx(math.exp(-5))
    assert sigmoid_rampup(5, 0) == 1.0
    w = LossWeights(unsup=0.1, rampup_epochs=40).at(20)
    assert w.unsup == pytest.approx(0.1 * math.exp(-1.25)) and w.cons == pytest.approx(math.exp(-1.25))
    assert w.sup == 1.0 and w.chaos == 1.0 and w.spec == 1.0
    assert LossWeights().at(0) == LossWeights()  # ramp off by default


def test_train_dice() -> None:
    p = torch.tensor([0.9, 0.2, 0.7, 0.1])
    y = torch.tensor([1, 1, 0, 0])
    assert float(train_dice(p, y)) == pytest.approx(2 * 1 / (2 + 2))


def test_stage_losses_match_reference() -> None:
    torch.manual_seed(6)
    b = 4
    y = _binary(b, *S)
    t = torch.tensor([1, 2, 1, 4])
    x = torch.randn(b, 1, *S)
    sm = synthetic_cutmix(x, y, t, box_mask(2, S, 2 / 3))
    sup = torch.randn(b, 2, *S)
    mixl = torch.randn(2, 3, 2, *S)
    w = LossWeights(sup=0.5, chaos=2.0, spec=3.0)
    out = stage1_losses(sup, y, mixl, sm, w)
    p = lambda z: torch.softmax(z.double(), -4)[..., 1, :, :, :]  # noqa: E731
    ce = torch.nn.functional.cross_entropy(sup.double(), y)
    ref_sup = ref_dice(p(sup), y) + ce
    ref_chaos = ref_dice(p(mixl[:, 0]), sm.label)
    ref_spec = 0.5 * (ref_dice(p(mixl[:, 1]), sm.target_a) + ref_dice(p(mixl[:, 2]), sm.target_b))
    ref = 0.5 * ref_sup + 2.0 * ref_chaos + 3.0 * ref_spec
    assert torch.allclose(out["loss"].double(), ref, atol=1e-5)
    assert torch.allclose(out["spec"].double(), ref_spec, atol=1e-6)

    # stage 2
    m2 = box_mask(b, S, 0.45)
    ls = torch.randn(2, 2, *S)
    ul = torch.randn(b, 5, 2, *S, requires_grad=True)
    assert torch.equal(stage2_unlabeled_queries(), torch.tensor([5, 1, 2, 3, 4]))
    for compat in (False, True):
        w2 = LossWeights(unsup=0.7)
        out2 = stage2_losses(sup, y, ls, sm.label, ul, m2, w2, compat_cons_broadcast=compat)
        pu = p(ul.detach())
        s, q = pu[:, 0], pu[:, 1:].amax(1)
        box = 1 - m2
        if compat:
            ref_cons = ref_dice(s * box.unsqueeze(1), y * box.unsqueeze(1))
        else:
            ref_cons = ref_dice(s * box, y * box)
        ref2 = ref_sup + 0.7 * ref_dice(s, q) + ref_cons + ref_dice(p(ls), sm.label)
        assert torch.allclose(out2["loss"].double(), ref2, atol=1e-5)
    # detach_aggregate: the consistency term sends no gradient into the real-task heads
    g_att = torch.autograd.grad(stage2_losses(sup, y, ls, sm.label, ul, m2)["chaos"], ul)[0]
    l_det = stage2_losses(sup, y, ls, sm.label, ul, m2, detach_aggregate=True)["chaos"]
    g_det = torch.autograd.grad(l_det, ul)[0]
    assert g_att[:, 1:].abs().sum() > 0
    assert g_det[:, 1:].abs().sum() == 0 and g_det[:, 0].abs().sum() > 0


def test_stage1_step_shared_equals_naive() -> None:
    """The stage-1 recipe (report) through forward_tasks equals the original's 4 separate forwards."""
    torch.manual_seed(7)
    net = TaskPromptedVNet(base_filters=2).double().train()
    net2 = copy.deepcopy(net)
    x = torch.randn(4, 1, 32, 32, 32, dtype=torch.float64)
    y = _binary(4, 32, 32, 32)
    t = torch.tensor([1, 3, 1, 2])
    sm = synthetic_cutmix(x, y, t, box_mask(2, (32, 32, 32), 2 / 3))
    # shared: 2 backbone passes
    loss = stage1_losses(net(x, t), y, net.forward_tasks(sm.image, stage1_mix_queries(sm)), sm)["loss"]
    loss.backward()
    # naive: 4 forwards as in train.py
    five = torch.full((2,), 5)
    mixl = torch.stack([net2(sm.image, five), net2(sm.image, sm.task_a), net2(sm.image, sm.task_b)], 1)
    loss2 = stage1_losses(net2(x, t), y, mixl, sm)["loss"]
    loss2.backward()
    torch.testing.assert_close(loss, loss2, atol=1e-10, rtol=1e-10)
    for (n, a), b in zip(net.named_parameters(), net2.parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-9, rtol=1e-6, msg=n)
