"""HDF5 case reader (spec versemi.md 1.2, 1.4) and the shipped VerSemi lists (spec 1.3, 1.8)."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from medsemi.data.volumes.cases import (
    VolumeReadError,
    binarize_label,
    case_path,
    read_case,
    read_cases,
    task_id_from_name,
    write_case,
)
from medsemi.data.volumes.lists import (
    iterations_per_epoch,
    load_versemi_split,
    parse_list,
    per_task_labelled_lists,
    read_list,
)


@pytest.mark.parametrize(
    "name,task",
    [
        ("data0001", 1),
        ("data0082.h5", 1),
        ("/x/y/data0010.h5", 1),
        ("spleen_02", 3),
        ("lung_001", 4),
        ("lung_096.h5", 4),
        ("06SR5RBREL16DQ6M8LWS", 2),
        ("UPT6DX9IQY9JAZ7HJKA7.h5", 2),
        ("Data0001", 2),  # the rule is case-sensitive, as in the original
        ("  spleen_10 \r", 3),
    ],
)
def test_task_id_rule(name: str, task: int) -> None:
    assert task_id_from_name(name) == task


def test_roundtrip_and_label_binarisation(tmp_path) -> None:
    rng = np.random.default_rng(0)
    img = rng.standard_normal((5, 6, 7)).astype(np.float32)
    lab = rng.integers(0, 3, size=(5, 6, 7)).astype(np.uint8)  # values 0, 1, 2
    p = write_case(tmp_path / "spleen_03.h5", img, lab, spacing=(0.5, 0.6, 2.0), attrs={"kind": "spleen"})
    v = read_case(p)
    assert v.name == "spleen_03" and v.task_id == 3
    np.testing.assert_array_equal(v.image, img)
    np.testing.assert_array_equal(v.label, (lab == 1).astype(np.uint8))  # 2 is background
    assert v.spacing == (0.5, 0.6, 2.0) and v.attrs["kind"] == "spleen"
    raw = read_case(p, binarize=False)
    np.testing.assert_array_equal(raw.label, lab)
    assert read_case(p, with_label=False).label is None
    vols = read_cases(tmp_path, ["spleen_03"])
    assert len(vols) == 1 and case_path(tmp_path, "spleen_03") == p


def test_float_labels_truncate_like_the_original() -> None:
    lab = np.array([0.0, 0.9, 1.0, 1.7, 2.0, -1.0], dtype=np.float32)
    np.testing.assert_array_equal(binarize_label(lab), [0, 0, 1, 1, 0, 0])


def test_read_errors_name_the_file(tmp_path) -> None:
    p = tmp_path / "data0001.h5"
    with h5py.File(p, "w") as f:
        f["image"] = np.zeros((4, 4, 4), np.float32)
    with pytest.raises(VolumeReadError, match=r"data0001\.h5: no 'label'"):
        read_case(p)
    q = tmp_path / "data0002.h5"
    with h5py.File(q, "w") as f:
        f["label"] = np.zeros((4, 4, 4), np.uint8)
    with pytest.raises(VolumeReadError, match=r"data0002\.h5: no 'image'"):
        read_case(q)
    r = tmp_path / "data0003.h5"
    with h5py.File(r, "w") as f:
        f["image"] = np.zeros((4, 4, 4), np.float32)
        f["label"] = np.zeros((4, 4, 5), np.uint8)
    with pytest.raises(VolumeReadError, match=r"data0003\.h5: image shape \(4, 4, 4\) != label shape"):
        read_case(r)
    s = tmp_path / "data0004.h5"
    s.write_bytes(b"not an hdf5 file at all")
    with pytest.raises(VolumeReadError, match=r"data0004\.h5: unreadable"):
        read_case(s)
    with pytest.raises(VolumeReadError, match=r"data0005\.h5: file not found"):
        read_case(tmp_path / "data0005.h5")
    t = tmp_path / "data0006.h5"
    with h5py.File(t, "w") as f:
        f["image"] = np.zeros((4, 4), np.float32)
        f["label"] = np.zeros((4, 4), np.uint8)
    with pytest.raises(VolumeReadError, match=r"data0006\.h5: 'image' must be 3D"):
        read_case(t)


# ---------------------------------------------------------------- shipped lists (spec 1.3)

EXPECTED = {
    10: {"lab": 22, "unlab": 200, "lab_task": {1: 6, 2: 8, 3: 3, 4: 5},
         "unlab_task": {1: 56, 2: 72, 3: 27, 4: 45}},
    20: {"lab": 44, "unlab": 178, "lab_task": {1: 12, 2: 16, 3: 6, 4: 10},
         "unlab_task": {1: 50, 2: 64, 3: 24, 4: 40}},
}


@pytest.mark.parametrize("ratio", [10, 20])
def test_shipped_split_counts(ratio: int) -> None:
    s = load_versemi_split(ratio)
    e = EXPECTED[ratio]
    assert len(s.labelled) == e["lab"] and len(s.unlabelled) == e["unlab"]
    assert {t: len(v) for t, v in s.labelled_by_task.items()} == e["lab_task"]
    assert {t: len(v) for t, v in s.unlabelled_by_task.items()} == e["unlab_task"]
    assert {t: len(v) for t, v in s.test.items()} == {1: 18, 2: 20, 3: 11, 4: 13}
    assert set(s.labelled).isdisjoint(s.unlabelled)
    assert set(s.train_pool).isdisjoint(s.all_test)
    assert len(set(s.train_pool)) == 222 and len(set(s.all_test)) == 62
    assert s.validate() == []
    # the per-dataset lists are exactly the parts of train_lab (spec 1.3)
    per_task = per_task_labelled_lists(ratio)
    assert {t: set(v) for t, v in per_task.items()} == {t: set(v) for t, v in s.labelled_by_task.items()}


def test_shipped_split_structure() -> None:
    s10, s20 = load_versemi_split(10), load_versemi_split(20)
    assert set(s10.labelled) < set(s20.labelled)  # nested
    assert set(s10.train_pool) == set(s20.train_pool)
    assert s10.test == s20.test
    assert s10.labelled_by_task[1] == tuple(f"data{i:04d}" for i in range(1, 7))
    assert s10.labelled_by_task[3] == ("spleen_02", "spleen_03", "spleen_06")
    assert s10.labelled_by_task[4] == ("lung_001", "lung_003", "lung_004", "lung_005", "lung_006")
    pool_la = sorted(s20.labelled_by_task[2] + s20.unlabelled_by_task[2])
    assert len(pool_la) == 80
    assert sorted(s10.labelled_by_task[2]) == pool_la[:8]  # first ids alphabetically (UA-MT convention)
    assert sorted(s20.labelled_by_task[2]) == pool_la[:16]
    assert s10.test[2][0].startswith("UPT6DX") and "ULHWPWKKLTE921LQLH1P" in s10.test[2]
    pancreas = set(s10.train_pool + s10.all_test) & {f"data{i:04d}" for i in range(1, 83)}
    assert len(pancreas) == 80 and "data0025" not in pancreas and "data0070" not in pancreas
    assert set(s10.test[1]) == {f"data{i:04d}" for i in range(64, 83)} - {"data0070"}
    # every name is stripped (the files have CRLF endings)
    assert all(n == n.strip() and n for n in s10.train_pool + s10.all_test)


def test_iterations_per_epoch_table() -> None:  # spec 1.8
    assert iterations_per_epoch(44) == 27 and iterations_per_epoch(44, 178) == 22
    assert iterations_per_epoch(22) == 13 and iterations_per_epoch(22, 200) == 13
    assert iterations_per_epoch(64) == 40 and iterations_per_epoch(64, 256) == 32
    assert iterations_per_epoch(32) == 20 and iterations_per_epoch(32, 288) == 20
    s = load_versemi_split(20)
    assert iterations_per_epoch(len(s.labelled), len(s.unlabelled)) == 22


def _write_lists(folder, lab, unlab, tests, sep="\r\n", final=False) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    files = {"train_lab_20.txt": lab, "train_unlab_20.txt": unlab, "test.txt": tests[0],
             "test_la.txt": tests[1], "test_spleen.txt": tests[2], "test_lung.txt": tests[3]}
    for name, cases in files.items():
        (folder / name).write_text(sep.join(cases) + (sep if final else ""))


def test_user_list_dir(tmp_path) -> None:
    tests = (["data0009"], ["ABCDEF"], ["spleen_09"], ["lung_009"])
    _write_lists(tmp_path / "ok", ["data0001", "ZZZ", "spleen_01"], ["data0002", "lung_002", "  "], tests)
    s = load_versemi_split(20, list_dir=tmp_path / "ok")
    assert s.labelled == ("data0001", "ZZZ", "spleen_01") and s.unlabelled == ("data0002", "lung_002")
    assert s.labelled_by_task == {1: ("data0001",), 2: ("ZZZ",), 3: ("spleen_01",), 4: ()}
    assert s.test[4] == ("lung_009",)
    _write_lists(tmp_path / "bad", ["data0001"], ["data0001", "data0002"], tests)
    with pytest.raises(ValueError, match="both labelled and unlabelled"):
        load_versemi_split(20, list_dir=tmp_path / "bad")
    _write_lists(tmp_path / "leak", ["data0009"], ["data0002"], tests)
    with pytest.raises(ValueError, match="also in a test list"):
        load_versemi_split(20, list_dir=tmp_path / "leak")
    with pytest.raises(FileNotFoundError, match="train_lab_10.txt"):
        load_versemi_split(10, list_dir=tmp_path / "ok")
    _write_lists(tmp_path / "nolab", [], ["data0002"], tests)
    with pytest.raises(ValueError, match="no labelled cases"):
        load_versemi_split(20, list_dir=tmp_path / "nolab")
    with pytest.raises(ValueError, match="ratio"):
        load_versemi_split(30)


def test_parse_list_line_endings() -> None:
    assert parse_list("a\r\nb\r\n\r\nc") == ["a", "b", "c"]
    assert read_list("test_spleen.txt")[-1] == "spleen_63"
