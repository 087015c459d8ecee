"""Tests for medsemi.ops.boxes and medsemi.ops.copy_paste (spec ust-run.md 4.1, section 7)."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from scipy.stats import ks_2samp

from medsemi.ops.boxes import all_cover_boxes, random_boxes, sample_box_params
from medsemi.ops.copy_paste import paste


def reference_box(rng: random.Random, height: int, width: int, weighted: bool = True
                  ) -> tuple[int, int, int, int]:
    """The original per-sample loop of spec 4.1 (y, x, h, w); ``weighted=False`` is a deliberately wrong
    sampler (no rejection over the aspect) used to show the comparison has power."""
    area = rng.uniform(0.02, 0.4) * height * width
    while True:
        r = rng.uniform(0.3, 1 / 0.3)
        w = int(math.sqrt(area / r * (width / height)))
        h = int(math.sqrt(area * r * (height / width)))
        if not weighted:
            w, h = min(w, width), min(h, height)
            return rng.randrange(height - h + 1), rng.randrange(width - w + 1), h, w
        x = rng.randrange(width)
        y = rng.randrange(height)
        if x + w <= width and y + h <= height:
            return y, x, h, w


def stats_from_params(y, x, h, w, height, width) -> dict[str, np.ndarray]:
    y, x, h, w = (np.asarray(v, dtype=np.float64) for v in (y, x, h, w))
    return {"frac": h * w / (height * width), "h": h, "w": w, "x": x, "y": y,
            "logaspect": np.log(np.maximum(h, 1) / np.maximum(w, 1))}


def same_distribution(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> list[str]:
    """Names of the statistics whose distributions differ (two-sample KS at p < 1e-4, or means further
    apart than 5 standard errors). With ~3000 samples each the KS test detects shifts of ~0.05 in CDF."""
    bad = []
    for key in a:
        if ks_2samp(a[key], b[key]).pvalue < 1e-4:
            bad.append(key)
            continue
        se = math.sqrt(a[key].var() / len(a[key]) + b[key].var() / len(b[key])) + 1e-12
        if abs(a[key].mean() - b[key].mean()) > 5 * se:
            bad.append(key)
    return bad


@pytest.mark.parametrize("height,width", [(32, 32), (64, 64), (24, 40)])
def test_box_distribution_matches_reference_sampler(height: int, width: int) -> None:
    n = 3000
    gen = torch.Generator().manual_seed(1)
    y, x, h, w = sample_box_params(n, height, width, generator=gen)
    ours = stats_from_params(y, x, h, w, height, width)
    rng = random.Random(2)
    ref = stats_from_params(*zip(*[reference_box(rng, height, width) for _ in range(n)]), height, width)
    assert same_distribution(ours, ref) == []
    if height == width:
        # the comparison has power: a sampler without the aspect/position rejection is told apart
        wrong = stats_from_params(*zip(*[reference_box(rng, height, width, weighted=False)
                                         for _ in range(n)]), height, width)
        assert same_distribution(wrong, ref) != []


def test_mask_is_the_box_and_fraction_range() -> None:
    gen = torch.Generator().manual_seed(3)
    size = 128
    y, x, h, w = sample_box_params(2000, size, size, generator=gen)
    masks = random_boxes(2000, size, size, generator=torch.Generator().manual_seed(3))
    assert masks.shape == (2000, size, size) and masks.dtype == torch.float32
    for i in range(0, 2000, 97):  # spot-check the mask against the parameters
        ref = torch.zeros(size, size)
        ref[y[i]:y[i] + h[i], x[i]:x[i] + w[i]] = 1
        assert torch.equal(masks[i], ref)
    assert bool(((y + h) <= size).all()) and bool(((x + w) <= size).all())
    frac = masks.mean(dim=(1, 2))
    # w*h <= A <= 0.4 P^2 always; int() truncation can take a box slightly below 0.02 P^2 (as in the
    # original), by at most (sqrt(A/r)+sqrt(A r)) pixels: bounded here by 0.02 - 2*sqrt(0.02*3.34)/P
    assert float(frac.max()) <= 0.4
    assert float(frac.min()) >= 0.02 - 2 * math.sqrt(0.02 * 3.34) / size
    # spec section 7: mean covered fraction ~0.21 (truncation lowers it by ~2-3 % at P = 128);
    # standard error of the mean with 2000 boxes is ~0.0025
    assert abs(float(frac.mean()) - 0.21) < 0.015


def test_box_probability_and_determinism() -> None:
    assert float(random_boxes(50, 32, 32, torch.Generator().manual_seed(0), prob=0.0).sum()) == 0.0
    half = random_boxes(2000, 16, 16, torch.Generator().manual_seed(0), prob=0.5)
    nonempty = (half.flatten(1).sum(1) > 0).float().mean()
    assert abs(float(nonempty) - 0.5) < 0.05  # binomial sd ~0.011
    a = random_boxes(8, 32, 32, torch.Generator().manual_seed(7))
    b = random_boxes(8, 32, 32, torch.Generator().manual_seed(7))
    c = random_boxes(8, 32, 32, torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    with pytest.raises(ValueError, match="boxes"):
        random_boxes(2, 32, 32, prob=1.5)


def test_all_cover_box_is_bounding_box_and_empty_falls_back() -> None:
    torch.manual_seed(0)
    b, hh, ww = 12, 24, 20
    region = torch.rand(b, hh, ww) < 0.01
    region[3] = False
    region[7] = False
    region[5] = False
    region[5, 4, 9] = True  # single pixel
    region[9] = True  # everything
    gen_state = torch.Generator().manual_seed(11)
    out = all_cover_boxes(region, generator=gen_state)
    fallback = random_boxes(b, hh, ww, generator=torch.Generator().manual_seed(11))
    for i in range(b):
        idx = region[i].nonzero()
        if len(idx) == 0:
            assert torch.equal(out[i], fallback[i])
            assert float(out[i].sum()) > 0
            continue
        ref = torch.zeros(hh, ww)
        ref[idx[:, 0].min():idx[:, 0].max() + 1, idx[:, 1].min():idx[:, 1].max() + 1] = 1
        assert torch.equal(out[i], ref), i
        assert bool((out[i][region[i]] == 1).all())


def test_paste_images_and_labels() -> None:
    torch.manual_seed(0)
    box = random_boxes(3, 16, 16, torch.Generator().manual_seed(0))
    a, c = torch.rand(3, 2, 16, 16), torch.rand(3, 2, 16, 16)
    out = paste(a, c, box)
    inside = box.bool().unsqueeze(1).expand_as(a)
    assert torch.equal(out[inside], c[inside]) and torch.equal(out[~inside], a[~inside])
    ya, yc = torch.randint(0, 4, (3, 16, 16)), torch.randint(0, 4, (3, 16, 16))
    y = paste(ya, yc, box)
    assert y.dtype == torch.long
    assert torch.equal(y, torch.where(box.bool(), yc, ya))
    wa, wc = torch.zeros(3, 16, 16), torch.ones(3, 16, 16)
    assert torch.equal(paste(wa, wc, box), box)
    ma, mc = torch.zeros(3, 2, 16, 16), torch.ones(3, 2, 16, 16)
    assert torch.equal(paste(ma, mc, box), box.unsqueeze(1).expand(3, 2, 16, 16))
    with pytest.raises(ValueError, match="copy_paste"):
        paste(a, c, box[:, :8])


def test_no_host_sync_on_meta_device() -> None:
    """Meta tensors have no data: .item(), nonzero(), bool(tensor), boolean-mask indexing or .cpu()
    inside the ops would raise here, so running them proves they need no host round trip."""
    with pytest.raises((RuntimeError, NotImplementedError)):
        torch.empty(2, device="meta").nonzero()
    boxes = random_boxes(4, 32, 32, None, "meta")
    assert boxes.shape == (4, 32, 32) and boxes.device.type == "meta"
    assert all_cover_boxes(torch.empty(4, 32, 32, dtype=torch.bool, device="meta")).shape == (4, 32, 32)
    img = torch.empty(4, 3, 32, 32, device="meta")
    assert paste(img, img, boxes).shape == img.shape
    lab = torch.empty(4, 32, 32, dtype=torch.long, device="meta")
    assert paste(lab, lab, boxes).dtype == torch.long


def test_fallback_when_no_candidate_fits() -> None:
    # aspect 10-20 on a square image: h = sqrt(A r) > P for every candidate, so the documented fallback
    # (a square of the drawn area at a uniform valid position) is used
    y, x, h, w = sample_box_params(64, 32, 32, torch.Generator().manual_seed(0), area=(0.3, 0.4),
                                   aspect=(10.0, 20.0))
    assert torch.equal(h, w)
    assert bool(((h >= int(math.sqrt(0.3 * 1024))) & (h <= int(math.sqrt(0.4 * 1024)))).all())
    assert bool(((y + h) <= 32).all()) and bool(((x + w) <= 32).all())
