"""The MiDSS split rule over fake copies of the four layouts (spec ust-run.md 1.2, 1.4, 2.4)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from test_readers2d import SAMPLES, make_busi, make_fundus, make_mnms, make_prostate, needs_samples

from medsemi.data.formats.base import MissingMaskError
from medsemi.data.formats.splits import (
    build_splits,
    dataset_info,
    expected_counts,
    split_lists,
    validation_indices,
)

PROSTATE = ("BIDMC", "BMC", "HK", "I2CVB", "RUNMC", "UCL")


def _sorted_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def _reference_split(train: dict[str, list[str]], lb_name: str, lb_num: int) -> tuple[list[str], list[str]]:
    """Spec 1.2 written out: labelled = first lb_num of lb domain; unlabelled = rest, then other domains."""
    labelled = [f"{lb_name}/{n}" for n in train[lb_name][:lb_num]]
    unlabelled = [f"{lb_name}/{n}" for n in train[lb_name][lb_num:]]
    for d, names in train.items():
        if d != lb_name:
            unlabelled += [f"{d}/{n}" for n in names]
    return labelled, unlabelled


@pytest.mark.parametrize("lb_domain", [1, 3])
def test_fundus_split_orders(tmp_path: Path, lb_domain: int) -> None:
    counts = {"Domain1": (5, 2), "Domain2": (3, 1), "Domain3": (4, 2), "Domain4": (2, 3)}
    root = make_fundus(tmp_path / "Fundus", counts, size=8)
    s = build_splits("fundus", root, lb_domain, 2, patch_size=8)
    train = {d: _sorted_files(root / d / "train" / "ROIs" / "image") for d in counts}
    lab, unl = _reference_split(train, f"Domain{lb_domain}", 2)
    assert s.labelled.names == lab and s.unlabelled.names == unl
    assert len(s.unlabelled) == 14 - 2  # total_train - lb_num
    assert {d: len(v) for d, v in s.test.items()} == {d: c[1] for d, c in counts.items()}
    for d, ds in s.test.items():
        assert ds.names == [f"{d}/{n}" for n in _sorted_files(root / d / "test" / "ROIs" / "image")]
        assert ds.domains.tolist() == [int(d[-1]) - 1] * len(ds)
    assert s.labelled.domains.tolist() == [lb_domain - 1] * 2
    assert "label" not in s.unlabelled[0] and s.labelled[0]["label"].shape == (2, 8, 8)
    assert s.info.label_spec.multilabel and s.info.patch_size == (8, 8)


def test_prostate_mnms_busi_splits_and_lb_ratio(tmp_path: Path) -> None:
    pc = {d: (3 + i, 1) for i, d in enumerate(PROSTATE)}
    root = make_prostate(tmp_path / "P", pc, size=6)
    total = sum(c[0] for c in pc.values())  # 33
    s = build_splits("prostate", root, 4, lb_ratio=0.1)
    lb_num = int(0.1 * total)  # 3: the ratio counts all domains (UST train.py:474-477)
    train = {d: _sorted_files(root / d / "train" / "image") for d in PROSTATE}
    lab, unl = _reference_split(train, "I2CVB", lb_num)
    assert s.labelled.names == lab and s.unlabelled.names == unl
    assert s.info.patch_size == (384, 384) and s.labelled[0]["image"].shape == (1, 6, 6)  # native, no resize

    mc = {"vendorA": (4, 2), "vendorB": (2, 1), "vendorC": (3, 1), "vendorD": (1, 2)}
    root = make_mnms(tmp_path / "M", mc, size=6)
    s = build_splits("mnms", root, 2, 1, patch_size=6, cache=True)
    train = {d: _sorted_files(root / d / "train" / "image") for d in mc}
    lab, unl = _reference_split(train, "vendorB", 1)
    assert s.labelled.names == lab and s.unlabelled.names == unl
    assert s.labelled.labels.shape == (1, 6, 6) and s.unlabelled.labels is None  # cached, no masks

    root = make_busi(tmp_path / "B", {"benign": 11, "malignant": 5})
    s = build_splits("busi", root, 2, 2, patch_size=6)
    # benign: 11 groups -> 9 train / 2 test; malignant: 5 -> 4 / 1 (n_test = int(0.2 n))
    b = sorted(f"benign ({i}).png" for i in range(1, 12))
    m = sorted(f"malignant ({i}).png" for i in range(1, 6))
    assert s.labelled.names == [f"malignant/{n}" for n in m[:2]]
    assert s.unlabelled.names == [f"malignant/{n}" for n in m[2:4]] + [f"benign/{n}" for n in b[:9]]
    assert s.test["benign"].names == [f"benign/{n}" for n in b[9:]] and len(s.test["malignant"]) == 1


def test_validation_is_carved_before_the_split(tmp_path: Path) -> None:
    counts = {"Domain1": (10, 1), "Domain2": (5, 1), "Domain3": (6, 1), "Domain4": (4, 1)}
    root = make_fundus(tmp_path / "F", counts, size=6)
    train = {d: _sorted_files(root / d / "train" / "ROIs" / "image") for d in counts}
    s = build_splits("fundus", root, 1, 3, patch_size=6, val_fraction=0.4, split_seed=7)
    pools, val = {}, {}
    for i, d in enumerate(counts):  # reference: the rule of the splits2d docstring
        v = int(0.4 * len(train[d]))
        pick = set(np.random.default_rng([7, i]).permutation(len(train[d]))[:v].tolist())
        val[d] = [f"{d}/{n}" for j, n in enumerate(train[d]) if j in pick]
        pools[d] = [n for j, n in enumerate(train[d]) if j not in pick]
    lab, unl = _reference_split(pools, "Domain1", 3)
    assert s.labelled.names == lab and s.unlabelled.names == unl
    assert {d: v.names for d, v in s.validation.items()} == val
    assert [len(v) for v in val.values()] == [4, 2, 2, 1]
    all_names = lab + unl + [n for v in val.values() for n in v]
    assert sorted(all_names) == sorted(f"{d}/{n}" for d in counts for n in train[d])  # a partition
    s2 = build_splits("fundus", root, 1, 3, patch_size=6, val_fraction=0.4, split_seed=8)
    assert {d: v.names for d, v in s2.validation.items()} != val  # the seed matters
    assert validation_indices(10, 0.0, 0, 0) == []
    with pytest.raises(ValueError):
        validation_indices(10, 1.0, 0, 0)


def test_split_errors(tmp_path: Path) -> None:
    root = make_fundus(tmp_path / "F", {f"Domain{i}": (2, 1) for i in range(1, 5)}, size=6)
    with pytest.raises(ValueError, match="lb_domain must be 1..4"):
        build_splits("fundus", root, 5, 1)
    with pytest.raises(ValueError, match="lb_num=3"):
        build_splits("fundus", root, 1, 3)
    with pytest.raises(ValueError, match="lb_domain"):
        split_lists("fundus", root, None)


@needs_samples
def test_samples_prostate_mismatch_only_hurts_labelled_use() -> None:
    root = SAMPLES / "ProstateSlice"
    s = build_splits("prostate", root, 1, 1)
    assert "I2CVB/00_01.png" in s.unlabelled.names and len(s.unlabelled) == 5
    assert s.unlabelled[s.unlabelled.names.index("I2CVB/00_01.png")]["domain"] == 3
    with pytest.raises(MissingMaskError, match="I2CVB/train/image/00_01.png"):
        build_splits("prostate", root, 4, 1)
    with pytest.raises(MissingMaskError, match="00_01.png"):
        build_splits("prostate", root, 1, 1, unlabelled_labels=True)
    s = build_splits("fundus", SAMPLES / "Fundus", 3, 1)
    assert s.labelled.names == ["Domain3/g0003.png"] and s.test["Domain4"][0]["label"].shape == (2, 256, 256)


def test_expected_counts_and_dataset_info() -> None:
    totals = {"fundus": 789, "prostate": 1510, "mnms": 3447, "busi": 518}
    for fmt, total in totals.items():
        assert sum(expected_counts(fmt)["train"].values()) == total
    from medsemi.data.formats.busi import split_sizes

    assert split_sizes(437) == (350, 87) and split_sizes(210) == (168, 42)
    assert expected_counts("busi")["test"] == {"benign": 87, "malignant": 42}
    assert expected_counts("fundus")["test"] == {"Domain1": 51, "Domain2": 60, "Domain3": 80, "Domain4": 80}
    # spec 1.4: channels, outputs, P, max_iter, strong range, blur, mask fill, TP-RAM window, domains
    table = {
        "fundus": (3, 2, 256, 30000, (0.5, 1.5), 25, 255, 5, 4),
        "prostate": (1, 2, 384, 60000, (0.1, 2.0), 39, 255, 7, 6),
        "mnms": (1, 4, 288, 60000, (0.1, 2.0), 29, 0, 5, 4),
        "busi": (1, 2, 256, 30000, (0.1, 2.0), 25, 0, 5, 2),
    }
    for fmt, (cin, cout, p, it, sr, blur, fill, win, nd) in table.items():
        info = dataset_info(fmt)
        x = info.extra
        assert (info.in_channels, info.label_spec.num_outputs, info.patch_size) == (cin, cout, (p, p))
        assert (
            x["max_iter"],
            x["strong_range"],
            x["blur_kernel"],
            x["mask_fill_raw"],
            x["tpram_window"],
        ) == (it, sr, blur, fill, win)
        assert info.num_domains == nd and info.label_spec.multilabel == (fmt == "fundus")
    assert dataset_info("mnms").label_spec.class_names == ("background", "lv", "myo", "rv")
    assert dataset_info("fundus", 64).extra["blur_kernel"] == 7  # int(6.4) = 6 -> 7


FULL = os.environ.get("MEDSEMI_FULL_DATA_2D")


@pytest.mark.skipif(not FULL, reason="set MEDSEMI_FULL_DATA_2D to a folder holding the full datasets")
@pytest.mark.parametrize(
    "fmt,sub",
    [("fundus", "Fundus"), ("prostate", "ProstateSlice"), ("mnms", "mnms"), ("busi", "Dataset_BUSI_with_GT")],
)
def test_paper_counts_on_full_data(fmt: str, sub: str) -> None:
    root = Path(FULL) / sub
    if not root.is_dir():
        pytest.skip(f"{root} not present")
    sl = split_lists(fmt, root, 1, 20)
    exp = expected_counts(fmt)
    assert {d: len(v) for d, v in sl.train_order.items()} == exp["train"]
    for d, n in exp["test"].items():
        if n is not None:
            assert len(sl.test[d]) == n
    assert len(sl.unlabelled) == sum(exp["train"].values()) - 20
