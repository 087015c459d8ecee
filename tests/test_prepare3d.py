"""NIfTI folders and the VerSemi preprocessing recipes (spec versemi.md 1.5)."""

from __future__ import annotations

import json
from dataclasses import replace

import h5py
import nibabel as nib
import numpy as np
import pytest

from medsemi.data.tools.prepare3d import RECIPES, output_name, prepare_dataset, preprocess_arrays
from medsemi.data.volumes.cases import read_case, write_case
from medsemi.data.volumes.nifti import find_nifti_cases, load_nifti, read_nifti_case


def _save(path, arr, spacing=(1.0, 1.0, 1.0), dtype=np.float32) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = (-10.0, 5.0, 2.0)
    nib.save(nib.Nifti1Image(np.asarray(arr, dtype=dtype), affine), str(path))


def _ct_case(rng, shape=(40, 36, 12), box=((15, 25), (12, 20), (4, 8))) -> tuple[np.ndarray, np.ndarray]:
    img = rng.uniform(-1200, 1500, size=shape).astype(np.float32)
    lab = np.zeros(shape, np.int16)
    lab[tuple(slice(a, b) for a, b in box)] = 1
    return img, lab


def test_find_cases_msd_and_nnunet(tmp_path) -> None:
    rng = np.random.default_rng(0)
    img, lab = _ct_case(rng)
    _save(tmp_path / "msd/imagesTr/spleen_2.nii.gz", img, (0.8, 0.8, 5.0))
    _save(tmp_path / "msd/labelsTr/spleen_2.nii.gz", lab, dtype=np.int16)
    (tmp_path / "msd/imagesTr/._spleen_2.nii.gz").write_bytes(b"mac junk")
    cases = find_nifti_cases(tmp_path / "msd")
    assert [c.name for c in cases] == ["spleen_2"]
    image, label = read_nifti_case(cases[0])
    assert image.spacing == pytest.approx((0.8, 0.8, 5.0)) and image.affine[0, 3] == -10.0
    np.testing.assert_array_equal(label.data, lab)
    _save(tmp_path / "nn/imagesTr/lung_004_0000.nii.gz", img)
    _save(tmp_path / "nn/labelsTr/lung_004.nii.gz", lab, dtype=np.int16)
    assert find_nifti_cases(tmp_path / "nn")[0].name == "lung_004"
    _save(tmp_path / "nih/imagesTr/PANCREAS_0001.nii.gz", img)  # a _dddd name that is not a channel
    _save(tmp_path / "nih/labelsTr/PANCREAS_0001.nii.gz", lab, dtype=np.int16)
    assert find_nifti_cases(tmp_path / "nih")[0].name == "PANCREAS_0001"
    _save(tmp_path / "nn/imagesTr/lung_004_0001.nii.gz", img)
    with pytest.raises(ValueError, match="lung_004_0001.nii.gz: multi-channel"):
        find_nifti_cases(tmp_path / "nn")
    _save(tmp_path / "nolab/imagesTr/lung_005.nii.gz", img)
    (tmp_path / "nolab/labelsTr").mkdir()
    with pytest.raises(FileNotFoundError, match="lung_005.nii.gz: no label file"):
        find_nifti_cases(tmp_path / "nolab")
    (tmp_path / "empty/imagesTr").mkdir(parents=True)
    with pytest.raises(ValueError, match="imagesTr: no NIfTI images"):
        find_nifti_cases(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="image folder not found"):
        find_nifti_cases(tmp_path / "missing")
    _save(tmp_path / "mm/imagesTr/lung_006.nii.gz", img)
    _save(tmp_path / "mm/labelsTr/lung_006.nii.gz", lab[:-1], dtype=np.int16)
    with pytest.raises(ValueError, match="lung_006.nii.gz: label shape"):
        read_nifti_case(find_nifti_cases(tmp_path / "mm")[0])
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(b"garbage")
    with pytest.raises(ValueError, match="bad.nii.gz: unreadable NIfTI"):
        load_nifti(bad)


