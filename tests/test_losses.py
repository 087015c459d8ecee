"""Tests for medsemi.losses against slow per-pixel references written from spec ust-run.md 3.3."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from medsemi.data.contract import LabelSpec
from medsemi.losses import seg_loss, weighted_ce, weighted_dice

EXCL = LabelSpec("exclusive", ("bg", "a", "b"))
MULTI = LabelSpec("multilabel", ("cup", "disc"))
EPS = 1e-10


def _pixels(spatial: tuple[int, ...]) -> list[tuple[int, ...]]:
    return list(itertools.product(*(range(s) for s in spatial)))


# ----------------------------------------------------------------------------------------- references
def ref_ce_excl(z: torch.Tensor, y: torch.Tensor, w: torch.Tensor, normalize: str = "all") -> float:
    b, c = z.shape[:2]
    total, wsum, n = 0.0, 0.0, 0
    for i in range(b):
        for pix in _pixels(tuple(z.shape[2:])):
            logits = [float(z[(i, k) + pix]) for k in range(c)]
            lse = math.log(sum(math.exp(v) for v in logits))
            ce = lse - logits[int(y[(i,) + pix])]
            total += ce * float(w[(i,) + pix])
            wsum += float(w[(i,) + pix])
            n += 1
    return total / n if normalize == "all" else total / wsum


def ref_bce_multi(z: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> float:
    total, n = 0.0, 0
    for idx in _pixels(tuple(z.shape)):
        p = 1.0 / (1.0 + math.exp(-float(z[idx])))
        t = float(y[idx])
        total += -(t * math.log(p) + (1 - t) * math.log(1 - p)) * float(w[idx])
        n += 1
    return total / n


def ref_dice_excl(z: torch.Tensor, y: torch.Tensor, w: torch.Tensor, mask_background: bool = False) -> float:
    b, c = z.shape[:2]
    losses = []
    for k in range(c):
        inter = psq = ysq = 0.0
        for i in range(b):
            for pix in _pixels(tuple(z.shape[2:])):
                ex = [math.exp(float(z[(i, j) + pix])) for j in range(c)]
                p = ex[k] / sum(ex)
                t = 1.0 if int(y[(i,) + pix]) == k else 0.0
                m = 1.0 if (k == 0 and not mask_background) else float(w[(i,) + pix])
                inter += p * t * m
                psq += p * p * m
                ysq += t * t * m
        losses.append(1.0 - (2 * inter + EPS) / (psq + ysq + EPS))
    return sum(losses) / c


def ref_dice_multi(z: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> float:
    inter = psq = ysq = 0.0
    for idx in _pixels(tuple(z.shape)):
        p = 1.0 / (1.0 + math.exp(-float(z[idx])))
        t, m = float(y[idx]), float(w[idx])
        inter += p * t * m
        psq += p * p * m
        ysq += t * t * m
    return 1.0 - (2 * inter + EPS) / (psq + ysq + EPS)


def _excl_batch(spatial: tuple[int, ...], seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(2, 3, *spatial, generator=g) * 2
    y = torch.randint(0, 3, (2, *spatial), generator=g)
    w = torch.rand(2, *spatial, generator=g)
    return z, y, w


def _multi_batch(spatial: tuple[int, ...], seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(2, 2, *spatial, generator=g) * 2
    y = (torch.rand(2, 2, *spatial, generator=g) > 0.5).float()
    w = torch.rand(2, 2, *spatial, generator=g)
    return z, y, w


# ----------------------------------------------------------------------------------------- exclusive
@pytest.mark.parametrize("spatial", [(5, 6), (3, 4, 5)])
def test_exclusive_matches_reference(spatial: tuple[int, ...]) -> None:
    z, y, w = _excl_batch(spatial)
    assert weighted_ce(z, y, w, EXCL).item() == pytest.approx(ref_ce_excl(z, y, w), rel=1e-5)
    assert weighted_ce(z, y, w, EXCL, normalize="weight").item() == pytest.approx(
        ref_ce_excl(z, y, w, "weight"), rel=1e-5)
    assert weighted_dice(z, y, w, EXCL).item() == pytest.approx(ref_dice_excl(z, y, w), rel=1e-5)
    assert weighted_dice(z, y, w, EXCL, mask_background=True).item() == pytest.approx(
        ref_dice_excl(z, y, w, True), rel=1e-5)
    total, ce, dice = seg_loss(z, y, w, EXCL)
    assert total.item() == pytest.approx(ref_ce_excl(z, y, w) + ref_dice_excl(z, y, w), rel=1e-5)
    assert torch.allclose(total, ce + dice)


def test_exclusive_weight_none_is_ones() -> None:
    z, y, _ = _excl_batch((6, 5))
    ones = torch.ones(y.shape)
    for a, b in zip(seg_loss(z, y, None, EXCL), seg_loss(z, y, ones, EXCL)):
        assert torch.allclose(a, b)
    # unweighted CE with "all" normalisation is the plain mean cross-entropy
    assert torch.allclose(weighted_ce(z, y, None, EXCL), torch.nn.functional.cross_entropy(z, y))


@pytest.mark.parametrize("num_classes", [2, 3])
def test_background_quirk(num_classes: int) -> None:
    """Changing weights only on background pixels leaves D_0 unchanged by default, changes it when masked.

    D_0 is recovered from the total as ``C * loss - sum_{k>=1} D_k`` with D_k from the spec formula.
    """
    spec = LabelSpec("exclusive", tuple(f"c{k}" for k in range(num_classes)))
    g = torch.Generator().manual_seed(5)
    z = torch.randn(2, num_classes, 6, 6, generator=g)
    y = torch.randint(0, num_classes, (2, 6, 6), generator=g)
    y[:, :2] = 0
    w1 = torch.rand(2, 6, 6, generator=g)
    w2 = w1.clone()
    w2[y == 0] = torch.rand(int((y == 0).sum()), generator=g)

    def d_fg(w: torch.Tensor) -> float:  # sum of the foreground-class Dice terms, spec formula
        p = torch.softmax(z.double(), 1)
        total = 0.0
        for k in range(1, num_classes):
            t, m = (y == k).double(), w.double()
            pk = p[:, k]
            total += float(1 - (2 * (pk * t * m).sum() + EPS) / ((pk * pk * m).sum() + (t * m).sum() + EPS))
        return total

    def d0(w: torch.Tensor, mask_background: bool) -> float:
        loss = weighted_dice(z, y, w, spec, mask_background=mask_background).item()
        return num_classes * loss - d_fg(w)

    assert d0(w1, False) == pytest.approx(d0(w2, False), abs=1e-5)
    assert abs(d0(w1, True) - d0(w2, True)) > 1e-3
    # and the total does depend on the background weights through the foreground classes' sum p^2 m
    assert weighted_dice(z, y, w1, spec).item() != pytest.approx(weighted_dice(z, y, w2, spec).item(), abs=1e-5)


# ----------------------------------------------------------------------------------------- multilabel
@pytest.mark.parametrize("spatial", [(5, 6), (3, 4, 5)])
def test_multilabel_matches_reference(spatial: tuple[int, ...]) -> None:
    z, y, w = _multi_batch(spatial)
    assert weighted_ce(z, y, w, MULTI).item() == pytest.approx(ref_bce_multi(z, y, w), rel=1e-5)
    assert weighted_dice(z, y, w, MULTI).item() == pytest.approx(ref_dice_multi(z, y, w), rel=1e-5)
    total, ce, dice = seg_loss(z, y, w, MULTI)
    assert total.item() == pytest.approx(ref_bce_multi(z, y, w) + ref_dice_multi(z, y, w), rel=1e-5)
    assert torch.allclose(total, ce + dice)


def test_multilabel_dice_pools_channels() -> None:
    # One pooled Dice differs from the mean of per-channel Dice when channels have different sizes.
    z, y, w = _multi_batch((6, 6), seed=2)
    y[:, 0] = 0
    y[:, 0, :1, :1] = 1
    pooled = weighted_dice(z, y, w, MULTI).item()
    per_ch = sum(ref_dice_multi(z[:, k:k + 1], y[:, k:k + 1], w[:, k:k + 1]) for k in range(2)) / 2
    assert pooled == pytest.approx(ref_dice_multi(z, y, w), rel=1e-5)
    assert abs(pooled - per_ch) > 1e-3


def test_multilabel_weight_broadcast() -> None:
    z, y, w = _multi_batch((4, 5))
    w1 = w[:, :1]
    full = w1.expand_as(z).contiguous()
    for a, b in zip(seg_loss(z, y, w1, MULTI), seg_loss(z, y, full, MULTI)):
        assert torch.allclose(a, b)


# ----------------------------------------------------------------------------------------- invariants
@pytest.mark.parametrize("spec,maker", [(EXCL, _excl_batch), (MULTI, _multi_batch)])
def test_zero_weight_gives_zero_ce(spec: LabelSpec, maker) -> None:
    z, y, w = maker((5, 5))
    zero = torch.zeros_like(w)
    assert weighted_ce(z, y, zero, spec).item() == 0.0
    assert weighted_ce(z, y, zero, spec, normalize="weight").item() == 0.0
    z.requires_grad_(True)
    weighted_ce(z, y, zero, spec, normalize="weight").backward()
    assert torch.isfinite(z.grad).all() and z.grad.abs().sum() == 0


def test_perfect_prediction_dice_near_zero() -> None:
    _, y, w = _excl_batch((6, 6))
    y[0, 0, :3] = torch.tensor([0, 1, 2])  # every class present
    z = (torch.nn.functional.one_hot(y, 3).permute(0, 3, 1, 2).float() - 0.5) * 60
    assert weighted_dice(z, y, w, EXCL).item() < 1e-6
    assert weighted_dice(z, y, w, EXCL, mask_background=True).item() < 1e-6
    assert weighted_ce(z, y, w, EXCL).item() < 1e-6
    _, ym, wm = _multi_batch((3, 4, 5))
    zm = (ym - 0.5) * 60
    assert weighted_dice(zm, ym, wm, MULTI).item() < 1e-6
    # and a bad prediction is far from zero
    assert weighted_dice(-zm, ym, wm, MULTI).item() > 0.9


def test_float32_under_autocast_and_half_logits() -> None:
    z, y, w = _excl_batch((6, 6))
    ref = seg_loss(z, y, w, EXCL)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = seg_loss(z.bfloat16(), y, w, EXCL)
    for a, b in zip(out, ref):
        assert a.dtype == torch.float32
        assert torch.allclose(a, b, atol=2e-2)


def test_gradients_flow() -> None:
    z, y, w = _excl_batch((6, 6))
    z.requires_grad_(True)
    seg_loss(z, y, w, EXCL)[0].backward()
    assert torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0


def test_bad_inputs() -> None:
    z, y, w = _excl_batch((4, 4))
    with pytest.raises(ValueError, match="losses.py"):
        seg_loss(z[:, :2], y, w, EXCL)  # wrong channel count
    with pytest.raises(ValueError, match="losses.py"):
        seg_loss(z, y[:, :3], w, EXCL)
    with pytest.raises(ValueError, match="losses.py"):
        seg_loss(z, y, w[:, :3], EXCL)
    with pytest.raises(TypeError, match="losses.py"):
        seg_loss(z, y.float(), w, EXCL)
    with pytest.raises(TypeError, match="losses.py"):
        seg_loss(z, y, w)  # no label spec
    with pytest.raises(ValueError, match="losses.py"):
        weighted_ce(z, y, w, EXCL, normalize="mean")  # type: ignore[arg-type]
    zm, ym, wm = _multi_batch((4, 4))
    with pytest.raises(ValueError, match="losses.py"):
        seg_loss(zm, ym[:, :1], wm, MULTI)
    with pytest.raises(ValueError, match="losses.py"):
        seg_loss(zm, ym, wm[..., :2], MULTI)
