"""score_folders on small PNG / NIfTI folders: numbers equal metrics on the arrays; clear errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medsemi import metrics as M
from medsemi.data.codecs import FUNDUS, MNMS, PROSTATE, index_codec
from medsemi.data.contract import LabelSpec
from medsemi.evaluation.score_folder import ScoreError, format_table, score_folders


def _disc(shape, centre, r):
    yy, xx = np.indices(shape)
    return (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= r**2


def _save_png(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def _prostate_pair(rng, shape=(32, 32)):
    """gt / pred foreground masks (bool)."""
    c = rng.integers(10, 22, size=2)
    gt = _disc(shape, c, rng.integers(4, 9))
    pred = _disc(shape, c + rng.integers(-3, 4, size=2), rng.integers(3, 10))
    return pred, gt


def _enc(fg: np.ndarray) -> np.ndarray:  # prostate: 0 = foreground, 255 = background
    return np.where(fg, 0, 255).astype(np.uint8)


@pytest.fixture()
def prostate_folders(tmp_path):
    rng = np.random.default_rng(0)
    truth = {}
    for dom in ("BIDMC", "HK"):
        for i in range(3):
            pred, gt = _prostate_pair(rng)
            if dom == "HK" and i == 0:
                pred = np.zeros_like(gt)  # empty prediction -> penalty
            if dom == "HK" and i == 1:
                gt = np.zeros_like(gt)  # empty ground truth -> skipped distances
            _save_png(tmp_path / "gt" / dom / f"{i:02d}.png", _enc(gt))
            _save_png(tmp_path / "pred" / dom / f"{i:02d}.png", _enc(pred))
            truth[(dom, f"{i:02d}")] = (pred, gt)
    return tmp_path, truth


def test_prostate_numbers_match_metrics_and_files_written(prostate_folders):
    root, truth = prostate_folders
    out = root / "out"
    res = score_folders(root / "pred", root / "gt", PROSTATE, out_dir=out)
    assert len(res["cases"]) == 6
    records = []
    for rec in res["cases"]:
        pred, gt = truth[(rec["domain"], rec["case"])]
        expect = M.case_metrics(pred[None], gt[None], ("prostate",))
        assert rec["spacing"] is None
        for k, v in expect["prostate"].items():
            got = rec["metrics"]["prostate"][k]
            assert (math.isnan(v) and math.isnan(got)) or got == pytest.approx(v, abs=1e-9), k
        records.append({"domain": rec["domain"], "case": rec["case"], "metrics": expect})
    agg = res["aggregate"]
    ref = M.aggregate(records)
    assert agg["mean_dice"] == pytest.approx(ref["mean_dice"])
    assert agg["macro"]["prostate"]["hd95"] == pytest.approx(ref["macro"]["prostate"]["hd95"])
    assert res["cases"][3]["metrics"]["prostate"]["hd95"] == 100.0  # HK/00: empty prediction
    assert agg["counts"]["skipped"]["HK"]["prostate"]["hd95"] == 1  # HK/01: empty gt
    assert agg["counts"]["empty"]["HK"]["prostate"] == {"both": 0, "pred_only": 1, "gt_only": 1}
    # macro over domains = mean of the two per-domain means
    pd = agg["per_domain"]
    assert agg["macro"]["prostate"]["dice"] == pytest.approx(
        (pd["BIDMC"]["prostate"]["dice"] + pd["HK"]["prostate"]["dice"]) / 2
    )
    data = json.loads((out / "scores.json").read_text())  # strict JSON: NaN written as null
    assert data["aggregate"]["mean_dice"] == pytest.approx(agg["mean_dice"])
    assert data["cases"][4]["metrics"]["prostate"]["hd95"] is None
    md = (out / "scores.md").read_text()
    assert "| BIDMC | prostate | 3 |" in md and f"{agg['mean_dice']:.4f}" in md
    assert format_table(agg) in md


def test_fundus_multilabel_rgb_masks_and_extra_predictions(tmp_path):
    shape = (40, 40)
    disc_gt, cup_gt = _disc(shape, (20, 20), 12), _disc(shape, (20, 21), 5)
    disc_pr, cup_pr = _disc(shape, (19, 20), 11), _disc(shape, (21, 20), 6)

    def enc(disc, cup):
        m = np.full(shape, 255, np.uint8)
        m[disc] = 128
        m[cup & disc] = 0
        return m

    gt_rgb = np.repeat(enc(disc_gt, cup_gt)[..., None], 3, axis=2)  # raw fundus masks are RGB
    _save_png(tmp_path / "gt" / "a.png", gt_rgb)
    _save_png(tmp_path / "pred" / "a.png", enc(disc_pr, cup_pr))
    _save_png(tmp_path / "pred" / "extra.png", enc(disc_pr, cup_pr))
    res = score_folders(tmp_path / "pred", tmp_path / "gt", FUNDUS, spacing=(0.5, 0.5))
    (rec,) = res["cases"]
    assert rec["domain"] == "all" and rec["case"] == "a"
    expect = M.case_metrics(
        np.stack([cup_pr & disc_pr, disc_pr]),
        np.stack([cup_gt & disc_gt, disc_gt]),
        ("cup", "disc"),
        spacing=(0.5, 0.5),
    )
    for cls in ("cup", "disc"):
        for k, v in expect[cls].items():
            assert rec["metrics"][cls][k] == pytest.approx(v, abs=1e-9), (cls, k)
    assert rec["metrics"]["disc"]["hd95_mm"] == pytest.approx(0.5 * rec["metrics"]["disc"]["hd95"])
    assert res["unmatched_predictions"] == [str(tmp_path / "pred" / "extra.png")]


def test_mnms_rgb_codec(tmp_path):
    shape = (24, 24)
    lab_gt = np.zeros(shape, np.int64)
    lab_gt[4:12, 4:12], lab_gt[14:20, 3:9], lab_gt[5:10, 15:22] = 1, 2, 3
    lab_pr = np.roll(lab_gt, 1, axis=1)
    _save_png(tmp_path / "gt" / "vA" / "s.png", MNMS.encode(lab_gt))
    _save_png(tmp_path / "pred" / "vA" / "s.png", MNMS.encode(lab_pr))
    res = score_folders(tmp_path / "pred", tmp_path / "gt", MNMS)
    got = res["cases"][0]["metrics"]
    assert list(got) == ["lv", "myo", "rv"]
    for c, name in enumerate(("lv", "myo", "rv"), start=1):
        assert got[name]["dice"] == pytest.approx(M.dice(lab_pr == c, lab_gt == c))
        assert got[name]["hd95"] == pytest.approx(M.hd95(lab_pr == c, lab_gt == c))


def test_nifti_volume_uses_header_spacing(tmp_path):
    nib = pytest.importorskip("nibabel")
    rng = np.random.default_rng(1)
    shape = (16, 18, 12)
    gt = np.zeros(shape, np.uint8)
    gt[4:11, 5:13, 3:9] = 1
    pred = np.zeros(shape, np.uint8)
    pred[5:12, 4:12, 4:10] = 1
    pred[rng.random(shape) < 0.01] = 1
    zooms = (0.8, 0.8, 2.5)
    for folder, arr in (("gt", gt), ("pred", pred)):
        (tmp_path / folder).mkdir()
        img = nib.Nifti1Image(arr, np.diag([*zooms, 1.0]))
        img.header.set_zooms(zooms)
        nib.save(img, str(tmp_path / folder / "case1.nii.gz"))
    codec = index_codec(LabelSpec("exclusive", ("background", "organ")))
    res = score_folders(tmp_path / "pred", tmp_path / "gt", codec)
    rec = res["cases"][0]
    assert rec["spacing"] == pytest.approx(list(zooms))
    m = rec["metrics"]["organ"]
    p, g = pred.astype(bool), gt.astype(bool)
    assert m["hd95"] == pytest.approx(M.hd95(p, g))  # voxel units, as the papers
    assert m["hd95_mm"] == pytest.approx(M.hd95(p, g, zooms))
    assert m["asd_mm"] == pytest.approx(M.asd(p, g, zooms))
    assert m["dice"] == pytest.approx(M.dice(p, g))
    no_hdr = score_folders(tmp_path / "pred", tmp_path / "gt", codec, use_header_spacing=False)
    assert "hd95_mm" not in no_hdr["cases"][0]["metrics"]["organ"]


def test_errors_name_the_file(tmp_path):
    rng = np.random.default_rng(2)
    pred, gt = _prostate_pair(rng)
    _save_png(tmp_path / "gt" / "a.png", _enc(gt))
    _save_png(tmp_path / "gt" / "b.png", _enc(gt))
    _save_png(tmp_path / "pred" / "a.png", _enc(pred))
    with pytest.raises(ScoreError, match=r"b\.png: no prediction"):
        score_folders(tmp_path / "pred", tmp_path / "gt", PROSTATE)

    _save_png(tmp_path / "pred" / "b.png", _enc(pred)[:-2])
    with pytest.raises(ScoreError, match=r"pred/b\.png: prediction shape \(30, 32\) differs"):
        score_folders(tmp_path / "pred", tmp_path / "gt", PROSTATE)

    bad = _enc(pred)
    bad[0, 0] = 7
    _save_png(tmp_path / "pred" / "b.png", bad)
    with pytest.raises(ScoreError, match=r"pred/b\.png: unexpected mask values 7"):
        score_folders(tmp_path / "pred", tmp_path / "gt", PROSTATE)

    (tmp_path / "pred" / "b.png").write_bytes(b"not a png at all")
    with pytest.raises(ScoreError, match=r"pred/b\.png: cannot read"):
        score_folders(tmp_path / "pred", tmp_path / "gt", PROSTATE)

    with pytest.raises(ScoreError, match="no mask files"):
        (tmp_path / "empty").mkdir()
        score_folders(tmp_path / "pred", tmp_path / "empty", PROSTATE)
    with pytest.raises(ScoreError, match="does not exist"):
        score_folders(tmp_path / "nope", tmp_path / "gt", PROSTATE)