def test_output_names() -> None:
    assert output_name("spleen", "spleen_2") == "spleen_02"
    assert output_name("spleen", "spleen_63") == "spleen_63"
    assert output_name("lung", "lung_1") == "lung_001"
    assert output_name("pancreas", "PANCREAS_0003") == "data0003"
    assert output_name("la", "06SR5RBREL16DQ6M8LWS") == "06SR5RBREL16DQ6M8LWS"
    with pytest.raises(ValueError, match="would be read as task 1"):
        output_name("la", "data_x")
    with pytest.raises(ValueError, match="case number"):
        output_name("lung", "tumour")


def test_pancreas_z_quirk_and_crop(tmp_path) -> None:
    from scipy import ndimage

    rng = np.random.default_rng(1)
    img, lab = _ct_case(rng, shape=(70, 36, 12), box=((30, 50), (12, 20), (4, 8)))
    out, olab, attrs = preprocess_arrays(img, lab, (2.0, 2.0, 5.0), RECIPES["pancreas"])
    # quirk: z spacing taken as the in-plane 2.0 -> every axis zoomed by 2, z too (spec 1.5)
    zl = ndimage.zoom(lab.astype(np.uint8), (2.0, 2.0, 2.0), order=0)
    assert zl.shape == (140, 72, 24) and tuple(attrs["original_shape"]) == (70, 36, 12)
    idx = np.nonzero(zl)
    lo, hi = idx[0].min() - 25, idx[0].max() + 1 + 25  # box +- 25 on axis 0 is < 96 -> widened to 96
    need = 96 - (hi - lo)
    assert need > 0
    assert attrs["crop_start"][0] == lo - need // 2 and attrs["crop_stop"][0] == hi + need - need // 2
    # axes 1 and 2 are smaller than 96: the whole axis is kept
    assert list(attrs["crop_start"][1:]) == [0, 0] and list(attrs["crop_stop"][1:]) == [72, 24]
    assert out.shape == (96, 72, 24) == olab.shape
    assert olab.sum() == zl.sum() and out.min() >= 0 and out.max() <= 1
    assert list(attrs["spacing"]) == [1.0, 1.0, 1.0] and list(attrs["original_spacing"]) == [2.0, 2.0, 5.0]
    true_z = replace(RECIPES["pancreas"], pancreas_z_quirk=False)
    out2, _, attrs2 = preprocess_arrays(img, lab, (2.0, 2.0, 5.0), true_z)
    assert out2.shape[2] == 60 and attrs2["crop_stop"][2] == 60  # z zoomed by 5 with the true spacing


def test_clip_minmax_and_box_crop_reference() -> None:
    rng = np.random.default_rng(2)
    img, lab = _ct_case(rng, shape=(60, 50, 40), box=((20, 30), (5, 15), (30, 38)))
    rec = replace(RECIPES["lung"], target_spacing=None, margin=5, min_size=(30, 12, 30))
    out, olab, attrs = preprocess_arrays(img, lab, (1.0, 1.0, 1.0), rec)
    ref = np.clip(img, -1000, 500)
    ref = (ref - ref.min()) / (ref.max() - ref.min())
    # axis 0: 15..35 (20) widened to 30 -> 10..40; axis 1: 0..20 (>= 12); axis 2: 25..40 (15) -> widen
    # to 30 -> 17..47 -> shifted inside the volume -> 10..40
    assert list(attrs["crop_start"]) == [10, 0, 10] and list(attrs["crop_stop"]) == [40, 20, 40]
    np.testing.assert_allclose(out, ref[10:40, 0:20, 10:40], atol=1e-6)
    np.testing.assert_array_equal(olab, lab[10:40, 0:20, 10:40])


