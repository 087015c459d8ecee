"""Metrics against slow brute-force references written here (spec ust-run.md 3.4, versemi.md 4.3)."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from medsemi import metrics as M

# --------------------------------------------------------------------------- brute-force reference


def ref_surface_points(mask: np.ndarray) -> np.ndarray:
    """Foreground points with a face neighbour that is background or outside the image."""
    pts = []
    for idx in np.argwhere(mask):
        for axis in range(mask.ndim):
            for step in (-1, 1):
                nb = idx.copy()
                nb[axis] += step
                if nb[axis] < 0 or nb[axis] >= mask.shape[axis] or not mask[tuple(nb)]:
                    pts.append(idx)
                    break
            else:
                continue
            break
    return np.asarray(pts, dtype=np.float64).reshape(-1, mask.ndim)


def ref_directed(a: np.ndarray, b: np.ndarray, spacing) -> np.ndarray:
    sp = np.ones(a.ndim) if spacing is None else np.asarray(spacing, dtype=np.float64)
    pa, pb = ref_surface_points(a) * sp, ref_surface_points(b) * sp
    d = np.sqrt(((pa[:, None, :] - pb[None, :, :]) ** 2).sum(-1))  # all pairs
    return d.min(axis=1)


def ref_metrics(pred, gt, spacing, policy: M.MetricPolicy) -> dict[str, float]:
    nan = float("nan")
    p, g = int(pred.sum()), int(gt.sum())
    inter, union = int((pred & gt).sum()), int((pred | gt).sum())
    out = {}
    if p == 0 and g == 0:
        out["dice"] = nan if policy.both_empty_dice is None else policy.both_empty_dice
        out["jaccard"] = nan if policy.both_empty_jaccard is None else policy.both_empty_jaccard
        dist = policy.both_empty_distance
        out["smoothed_dice"] = 0.0 if policy.smoothed_empty_rule == "ust" else 1 / 1.001
    else:
        out["dice"] = 2 * inter / (p + g)
        out["jaccard"] = inter / union
        out["smoothed_dice"] = (2 * inter + 1) / (p + g + 1.001)
        dist = policy.empty_pred_distance if p == 0 else policy.empty_gt_distance if g == 0 else "compute"
    if dist == "compute":
        d1, d2 = ref_directed(pred, gt, spacing), ref_directed(gt, pred, spacing)
        out["hd95"] = float(np.percentile(np.concatenate([d1, d2]), 95))  # numpy linear, as medpy
        out["hd95_max"] = float(max(np.percentile(d1, 95), np.percentile(d2, 95)))
        out["asd"] = float(d1.mean())
    else:
        v = nan if dist is None else float(dist)
        out["hd95"] = out["hd95_max"] = out["asd"] = v
    return out


def close(a: float, b: float, tol: float = 1e-6) -> bool:
    return (math.isnan(a) and math.isnan(b)) or abs(a - b) <= tol


# --------------------------------------------------------------------------- fixtures


def _blob(shape, centre, radius, rng=None):
    grid = np.indices(shape).astype(float)
    d2 = sum((g - c) ** 2 for g, c in zip(grid, centre))
    mask = d2 <= radius**2
    if rng is not None:
        mask ^= rng.random(shape) < 0.04  # ragged surfaces, holes
    return mask


def make_cases():
    rng = np.random.default_rng(0)
    s2 = (20, 24)
    e2 = np.zeros(s2, bool)
    single = e2.copy()
    single[7, 9] = True
    single2 = e2.copy()
    single2[15, 3] = True
    a = _blob(s2, (9, 11), 5, rng)
    b = _blob(s2, (11, 13), 6, rng)
    left = e2.copy()
    left[2:8, 1:5] = True
    right = e2.copy()
    right[12:18, 15:22] = True
    border = e2.copy()
    border[0:6, :] = True  # touches three image borders
    border_b = e2.copy()
    border_b[:, 18:] = True
    s3 = (10, 12, 9)
    e3 = np.zeros(s3, bool)
    a3 = _blob(s3, (4, 5, 4), 3.2, rng)
    b3 = _blob(s3, (5, 6, 4), 3.6, rng)
    edge3 = e3.copy()
    edge3[0:4, 8:, 5:] = True
    return [
        ("both_empty", e2, e2, None),
        ("pred_empty", e2, a, None),
        ("gt_empty", a, e2, None),
        ("single_pixel_same", single, single, None),
        ("single_pixel_far", single, single2, None),
        ("single_vs_blob", single, a, None),
        ("identical", a, a.copy(), None),
        ("overlapping", a, b, None),
        ("disjoint", left, right, None),
        ("image_border", border, border_b, None),
        ("border_vs_blob", border, b, (0.5, 2.0)),
        ("anisotropic_2d", a, b, (0.8, 1.7)),
        ("3d", a3, b3, None),
        ("3d_anisotropic", a3, b3, (2.5, 0.7, 1.1)),
        ("3d_border", edge3, b3, (1.0, 0.9, 3.0)),
        ("3d_both_empty", e3, e3, (1.0, 1.0, 2.0)),
        ("3d_pred_empty", e3, b3, (1.0, 1.0, 2.0)),
    ]


CASES = make_cases()
POLICIES = [
    M.MetricPolicy(),
    M.MetricPolicy.medpy_legacy(),
    M.MetricPolicy.versemi(),
    M.MetricPolicy(empty_gt_distance=55.0, both_empty_dice=None, smoothed_empty_rule="midss"),
]


@pytest.mark.parametrize("name,pred,gt,spacing", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("policy", POLICIES, ids=["default", "medpy_legacy", "versemi", "custom"])
def test_metrics_match_brute_force(name, pred, gt, spacing, policy):
    ref = ref_metrics(pred, gt, spacing, policy)
    got = {
        "dice": M.dice(pred, gt, policy),
        "jaccard": M.jaccard(pred, gt, policy),
        "smoothed_dice": M.smoothed_dice(pred, gt, policy.smoothed_empty_rule),
        "hd95": M.hd95(pred, gt, spacing, policy=policy),
        "hd95_max": M.hd95(pred, gt, spacing, definition="max_directed", policy=policy),
        "asd": M.asd(pred, gt, spacing, policy=policy),
    }
    for k, v in ref.items():
        assert close(got[k], v), (name, k, got[k], v)


def test_default_empty_rules_are_the_documented_ones():
    e = np.zeros((8, 8), bool)
    a = e.copy()
    a[2:5, 2:5] = True
    # both empty: overlap 1, distances skipped
    assert M.dice(e, e) == 1.0 and M.jaccard(e, e) == 1.0
    assert math.isnan(M.hd95(e, e)) and math.isnan(M.asd(e, e))
    # prediction empty: UST penalty 100
    assert M.dice(e, a) == 0.0 and M.jaccard(e, a) == 0.0
    assert M.hd95(e, a) == 100.0 and M.asd(e, a) == 100.0
    # gt empty: distances skipped
    assert M.dice(a, e) == 0.0 and math.isnan(M.hd95(a, e)) and math.isnan(M.asd(a, e))
    # smoothed Dice: both empty -> 0 (UST) or 1/1.001 (MiDSS)
    assert M.smoothed_dice(e, e, "ust") == 0.0
    assert M.smoothed_dice(e, e, "midss") == pytest.approx(1 / 1.001, abs=1e-12)


def test_asd_is_one_sided_and_hd95_definitions_differ():
    gt = np.zeros((30, 30), bool)
    gt[5:25, 5:25] = True
    pred = np.zeros((30, 30), bool)
    pred[10:13, 10:13] = True  # small blob inside a large one
    assert M.asd(pred, gt) != pytest.approx(M.asd(gt, pred))
    assert M.asd(pred, gt) == pytest.approx(ref_directed(pred, gt, None).mean())
    assert M.hd95(pred, gt, definition="max_directed") > M.hd95(pred, gt)


def test_case_metrics_per_class_and_mm_keys():
    _, a, b = CASES[7][0], CASES[7][1], CASES[7][2]
    e = np.zeros_like(a)
    pred = np.stack([a, e])
    gt = np.stack([b, a])
    out = M.case_metrics(pred, gt, ("c1", "c2"), spacing=(0.5, 2.0))
    assert list(out) == ["c1", "c2"]
    ref_px = ref_metrics(a, b, None, M.MetricPolicy())
    ref_mm = ref_metrics(a, b, (0.5, 2.0), M.MetricPolicy())
    assert close(out["c1"]["hd95"], ref_px["hd95"]) and close(out["c1"]["asd"], ref_px["asd"])
    assert close(out["c1"]["hd95_mm"], ref_mm["hd95"]) and close(out["c1"]["asd_mm"], ref_mm["asd"])
    assert out["c2"]["hd95"] == 100.0 and out["c2"]["hd95_mm"] == 100.0 and out["c2"]["dice"] == 0.0
    assert out["c2"]["pred_voxels"] == 0 and out["c2"]["gt_voxels"] == a.sum()
    no_mm = M.case_metrics(pred, gt, ("c1", "c2"), metrics=("dice",))
    assert set(no_mm["c1"]) == {"dice", "pred_voxels", "gt_voxels"}
    with pytest.raises(ValueError, match="classes"):
        M.case_metrics(pred, gt, ("only_one",))
    with pytest.raises(ValueError, match="differs"):
        M.case_metrics(pred, gt[:, :-1], ("c1", "c2"))
    with pytest.raises(ValueError, match="spacing"):
        M.hd95(a, b, spacing=(1.0,))


def test_batch_dice_matches_numpy():
    torch.manual_seed(0)
    pred = torch.rand(3, 2, 9, 11) > 0.6
    gt = torch.rand(3, 2, 9, 11) > 0.5
    pred[0, 1] = False
    gt[0, 1] = False  # both empty
    pred[1, 0] = False  # pred empty
    gt[2, 1] = False  # gt empty
    for policy in (
        M.MetricPolicy(),
        M.MetricPolicy.medpy_legacy(),
        M.MetricPolicy(both_empty_dice=None),
        M.MetricPolicy(smoothed_empty_rule="midss"),
    ):
        hard = M.batch_dice(pred, gt, policy)
        soft = M.batch_dice(pred.float(), gt.float(), policy, smoothed=True)
        assert hard.shape == (3, 2) and soft.shape == (3, 2)
        for b in range(3):
            for f in range(2):
                p, g = pred[b, f].numpy(), gt[b, f].numpy()
                assert close(hard[b, f].item(), M.dice(p, g, policy), 1e-6)
                assert close(soft[b, f].item(), M.smoothed_dice(p, g, policy.smoothed_empty_rule), 1e-6)
    vol = torch.rand(2, 1, 6, 7, 5) > 0.5
    assert M.batch_dice(vol, vol).eq(1).all()


def test_aggregate_macro_over_domains_and_skips():
    nan = float("nan")
    recs = [
        {
            "domain": "A",
            "case": "a1",
            "metrics": {"x": {"dice": 0.5, "hd95": 2.0}, "y": {"dice": 1.0, "hd95": nan}},
        },
        {
            "domain": "A",
            "case": "a2",
            "metrics": {"x": {"dice": 0.7, "hd95": nan}, "y": {"dice": 0.0, "hd95": 4.0}},
        },
        {
            "domain": "A",
            "case": "a3",
            "metrics": {"x": {"dice": 0.9, "hd95": 6.0}, "y": {"dice": 0.5, "hd95": 6.0}},
        },
        {
            "domain": "B",
            "case": "b1",
            "metrics": {"x": {"dice": 0.1, "hd95": nan}, "y": {"dice": 0.2, "hd95": nan}},
        },
    ]
    r = M.aggregate(recs)
    assert r["per_domain"]["A"]["x"]["dice"] == pytest.approx(0.7)
    assert r["per_domain_sd"]["A"]["x"]["dice"] == pytest.approx(np.std([0.5, 0.7, 0.9]))
    assert r["per_domain"]["A"]["x"]["hd95"] == pytest.approx(4.0)  # NaN ignored
    assert r["per_domain"]["A"]["y"]["hd95"] == pytest.approx(5.0)
    assert math.isnan(r["per_domain"]["B"]["x"]["hd95"])
    # macro = mean over domains of per-domain means (not the pooled mean 0.55)
    assert r["macro"]["x"]["dice"] == pytest.approx((0.7 + 0.1) / 2)
    assert r["macro"]["y"]["dice"] == pytest.approx((0.5 + 0.2) / 2)
    assert r["macro"]["x"]["hd95"] == pytest.approx(4.0)  # domain B all skipped
    assert r["mean_dice"] == pytest.approx(((0.7 + 0.1) / 2 + (0.5 + 0.2) / 2) / 2)
    c = r["counts"]
    assert c["cases"] == {"A": 3, "B": 1}
    assert c["skipped"]["A"]["x"]["hd95"] == 1 and c["skipped"]["B"]["y"]["hd95"] == 1
    assert c["skipped_total"]["x"]["hd95"] == 2 and c["skipped_total"]["x"]["dice"] == 0
    assert c["domains_skipped"]["x"]["hd95"] == 1
    table = M.format_table(r)
    assert "| A | x | 3 |" in table and "0.7000 ± " in table and "(1 skipped)" in table
    assert f"{r['mean_dice']:.4f}" in table
    with pytest.raises(ValueError):
        M.aggregate([])


def test_aggregate_counts_empty_cases_from_case_metrics():
    e = np.zeros((6, 6), bool)
    a = e.copy()
    a[1:3, 1:3] = True
    recs = [
        {"domain": "d", "case": str(i), "metrics": M.case_metrics(np.stack([p]), np.stack([g]), ("fg",))}
        for i, (p, g) in enumerate([(e, e), (e, a), (a, e), (a, a)])
    ]
    r = M.aggregate(recs)
    assert r["counts"]["empty"]["d"]["fg"] == {"both": 1, "pred_only": 1, "gt_only": 1}
    assert r["counts"]["skipped"]["d"]["fg"]["hd95"] == 2  # both empty, gt empty
    assert "pred_voxels" not in r["macro"]["fg"]
    assert r["macro"]["fg"]["hd95"] == pytest.approx(50.0)  # (100 penalty + 0) / 2
    assert r["macro"]["fg"]["dice"] == pytest.approx((1 + 0 + 0 + 1) / 4)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("idx", [7, 11, 14], ids=["2d", "2d_aniso", "3d_border_aniso"])
def test_hd95_equals_pooled_monai_directed_distances(idx):
    pytest.importorskip("monai")
    from monai.metrics.utils import get_mask_edges, get_surface_distance

    _, pred, gt, spacing = CASES[idx]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ep, eg = get_mask_edges(pred, gt, crop=True, always_return_as_numpy=True)
        d1 = np.asarray(get_surface_distance(ep, eg, spacing=spacing))
        d2 = np.asarray(get_surface_distance(eg, ep, spacing=spacing))
    assert close(M.hd95(pred, gt, spacing), float(np.percentile(np.concatenate([d1, d2]), 95)))
    assert close(
        M.hd95(pred, gt, spacing, "max_directed"), float(max(np.percentile(d1, 95), np.percentile(d2, 95)))
    )
    assert close(M.asd(pred, gt, spacing), float(d1.mean()))
