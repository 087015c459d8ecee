"""Tests for medsemi.ops.hardness (spec ust-run.md 3.4 item 1, 4.3 step 8, 6 item 3)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medsemi.data.contract import LabelSpec
from medsemi.ops.hardness import hardness, smoothed_dice

PROSTATE = LabelSpec("exclusive", ("bg", "prostate"))
MNMS = LabelSpec("exclusive", ("bg", "lv", "myo", "rv"))
FUNDUS = LabelSpec("multilabel", ("cup", "disc"))


def ref_dice(p: np.ndarray, g: np.ndarray, rule: str) -> float:
    """UST utils/metrics.py dice_coefficient_numpy as described in spec 3.4 item 1."""
    p, g = p.astype(bool), g.astype(bool)
    if rule == "ust" and p.sum() == 0 and g.sum() == 0:
        return 0.0
    return (2 * np.logical_and(p, g).sum() + 1) / (p.sum() + g.sum() + 1.001)


def ref_hardness(s: np.ndarray, t: np.ndarray, classes: list[int] | None, rule: str, ignore: bool
                 ) -> list[float]:
    out = []
    for i in range(s.shape[0]):
        if classes is None:  # multi-label channels
            pairs = [(s[i, c], t[i, c]) for c in range(s.shape[1])]
        else:
            pairs = [(s[i] == c, t[i] == c) for c in classes]
        if ignore:
            pairs = [(a, b) for a, b in pairs if a.any() or b.any()]
            if not pairs:
                out.append(0.0)
                continue
        out.append(1 - sum(ref_dice(a, b, rule) for a, b in pairs) / len(pairs))
    return out


@pytest.mark.parametrize("rule", ["ust", "midss"])
def test_smoothed_dice_matches_reference(rule: str) -> None:
    torch.manual_seed(0)
    p = torch.rand(5, 3, 10, 12) < 0.3
    g = torch.rand(5, 3, 10, 12) < 0.3
    p[0, 1] = False
    g[0, 1] = False  # empty-empty
    p[1, 2] = False  # empty prediction only
    d = smoothed_dice(p, g, rule)
    assert d.shape == (5, 3) and d.dtype == torch.float64
    ref = [[ref_dice(p[i, c].numpy(), g[i, c].numpy(), rule) for c in range(3)] for i in range(5)]
    np.testing.assert_allclose(d.numpy(), ref, rtol=1e-15, atol=0)
    assert float(d[0, 1]) == (0.0 if rule == "ust" else 1 / 1.001)
    # 3D input and 0/1 float input give the same
    d3 = smoothed_dice(p.float().view(5, 3, 2, 5, 12), g.float().view(5, 3, 2, 5, 12), rule)
    assert torch.equal(d3, d)


@pytest.mark.parametrize("spec", [PROSTATE, MNMS, FUNDUS])
@pytest.mark.parametrize("rule", ["ust", "midss"])
@pytest.mark.parametrize("ignore", [False, True])
def test_hardness_matches_reference(spec: LabelSpec, rule: str, ignore: bool) -> None:
    g = torch.Generator().manual_seed(len(spec.class_names))
    b, hh, ww = 6, 12, 12
    if spec.multilabel:
        s = (torch.rand(b, 2, hh, ww, generator=g) < 0.2).float()
        t = (torch.rand(b, 2, hh, ww, generator=g) < 0.2).float()
        s[0, 0] = 0
        t[0, 0] = 0
        s[1] = 0
        t[1] = 0
        classes = None
    else:
        k = spec.num_outputs
        s = torch.randint(0, k, (b, hh, ww), generator=g)
        t = torch.randint(0, k, (b, hh, ww), generator=g)
        s[0][s[0] == 1] = 0
        t[0][t[0] == 1] = 0  # class 1 absent in both in sample 0
        s[1] = 0
        t[1] = 0  # all background
        t[2] = s[2]  # perfect agreement
        classes = list(spec.foreground_indices)
    h = hardness(s, t, spec, rule, ignore_absent_in_both=ignore)
    assert h.shape == (b,) and h.dtype == torch.float64
    ref = ref_hardness(s.numpy(), t.numpy(), classes, rule, ignore)
    np.testing.assert_allclose(h.numpy(), ref, rtol=0, atol=1e-14)
    if rule == "ust" and not ignore:
        assert float(h[1]) == 1.0  # all-empty sample is maximally hard (spec 6 item 3)
        assert float(h[0]) >= 1 / len(spec.foreground_indices) - 1e-12
    if ignore:
        assert float(h[1]) == 0.0


def test_hardness_tiny_but_positive_for_large_agreeing_masks() -> None:
    lab = torch.ones(2, 64, 64, dtype=torch.long)
    h = hardness(lab, lab.clone(), PROSTATE)
    n = 64 * 64
    expect = 1 - (2 * n + 1) / (2 * n + 1.001)
    assert bool((h > 0).all())
    np.testing.assert_allclose(h.numpy(), [expect, expect], rtol=1e-6)


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match="hardness"):
        smoothed_dice(torch.zeros(2, 1, 4, 4), torch.zeros(2, 1, 4, 5))
    with pytest.raises(ValueError, match="hardness"):
        smoothed_dice(torch.zeros(2, 1, 4, 4), torch.zeros(2, 1, 4, 4), empty_rule="other")  # type: ignore


@pytest.mark.parametrize("ignore", [False, True])
def test_no_host_sync_on_meta_device(ignore: bool) -> None:
    """Meta tensors have no data, so any host round trip inside the op would raise."""
    lab = torch.empty(3, 8, 8, dtype=torch.long, device="meta")
    h = hardness(lab, lab, MNMS, "ust", ignore_absent_in_both=ignore)
    assert h.shape == (3,) and h.device.type == "meta"
