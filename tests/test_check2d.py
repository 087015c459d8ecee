"""``check_dataset``: every planted problem is found, with the file that has it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
from test_readers2d import SAMPLES, make_busi, make_fundus, make_mnms, make_prostate, needs_samples, save

from medsemi.data.tools.check2d import check_dataset

PROSTATE = ("BIDMC", "BMC", "HK", "I2CVB", "RUNMC", "UCL")


def _codes(problems, path: Path | None = None) -> set[str]:
    return {p.code for p in problems if path is None or p.path == path}


def test_clean_fakes_have_no_errors(tmp_path: Path) -> None:
    f = make_fundus(tmp_path / "F", {f"Domain{i}": (2, 1) for i in range(1, 5)}, size=8)
    m = make_mnms(tmp_path / "M", {f"vendor{v}": (2, 1) for v in "ABCD"}, size=8)
    b = make_busi(tmp_path / "B", {"benign": 6, "malignant": 5})
    for root, fmt in ((f, "fundus"), (m, "mnms"), (b, "busi")):
        rep = check_dataset(root, fmt)
        assert rep.ok, rep.to_text()
        assert {p.code for p in rep.warnings} == {"count"}  # partial data: counts differ from the paper
        assert not check_dataset(root, fmt, compare_counts=False).warnings
    rep = check_dataset(f, "fundus")
    st = rep.stat("Domain2", "train")
    assert (st.images, st.with_mask, dict(st.sizes), dict(st.channels)) == (2, 2, {(8, 8): 2}, {3: 2})
    assert st.label_values <= {0, 128, 255} and 0 in st.label_values
    assert rep.stat("benign", "test") is None and check_dataset(b, "busi").stat("benign", "test").images == 1
    assert check_dataset(m, "mnms").stat("vendorA", "train").channels == {1: 1, 3: 1}


def test_each_planted_problem_is_reported(tmp_path: Path) -> None:
    root = make_fundus(tmp_path / "F", {f"Domain{i}": (3, 2) for i in range(1, 5)}, size=8)
    img = lambda d, s: sorted((root / d / s / "ROIs" / "image").iterdir())  # noqa: E731
    msk = lambda d, s: sorted((root / d / s / "ROIs" / "mask").iterdir())  # noqa: E731
    no_mask = img("Domain1", "train")[0]
    (root / "Domain1/train/ROIs/mask" / no_mask.name).unlink()
    orphan = save(root / "Domain1/train/ROIs/mask/zz_orphan.png", np.zeros((8, 8), np.uint8))
    size_bad = msk("Domain2", "train")[0]
    save(size_bad, np.zeros((9, 8), np.uint8))
    values_bad = msk("Domain2", "test")[0]
    save(values_bad, np.full((8, 8), 7, np.uint8))
    corrupt = img("Domain3", "train")[1]
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    grey = img("Domain3", "test")[0]
    save(grey, np.zeros((8, 8), np.uint8))  # fundus images must be RGB
    shutil.rmtree(root / "Domain4" / "test")

    rep = check_dataset(root, "fundus")
    assert not rep.ok
    assert _codes(rep.errors, no_mask) == {"missing_mask"}
    assert _codes(rep.warnings, orphan) == {"orphan_mask"}
    assert _codes(rep.errors, size_bad) == {"size_mismatch"}
    assert _codes(rep.errors, values_bad) == {"label_values"}
    assert _codes(rep.errors, corrupt) == {"unreadable"}
    assert _codes(rep.errors, grey) == {"channels"}
    empty = [p for p in rep.errors if p.code == "empty_domain"]
    assert [(p.domain, p.split) for p in empty] == [("Domain4", "test")]
    assert len(rep.errors) == 6
    text = rep.to_text()
    for p in (no_mask, orphan, size_bad, values_bad, corrupt, grey):
        assert str(p) in text
    assert "6 error(s)" in text and "unexpected mask values [7]" in text
    # the same image is only a warning when the run uses it as unlabelled data
    rep2 = check_dataset(root, "fundus", mask_optional=[no_mask])
    assert _codes(rep2.warnings, no_mask) == {"missing_mask"} and len(rep2.errors) == 5
    # headers only: corrupt pixel data and label values are not looked at
    shallow = check_dataset(root, "fundus", deep=False)
    assert "label_values" not in _codes(shallow.errors)


def test_prostate_native_size_and_rgb(tmp_path: Path) -> None:
    root = make_prostate(tmp_path / "P", {d: (1, 1) for d in PROSTATE}, size=384)
    small = sorted((root / "HK" / "train" / "image").iterdir())[0]
    save(small, np.zeros((300, 384), np.uint8))
    save(root / "HK" / "train" / "mask" / small.name, np.zeros((300, 384), np.uint8))
    rgb = sorted((root / "UCL" / "test" / "image").iterdir())[0]
    save(rgb, np.zeros((384, 384, 3), np.uint8))
    rep = check_dataset(root, "prostate", compare_counts=False)
    assert _codes(rep.errors, small) == {"image_size"}  # the prostate reader does not resize
    assert _codes(rep.errors, rgb) == {"channels"} and len(rep.errors) == 2
    assert check_dataset(root, "prostate", patch_size=64, compare_counts=False).errors[0].path == rgb


def test_busi_problems(tmp_path: Path) -> None:
    root = make_busi(tmp_path / "B", {"benign": 5, "malignant": 5})
    lone = save(root / "benign" / "benign (6).png", np.zeros((10, 10), np.uint8))
    orphan = save(root / "malignant" / "malignant (77)_mask.png", np.zeros((10, 10), np.uint8))
    bad = save(root / "malignant" / "malignant (2)_mask_5.png", np.full((10, 10), 3, np.uint8))
    shutil.rmtree(root / "benign")
    rep = check_dataset(root, "busi", compare_counts=False)
    assert {(p.code, p.domain, p.split) for p in rep.errors if p.code == "empty_domain"} == {
        ("empty_domain", "benign", "train"),
        ("empty_domain", "benign", "test"),
    }
    assert _codes(rep.warnings, orphan) == {"orphan_mask"} and _codes(rep.errors, bad) == {"label_values"}
    root = make_busi(tmp_path / "B2", {"benign": 5, "malignant": 5})
    lone = save(root / "benign" / "benign (6).png", np.zeros((10, 10), np.uint8))
    rep = check_dataset(root, "busi", compare_counts=False)
    assert [p.path for p in rep.errors] == [lone] and "benign (6)_mask.png" in rep.errors[0].message


@needs_samples
def test_samples_i2cvb_mismatch_named() -> None:
    rep = check_dataset(SAMPLES / "ProstateSlice", "prostate")
    assert len(rep.errors) == 1
    err = rep.errors[0]
    assert err.code == "missing_mask" and err.path.name == "00_01.png" and err.domain == "I2CVB"
    assert "I2CVB/train/mask/00_01.png" in err.message
    assert any(
        p.code == "orphan_mask" and p.path.name == "00_00.png" and p.domain == "I2CVB" for p in rep.warnings
    )
    assert "I2CVB/train/image/00_01.png" in rep.to_text()
    st = rep.stat("BIDMC", "test")
    assert dict(st.sizes) == {(384, 384): 1} and st.label_values == {0, 255} and dict(st.channels) == {1: 1}
    rep = check_dataset(SAMPLES / "Fundus", "fundus")
    assert rep.ok and rep.stat("Domain1", "train").sizes == {(800, 800): 1}
    assert {p.code for p in rep.warnings} == {"count"} and len(rep.warnings) == 8


def test_generic_problems(tmp_path: Path) -> None:
    root = tmp_path / "g"
    z = np.zeros((6, 6), np.uint8)
    save(root / "imagesTr" / "a_0000.png", z)
    save(root / "labelsTr" / "a.png", z)
    save(root / "imagesTr" / "b_0000.png", z)  # no label: unlabelled only (warning)
    save(root / "imagesTr" / "c_0000.png", z)  # no label but listed as labelled: error
    save(root / "imagesTr" / "d_0000.png", np.zeros((6, 6, 3), np.uint8))  # 3 channels, 1 expected
    save(root / "labelsTr" / "d.png", np.full((6, 6), 5, np.uint8))  # value 5 with labels 0..1
    bad_name = save(root / "imagesTr" / "e.png", z)
    save(root / "imagesTr" / "f_0000.png", z)  # no domain
    save(root / "imagesTs" / "t_0000.png", z)  # test without label: error
    save(root / "imagesTs" / "u_0000.png", z)
    save(root / "labelsTs" / "u.png", z)
    orphan = save(root / "labelsTs" / "zz.png", z)
    meta = {
        "channel_names": {"0": "x"},
        "labels": {"background": 0, "fg": 1},
        "domain_names": ["s", "empty"],
        "domains": {c: "s" for c in "abcdtu"},
        "patch_size": [6, 6],
    }
    (root / "dataset.json").write_text(json.dumps(meta))
    (root / "splits.json").write_text(
        json.dumps({"labelled": ["a", "c"], "unlabelled": ["b", "q"], "test": ["t"]})
    )
    rep = check_dataset(root, "generic")
    T = root / "imagesTr"
    assert _codes(rep.warnings, T / "b_0000.png") == {"missing_mask"}
    assert _codes(rep.errors, T / "c_0000.png") == {"missing_mask"}
    assert _codes(rep.errors, T / "d_0000.png") == {"channels"}
    assert _codes(rep.errors, root / "labelsTr" / "d.png") == {"label_values"}
    assert _codes(rep.errors, bad_name) == {"bad_name"}
    assert _codes(rep.errors, T / "f_0000.png") == {"no_domain"}
    assert _codes(rep.errors, root / "imagesTs" / "t_0000.png") == {"missing_mask"}
    assert _codes(rep.warnings, orphan) == {"orphan_mask"}
    assert any(p.code == "splits_json" and "'q'" in p.message for p in rep.errors)
    assert {(p.domain, p.split) for p in rep.errors if p.code == "empty_domain"} == {
        ("empty", "train"),
        ("empty", "test"),
    }
    assert check_dataset(tmp_path / "nothing", "generic").errors[0].code == "missing_root"
    (tmp_path / "nojson").mkdir()
    assert check_dataset(tmp_path / "nojson", "generic").errors[0].code == "format"