def test_la_zscore_and_xy_crop() -> None:
    rng = np.random.default_rng(3)
    shape = (200, 180, 30)
    img = rng.normal(100, 20, size=shape).astype(np.float32)
    lab = np.zeros(shape, np.int16)
    lab[80:120, 60:150, 10:20] = 255  # challenge masks use 255
    out, olab, attrs = preprocess_arrays(img, lab, (0.625, 0.625, 0.625), RECIPES["la"],
                                         np.random.default_rng(0))
    s, e = attrs["crop_start"], attrs["crop_stop"]
    assert s[2] == 0 and e[2] == 30  # full z
    # x: extent 119 - 80 = 39 -> pad (112 - 39) // 2 = 36; margins in [10, 20)
    assert 80 - 36 - 19 <= s[0] <= 80 - 36 - 10 and 119 + 36 + 10 <= e[0] <= 119 + 36 + 19
    # y: extent 89 -> pad 11
    assert 60 - 11 - 19 <= s[1] <= 60 - 11 - 10 and 149 + 11 + 10 <= e[1] <= min(149 + 11 + 19, 180)
    ref = (img - img.mean()) / img.std()
    sl = tuple(slice(a, b) for a, b in zip(s, e))
    np.testing.assert_allclose(out, ref[sl], atol=1e-4)
    assert olab.sum() == 40 * 90 * 10 and set(np.unique(olab).tolist()) == {0, 1}
    assert list(attrs["spacing"]) == [0.625, 0.625, 0.625]


def test_prepare_dataset_end_to_end(tmp_path) -> None:
    rng = np.random.default_rng(4)
    src = tmp_path / "Task09_Spleen"
    for n in (2, 10):
        img, lab = _ct_case(rng, shape=(30, 30, 8))
        _save(src / f"imagesTr/spleen_{n}.nii.gz", img, (2.0, 2.0, 4.0))
        _save(src / f"labelsTr/spleen_{n}.nii.gz", lab, dtype=np.int16)
    img, _ = _ct_case(rng, shape=(30, 30, 8))
    _save(src / "imagesTr/spleen_11.nii.gz", img)
    _save(src / "labelsTr/spleen_11.nii.gz", np.zeros((30, 30, 8)), dtype=np.int16)
    out = tmp_path / "h5"
    rep = prepare_dataset("spleen", src, out)
    assert sorted(p.name for p in rep.written) == ["spleen_02.h5", "spleen_10.h5"]
    assert len(rep.skipped) == 1 and "spleen_11.nii.gz: label has no foreground" in rep.skipped[0]
    v = read_case(out / "spleen_02.h5")
    assert v.task_id == 3 and v.spacing == (1.0, 1.0, 1.0)
    assert v.attrs["original_spacing"] == [2.0, 2.0, 4.0] and v.attrs["kind"] == "spleen"
    assert v.image.shape == (60, 60, 32)  # true z spacing: 8 * 4 = 32; crop limited by the volume
    with h5py.File(out / "spleen_02.h5") as f:
        assert f["label"].dtype == np.uint8
    recipe = json.loads((out / "preprocessing.json").read_text())
    assert recipe["spleen"]["recipe"]["hu_window"] == [-125.0, 275.0]
    rep2 = prepare_dataset("spleen", src, out)
    assert rep2.written == [] and any("exists" in s for s in rep2.skipped)
    with pytest.raises(ValueError, match="kind must be one of"):
        prepare_dataset("liver", src, out)  # type: ignore[arg-type]


def test_prepare_la_from_uamt_folders(tmp_path) -> None:
    rng = np.random.default_rng(5)
    for cid in ("AAAA1111", "BBBB2222"):
        lab = np.zeros((20, 20, 10), np.uint8)
        lab[5:10, 5:10, 2:5] = 1
        write_case(tmp_path / "src" / cid / "mri_norm2.h5", rng.standard_normal((20, 20, 10)), lab)
    rep = prepare_dataset("la", tmp_path / "src", tmp_path / "out")
    assert sorted(p.name for p in rep.written) == ["AAAA1111.h5", "BBBB2222.h5"]
    v = read_case(tmp_path / "out" / "AAAA1111.h5")
    assert v.task_id == 2 and v.label.sum() == 75
    with pytest.raises(FileNotFoundError, match="mri_norm2.h5"):
        prepare_dataset("la", tmp_path / "out", tmp_path / "out2")
