"""``medsemi data prepare`` says what it did: a summary of written / skipped cases and why, an explicit
label mapping with ``--foreground`` to merge values, and ``--overwrite`` (issue 11, item 4)."""

from pathlib import Path

import nibabel as nib
import numpy as np

from medsemi.cli import main
from medsemi.data.volumes.cases import read_case


def _save(path: Path, arr: np.ndarray, dtype=np.float32) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(arr, dtype=dtype), np.eye(4)), str(path))


def _case(src: Path, name: str, label_values: dict[int, tuple[slice, ...]]) -> None:
    rng = np.random.default_rng(len(name))
    shape = (24, 24, 8)
    _save(src / "imagesTr" / f"{name}.nii.gz", rng.uniform(-200, 300, shape))
    lab = np.zeros(shape, np.int16)
    for value, box in label_values.items():
        lab[box] = value
    _save(src / "labelsTr" / f"{name}.nii.gz", lab, dtype=np.int16)


ORGAN = (slice(8, 16), slice(8, 16), slice(2, 6))
TUMOUR = (slice(10, 12), slice(10, 12), slice(3, 5))


def test_spleen_case_with_only_value_2_is_reported_not_silently_dropped(tmp_path, capsys):
    src, out = tmp_path / "Task09", tmp_path / "h5"
    _case(src, "spleen_1", {1: ORGAN})
    _case(src, "spleen_2", {2: ORGAN})
    assert main(["data", "prepare", "spleen", str(src), str(out)]) == 1
    text = capsys.readouterr().out
    assert "spleen_2.nii.gz" in text and "no foreground" in text and "[2]" in text
    assert "1 case(s) written" in text and "1 not written" in text
    assert "foreground = label value(s) 1" in text
    assert sorted(p.name for p in out.glob("*.h5")) == ["spleen_01.h5"]


def test_pancreas_tumour_is_reported_and_can_be_merged(tmp_path, capsys):
    src = tmp_path / "Task07"
    _case(src, "pancreas_001", {1: ORGAN, 2: TUMOUR})
    tumour_voxels = 2 * 2 * 2
    assert main(["data", "prepare", "pancreas", str(src), str(tmp_path / "default")]) == 0
    text = capsys.readouterr().out
    assert f"label value(s) 2 ({tumour_voxels} voxels) set to background" in text and "--foreground" in text
    default = read_case(tmp_path / "default" / "data0001.h5")

    assert main(["data", "prepare", "pancreas", str(src), str(tmp_path / "merged"), "--foreground", "1,2"]) == 0
    text = capsys.readouterr().out
    assert "set to background" not in text and "label value(s) 1, 2" in text
    merged = read_case(tmp_path / "merged" / "data0001.h5")
    assert merged.label.sum() == default.label.sum() + tumour_voxels  # the tumour is part of the organ now


def test_a_second_run_says_it_skipped_and_overwrite_replaces(tmp_path, capsys):
    src, out = tmp_path / "Task09", tmp_path / "h5"
    _case(src, "spleen_1", {1: ORGAN})
    assert main(["data", "prepare", "spleen", str(src), str(out)]) == 0
    capsys.readouterr()
    target = out / "spleen_01.h5"
    target.write_bytes(b"stale")  # so that a replacement is visible
    assert main(["data", "prepare", "spleen", str(src), str(out)]) == 0
    text = capsys.readouterr().out
    assert "skipped 1 case(s) whose output already exists" in text and "--overwrite" in text
    assert target.read_bytes() == b"stale"
    assert main(["data", "prepare", "spleen", str(src), str(out), "--overwrite"]) == 0
    assert "1 case(s) written" in capsys.readouterr().out
    assert read_case(target).label.sum() > 0
