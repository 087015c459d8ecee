"""Conversion to the generic format: same counts, same order, identical decoded tensors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_readers2d import SAMPLES, make_busi, make_fundus, make_mnms, needs_samples

from medsemi.data.formats.base import MissingMaskError
from medsemi.data.formats.splits import build_splits
from medsemi.data.tools.check2d import check_dataset
from medsemi.data.tools.convert2d import convert_to_generic, converted_names


def _same(a, b, names: dict[str, str] | None = None) -> None:
    assert len(a) == len(b)
    for i in range(len(a)):
        x, y = a[i], b[i]
        assert torch.equal(x["image"], y["image"]), (x["name"], y["name"])
        assert x["domain"] == y["domain"]
        assert ("label" in x) == ("label" in y)
        if "label" in x:
            assert x["label"].dtype == y["label"].dtype and torch.equal(x["label"], y["label"])
        if names is not None:
            assert names[y["name"]] == x["name"]


def _round_trip(
    fmt: str, root: Path, out: Path, lb_domain: int, lb_num: int, patch=None, other=None, **kw
) -> None:
    summary = convert_to_generic(fmt, root, out, lb_domain=lb_domain, lb_num=lb_num, **kw)
    names = converted_names(out)
    vf, seed = kw.get("val_fraction", 0.0), kw.get("split_seed", 0)
    src = build_splits(fmt, root, lb_domain, lb_num, patch_size=patch, val_fraction=vf, split_seed=seed)
    explicit = build_splits("generic", out, None, patch_size=patch)
    rule = build_splits("generic", out, lb_domain, lb_num, patch_size=patch, val_fraction=vf, split_seed=seed)
    assert src.summary() == explicit.summary() == rule.summary()
    assert src.info.label_spec == explicit.info.label_spec and src.info.domains == explicit.info.domains
    assert src.info.in_channels == explicit.info.in_channels and src.info.patch_size == rule.info.patch_size
    for g in (explicit, rule):
        _same(src.labelled, g.labelled, names)
        _same(src.unlabelled, g.unlabelled, names)
        for d in src.test:
            _same(src.test[d], g.test[d], names)
        for d in src.validation:
            _same(src.validation[d], g.validation[d], names)
    if other is not None:  # the per-domain orders reproduce the paper split for another labelled domain
        a = build_splits(fmt, root, other, 1, patch_size=patch)
        b = build_splits("generic", out, other, 1, patch_size=patch)
        _same(a.labelled, b.labelled, names)
        _same(a.unlabelled, b.unlabelled, names)
    assert sum(summary["counts"]["train"].values()) == len(src.labelled) + len(src.unlabelled) + sum(
        len(v) for v in src.validation.values()
    )
    rep = check_dataset(out, "generic", compare_counts=False)
    assert rep.ok, rep.to_text()


@needs_samples
def test_samples_round_trip_png_and_nifti(tmp_path: Path) -> None:
    _round_trip("fundus", SAMPLES / "Fundus", tmp_path / "f", 2, 1, other=4)
    _round_trip("prostate", SAMPLES / "ProstateSlice", tmp_path / "p", 1, 1, other=3, file_ending=".nii.gz")
    meta = json.loads((tmp_path / "f" / "dataset.json").read_text())
    assert meta["labels"] == {"background": 0, "cup": [1, 3], "disc": [2, 3]}
    assert (
        meta["patch_size"] == [256, 256] and meta["image_resample"] == "lanczos" and meta["numTraining"] == 4
    )
    # the I2CVB image without a mask is converted without a label, and stays unusable as labelled data
    assert not (tmp_path / "p" / "labelsTr" / "I2CVB_00_01.nii.gz").exists()
    with pytest.raises(MissingMaskError, match="I2CVB_00_01"):
        build_splits("generic", tmp_path / "p", 4, 1)
    with pytest.raises(MissingMaskError, match="00_01.png"):
        convert_to_generic("prostate", SAMPLES / "ProstateSlice", tmp_path / "p2", lb_domain=4, lb_num=1)


def test_fake_layouts_round_trip(tmp_path: Path) -> None:
    m = make_mnms(tmp_path / "M", {f"vendor{v}": (3, 2) for v in "ABCD"}, size=10)
    _round_trip("mnms", m, tmp_path / "gm", 2, 2, patch=8, other=3)
    b = make_busi(tmp_path / "B", {"benign": 7, "malignant": 6})
    _round_trip("busi", b, tmp_path / "gb", 1, 2, patch=6, other=2, val_fraction=0.3, split_seed=3)
    f = make_fundus(tmp_path / "F", {f"Domain{i}": (3, 1) for i in range(1, 5)}, size=12)
    _round_trip("fundus", f, tmp_path / "gf", 3, 2, patch=12, val_fraction=0.4)
    sp = json.loads((tmp_path / "gb" / "splits.json").read_text())
    assert sp["paper_split"]["lb_domain"] == 1 and len(sp["validation"]) == 2  # int(.3*6) + int(.3*5)
    assert sp["train_order"]["benign"][0] == "benign_benign-1" and sp["test"][0].startswith("benign_test_")
    with pytest.raises(FileExistsError):
        convert_to_generic("busi", b, tmp_path / "gb")
    convert_to_generic("busi", b, tmp_path / "gb", lb_num=1, overwrite=True)
    assert len(json.loads((tmp_path / "gb" / "splits.json").read_text())["labelled"]) == 1
