"""Tests for medsemi.ops.pseudo_label (spec ust-run.md 3.2 and 4.1 SymGD, section 7)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medsemi.data.contract import LabelSpec
from medsemi.ops.boxes import random_boxes
from medsemi.ops.pseudo_label import pseudo_label, symgd_fuse

EXCL = LabelSpec("exclusive", ("bg", "lv", "myo", "rv"))
MULTI = LabelSpec("multilabel", ("cup", "disc"))


def ref_exclusive(logits: np.ndarray, tau: float) -> tuple[np.ndarray, np.ndarray]:
    z = logits.astype(np.float64)
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    return p.argmax(axis=1), (p.max(axis=1) > tau).astype(np.float32)


def ref_multilabel(logits: np.ndarray, tau: float) -> tuple[np.ndarray, np.ndarray]:
    p = 1 / (1 + np.exp(-logits.astype(np.float64)))
    return (p >= 0.5).astype(np.float32), ((p >= tau) | (p <= 1 - tau)).astype(np.float32)


@pytest.mark.parametrize("spatial", [(16, 16), (6, 8, 8)])
def test_pseudo_label_matches_reference(spatial: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    logits = torch.randn(3, 4, *spatial) * 4
    label, mask = pseudo_label(logits, EXCL, 0.95)
    rl, rm = ref_exclusive(logits.numpy(), 0.95)
    assert label.dtype == torch.long and label.shape == (3, *spatial)
    assert mask.dtype == torch.float32 and mask.shape == (3, *spatial)
    assert np.array_equal(label.numpy(), rl)
    # a float32 softmax may sit on the other side of τ than the float64 one for a handful of pixels
    assert (mask.numpy() != rm).mean() < 1e-3 and 0.05 < rm.mean() < 0.95

    logits2 = torch.randn(3, 2, *spatial) * 4
    label2, mask2 = pseudo_label(logits2, MULTI, 0.95)
    rl2, rm2 = ref_multilabel(logits2.numpy(), 0.95)
    assert label2.shape == mask2.shape == (3, 2, *spatial) and label2.dtype == torch.float32
    assert np.array_equal(label2.numpy(), rl2)
    assert (mask2.numpy() != rm2).mean() < 1e-3 and 0.05 < rm2.mean() < 0.95


def test_threshold_comparisons_strict_and_inclusive() -> None:
    # exclusive: two equal logits -> max p = 0.5 exactly; mask is "max p > τ" (strict)
    z = torch.zeros(1, 2, 1, 1)
    assert float(pseudo_label(z, LabelSpec("exclusive", ("bg", "fg")), 0.5)[1]) == 0.0
    assert float(pseudo_label(z, LabelSpec("exclusive", ("bg", "fg")), 0.4999)[1]) == 1.0
    # multi-label: logit 0 -> p = 0.5; label p >= 0.5 -> 1; mask p >= τ or p <= 1 - τ (inclusive)
    lab, msk = pseudo_label(torch.zeros(1, 2, 1, 1), MULTI, 0.5)
    assert lab.flatten().tolist() == [1.0, 1.0] and msk.flatten().tolist() == [1.0, 1.0]
    lab, msk = pseudo_label(torch.tensor([3.0, -3.0]).view(1, 2, 1, 1), MULTI, 0.95)
    assert lab.flatten().tolist() == [1.0, 0.0] and msk.flatten().tolist() == [1.0, 1.0]
    with pytest.raises(ValueError, match="pseudo_label"):
        pseudo_label(torch.zeros(1, 3, 4, 4), MULTI, 0.9)


def _teacher_outputs(spec: LabelSpec, spatial: tuple[int, ...], seed: int):
    g = torch.Generator().manual_seed(seed)
    outs = [pseudo_label(torch.randn(4, spec.num_outputs, *spatial, generator=g) * 3, spec, 0.9)
            for _ in range(3)]
    return outs


def ref_symgd(y0, k0, yul, kul, ylu, klu, box):
    """Pixel loop over the spec text: inside the box take the lu prediction, else the ul one."""
    y0, k0, yul, kul, ylu, klu, box = (t.numpy() for t in (y0, k0, yul, kul, ylu, klu, box))
    yf, ks = np.zeros_like(y0), np.zeros_like(k0)
    for idx in np.ndindex(*y0.shape):
        bidx = (idx[0],) + idx[-box.ndim + 1:]
        inside = box[bidx] != 0
        yf[idx] = ylu[idx] if inside else yul[idx]
        kf = klu[idx] if inside else kul[idx]
        ks[idx] = float(kf != 0 and k0[idx] != 0 and yf[idx] == y0[idx])
    return yf, ks


@pytest.mark.parametrize("spec", [EXCL, MULTI])
def test_symgd_matches_pixel_reference(spec: LabelSpec) -> None:
    (y0, k0), (yul, kul), (ylu, klu) = _teacher_outputs(spec, (12, 12), seed=1)
    box = random_boxes(4, 12, 12, torch.Generator().manual_seed(2))
    yf, ks = symgd_fuse(y0, k0, yul, kul, ylu, klu, box)
    ryf, rks = ref_symgd(y0, k0, yul, kul, ylu, klu, box)
    assert np.array_equal(yf.numpy(), ryf) and np.array_equal(ks.numpy(), rks)
    assert ks.dtype == k0.dtype and yf.dtype == y0.dtype
    assert bool((ks <= k0).all())  # K_s ⊆ K0
    assert 0 < float(ks.sum()) < float(k0.sum())


@pytest.mark.parametrize("spec", [EXCL, MULTI])
def test_symgd_empty_and_full_box_3d(spec: LabelSpec) -> None:
    (y0, k0), (yul, kul), (ylu, klu) = _teacher_outputs(spec, (4, 6, 6), seed=3)
    empty = torch.zeros(4, 4, 6, 6)
    yf, ks = symgd_fuse(y0, k0, yul, kul, ylu, klu, empty)
    assert torch.equal(yf, yul)
    assert torch.equal(ks, (kul * k0 * (yul == y0)).to(k0.dtype))
    assert bool((ks <= k0).all())
    yf, ks = symgd_fuse(y0, k0, yul, kul, ylu, klu, torch.ones(4, 4, 6, 6))
    assert torch.equal(yf, ylu)
    assert torch.equal(ks, (klu * k0 * (ylu == y0)).to(k0.dtype))
    with pytest.raises(ValueError, match="pseudo_label"):
        symgd_fuse(y0, k0, yul, kul, ylu, klu, torch.ones(4, 4, 5, 5))


@pytest.mark.parametrize("spec", [EXCL, MULTI])
def test_no_host_sync_on_meta_device(spec: LabelSpec) -> None:
    """Meta tensors have no data, so any host round trip inside the ops would raise."""
    y, k = pseudo_label(torch.empty(2, spec.num_outputs, 8, 8, device="meta"), spec, 0.95)
    yf, ks = symgd_fuse(y, k, y, k, y, k, torch.empty(2, 8, 8, device="meta"))
    assert yf.shape == y.shape and ks.shape == k.shape and ks.device.type == "meta"
