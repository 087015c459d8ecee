"""``check_volumes``: every bad case is reported, naming the file."""

from __future__ import annotations

import h5py
import numpy as np

from medsemi.data.synthetic.volumes3d import write_synthetic_dataset
from medsemi.data.tools.check3d import check_volumes
from medsemi.data.volumes.lists import load_versemi_split


def _h5(path, **datasets) -> None:
    with h5py.File(path, "w") as f:
        for k, v in datasets.items():
            f[k] = v


def test_good_synthetic_folder_has_no_problems(tmp_path) -> None:
    write_synthetic_dataset(tmp_path, n_per_task=2, seed=0, size_range=(32, 33))
    split = load_versemi_split(20, list_dir=tmp_path / "lists")
    assert check_volumes(tmp_path) == []
    assert check_volumes(tmp_path, split.train_pool + split.all_test) == []


def test_each_bad_case_is_reported(tmp_path) -> None:
    img = np.zeros((8, 8, 8), np.float32)
    lab = np.zeros((8, 8, 8), np.uint8)
    lab[2:4, 2:4, 2:4] = 1
    _h5(tmp_path / "data0001.h5", image=img, label=lab)  # good
    _h5(tmp_path / "data0002.h5", label=lab)
    _h5(tmp_path / "data0003.h5", image=img)
    _h5(tmp_path / "data0004.h5", image=img, label=lab[:, :, :7])
    lab2 = lab.copy()
    lab2[0, 0, 0] = 2
    _h5(tmp_path / "data0005.h5", image=img, label=lab2)
    (tmp_path / "data0006.h5").write_bytes(b"\x00garbage")
    nan = img.copy()
    nan[1, 1, 1] = np.nan
    _h5(tmp_path / "data0007.h5", image=nan, label=lab)
    _h5(tmp_path / "data0008.h5", image=img, label=np.zeros_like(lab))
    _h5(tmp_path / "data0009.h5", image=img[0], label=lab[0])
    problems = check_volumes(tmp_path)
    by_file = {f"data{i:04d}": [p for p in problems if f"data{i:04d}.h5" in p] for i in range(1, 10)}
    assert by_file["data0001"] == []
    assert any("missing 'image'" in p for p in by_file["data0002"])
    assert any("missing 'label'" in p for p in by_file["data0003"])
    assert any("image shape (8, 8, 8) != label shape (8, 8, 7)" in p for p in by_file["data0004"])
    assert any("unexpected label values [2]" in p for p in by_file["data0005"])
    assert any("unreadable" in p for p in by_file["data0006"])
    assert any("NaN" in p for p in by_file["data0007"])
    assert any("no foreground" in p for p in by_file["data0008"])
    assert any("not 3D" in p for p in by_file["data0009"])
    assert len(problems) == sum(len(v) for v in by_file.values())  # every problem names its file
    # allowing 2 silences that problem only
    assert not any("data0005" in p for p in check_volumes(tmp_path, allowed_labels=(0, 1, 2)))


def test_listed_cases_and_folders(tmp_path) -> None:
    _h5(tmp_path / "lung_001.h5", image=np.zeros((4, 4, 4), np.float32), label=np.ones((4, 4, 4), np.uint8))
    problems = check_volumes(tmp_path, ["lung_001", "lung_002\r"])
    assert len(problems) == 1 and "lung_002.h5: listed case 'lung_002' missing" in problems[0]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert check_volumes(empty) == [f"{empty}: empty folder (no *.h5 files)"]
    assert check_volumes(tmp_path / "nope") == [f"{tmp_path / 'nope'}: folder not found"]
    _h5(tmp_path / "lung_003.h5", image=np.zeros((4, 4, 4), np.float32))
    assert check_volumes(tmp_path, ["lung_001"]) == []
    assert any("lung_003.h5" in p for p in check_volumes(tmp_path, ["lung_001"], check_unlisted=True))
