"""Readers of the 2D mixed-domain formats (spec ust-run.md 2.1-2.4, 2.7; 6 items 12, 15, 16, 23).

Also holds the builders of small fake copies of the four layouts used by the other 2D data tests.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from medsemi.data.datasets import TensorDataset2D
from medsemi.data.formats.base import DataFormatError, MissingMaskError, mask_path_for
from medsemi.data.formats.registry import open_format

SAMPLES = Path(__file__).resolve().parents[2] / "shared" / "data" / "samples"  # ../shared beside the repo
needs_samples = pytest.mark.skipif(not SAMPLES.is_dir(), reason="real samples not present")


# --- builders of fake datasets ------------------------------------------------------------------------
def save(path: Path, arr: np.ndarray, mode: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(arr), mode).save(path)
    return path


def _names(rng: np.random.Generator, n: int) -> list[str]:
    """n distinct file names whose sorted order differs from creation order."""
    ids = rng.choice(10**5, size=n, replace=False)
    return [f"s{int(i):05d}.png" for i in ids]


def fundus_mask(rng: np.random.Generator, size: int) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    cy, cx = rng.integers(size // 3, 2 * size // 3, 2)
    r = np.hypot(yy - cy, xx - cx)
    m = np.full((size, size), 255, np.uint8)
    m[r < size / 3] = 128
    m[r < size / 6] = 0
    return m


def make_fundus(root: Path, counts: dict[str, tuple[int, int]], size: int = 20, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for d, (ntr, nts) in counts.items():
        for split, n in (("train", ntr), ("test", nts)):
            for name in _names(rng, n):
                save(
                    root / d / split / "ROIs" / "image" / name,
                    rng.integers(0, 256, (size, size, 3), np.uint8),
                )
                m = fundus_mask(rng, size)
                save(root / d / split / "ROIs" / "mask" / name, np.stack([m] * 3, -1))
    return root


def make_prostate(root: Path, counts: dict[str, tuple[int, int]], size: int = 12, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for d, (ntr, nts) in counts.items():
        for split, n in (("train", ntr), ("test", nts)):
            for name in _names(rng, n):
                save(root / d / split / "image" / name, rng.integers(0, 256, (size, size), np.uint8))
                save(root / d / split / "mask" / name, rng.choice(np.array([0, 255], np.uint8), (size, size)))
    return root


def make_mnms(root: Path, counts: dict[str, tuple[int, int]], size: int = 14, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for d, (ntr, nts) in counts.items():
        for split, n in (("train", ntr), ("test", nts)):
            for j, name in enumerate(_names(rng, n)):
                shape = (size, size, 3) if j % 2 else (size, size)  # some RGB images, converted to L
                save(root / d / split / "image" / name, rng.integers(0, 256, shape, np.uint8))
                # overlapping channels: the decoder must let later channels overwrite earlier ones
                save(
                    root / d / split / "mask" / name,
                    rng.choice(np.array([0, 255], np.uint8), (size, size, 3)),
                )
    return root


def make_busi(root: Path, counts: dict[str, int], size: int = 10, seed: int = 0) -> Path:
    """BUSI groups ``{d} (i).png`` with 1-3 masks each (values 0/255); merged by max when read."""
    rng = np.random.default_rng(seed)
    for d, n in counts.items():
        for i in range(1, n + 1):
            stem = f"{d} ({i})"
            save(root / d / f"{stem}.png", rng.integers(0, 256, (size, size, 3), np.uint8))
            for k in range(1 + i % 3):
                suffix = "_mask" if k == 0 else f"_mask_{k}"
                m = np.zeros((size, size), np.uint8)
                y, x = rng.integers(0, size - 3, 2)
                m[y : y + 3, x : x + 3] = 255
                save(root / d / f"{stem}{suffix}.png", m)
    (root / "normal").mkdir(parents=True, exist_ok=True)
    save(root / "normal" / "normal (1).png", np.zeros((size, size), np.uint8))
    return root


# --- reference loaders (slow, obvious) ----------------------------------------------------------------
def ref_image(path: Path, mode: str, size: int | None, resample) -> torch.Tensor:
    img = Image.open(path).convert(mode)
    if size is not None:
        img = img.resize((size, size), resample)
    a = np.array(img, dtype=np.float32)
    a = a[None] if a.ndim == 2 else a.transpose(2, 0, 1)
    return torch.from_numpy(a / 127.5 - 1.0).float()


def ref_mask(paths: list[Path], mode: str, size: int | None) -> np.ndarray:
    arr = np.array(Image.open(paths[0]).convert(mode))
    for p in paths[1:]:
        b = np.array(Image.open(p).convert(mode))
        arr = np.where(b > arr, b, arr)
    img = Image.fromarray(arr)
    if size is not None:
        img = img.resize((size, size), Image.NEAREST)
    return np.array(img)


def ref_mnms_decode(rgb: np.ndarray) -> np.ndarray:
    out = np.zeros(rgb.shape[:2], np.int64)
    for i in range(rgb.shape[0]):
        for j in range(rgb.shape[1]):
            cls = 0
            for c in range(3):
                if rgb[i, j, c] == 255:
                    cls = c + 1
            out[i, j] = cls
    return out


# --- real samples ------------------------------------------------------------------------------------
@needs_samples
def test_fundus_samples_decode_like_reference() -> None:
    fmt = open_format("fundus", SAMPLES / "Fundus")
    assert fmt.domains == ("Domain1", "Domain2", "Domain3", "Domain4")
    for split in ("train", "test"):
        for d in range(4):
            entries = fmt.list_split(d, split)
            assert len(entries) == 1
            ds = fmt.dataset(entries)
            s = ds[0]
            assert s["domain"] == d and s["name"].startswith(fmt.domains[d] + "/")
            assert s["image"].shape == (3, 256, 256) and s["image"].dtype == torch.float32
            assert torch.allclose(
                s["image"], ref_image(entries[0].image, "RGB", 256, Image.LANCZOS), atol=1e-6
            )
            assert Image.open(entries[0].image).size == (800, 800)
            grey = ref_mask([entries[0].masks[0]], "L", 256)
            assert set(np.unique(grey).tolist()) <= {0, 128, 255}
            lab = s["label"]
            assert lab.shape == (2, 256, 256) and lab.dtype == torch.float32
            assert torch.equal(lab[0], torch.from_numpy((grey == 0).astype(np.float32)))
            assert torch.equal(lab[1], torch.from_numpy((grey <= 128).astype(np.float32)))
            assert bool((lab[0] <= lab[1]).all()) and lab[0].sum() > 0 and lab[1].sum() > lab[0].sum()


@needs_samples
def test_prostate_samples_domain_codes_and_labels() -> None:
    fmt = open_format("prostate", SAMPLES / "ProstateSlice")
    assert fmt.domains == ("BIDMC", "BMC", "HK", "I2CVB", "RUNMC", "UCL")
    for d, name in enumerate(fmt.domains):
        ds = fmt.dataset(fmt.list_split(d, "test"))
        s = ds[0]
        assert s["domain"] == d and s["name"] == f"{name}/00_00.png"
        assert s["image"].shape == (1, 384, 384)
        assert torch.allclose(s["image"], ref_image(ds.entries[0].image, "L", None, None), atol=1e-6)
        raw = np.array(Image.open(ds.entries[0].masks[0]))
        assert s["label"].dtype == torch.int64 and s["label"].shape == (384, 384)
        assert torch.equal(s["label"], torch.from_numpy((raw == 0).astype(np.int64)))
        assert set(s["label"].unique().tolist()) == {0, 1}
    # training images of all sites except I2CVB have masks; I2CVB's 00_01.png has none
    for d, name in enumerate(fmt.domains):
        entries = fmt.list_split(d, "train")
        if name == "I2CVB":
            assert [e.image.name for e in entries] == ["00_01.png"] and not entries[0].has_mask
            with pytest.raises(MissingMaskError) as err:
                fmt.dataset(entries, labels=True)
            msg = str(err.value)
            assert "I2CVB/train/image/00_01.png" in msg and "I2CVB/train/mask/00_01.png" in msg
            s = fmt.dataset(entries, labels=False)[0]  # unlabelled use needs no mask
            assert "label" not in s and s["image"].shape == (1, 384, 384) and s["domain"] == 3
        else:
            assert fmt.dataset(entries)[0]["label"].shape == (384, 384)


@needs_samples
def test_prostate_resize_on_request_and_cache() -> None:
    fmt = open_format("prostate", SAMPLES / "ProstateSlice")
    ds = fmt.dataset([fmt.list_split(d, "test")[0] for d in range(6)], patch_size=48)
    cached = ds.cache()
    assert isinstance(cached, TensorDataset2D) and cached.images.shape == (6, 1, 48, 48)
    assert cached.labels.shape == (6, 48, 48) and cached.domains.tolist() == list(range(6))
    for i in range(6):
        lazy = ds[i]
        assert torch.equal(lazy["image"], cached[i]["image"]) and torch.equal(
            lazy["label"], cached[i]["label"]
        )
        assert lazy["name"] == cached[i]["name"]
        assert torch.allclose(
            lazy["image"], ref_image(ds.entries[i].image, "L", 48, Image.BILINEAR), atol=1e-6
        )


# --- fake layouts ------------------------------------------------------------------------------------
def test_mask_path_replaces_only_the_folder_component(tmp_path: Path) -> None:
    root = tmp_path / "image_data" / "image"  # the root itself contains "image" twice
    make_prostate(root, {d: (2, 1) for d in ("BIDMC", "BMC", "HK", "I2CVB", "RUNMC", "UCL")})
    fmt = open_format("prostate", root)
    e = fmt.list_split(0, "train")[0]
    assert e.masks[0] == root / "BIDMC" / "train" / "mask" / e.image.name and e.has_mask
    assert mask_path_for(Path("/a/image/b/image/x_image.png"), Path("/a/image")) == Path(
        "/a/image/b/mask/x_image.png"
    )
    with pytest.raises(DataFormatError):
        mask_path_for(Path("/a/b/x.png"), Path("/a"))
    assert fmt.dataset([e])[0]["label"].shape == (12, 12)


def test_folder_order_is_sorted_and_list_files_reorder(tmp_path: Path) -> None:
    root = make_fundus(tmp_path / "Fundus", {f"Domain{i}": (4, 2) for i in range(1, 5)})
    fmt = open_format("fundus", root)
    entries = fmt.list_split(1, "train")
    on_disk = sorted(p.name for p in (root / "Domain2" / "train" / "ROIs" / "image").iterdir())
    assert [e.image.name for e in entries] == on_disk
    assert all(e.domain == 1 and e.name == f"Domain2/{e.image.name}" for e in entries)
    lists = tmp_path / "lists"
    lists.mkdir()
    order = list(reversed(on_disk))[:3]
    # three ways of naming a file: bare name, relative to the root, absolute
    lines = [
        order[0],
        f"Domain2/train/ROIs/image/{order[1]}",
        str(root / "Domain2/train/ROIs/image" / order[2]),
    ]
    (lists / "Domain2_train.txt").write_text("\n".join(lines) + "\n\n")
    assert [e.image.name for e in fmt.list_split(1, "train", lists)] == order
    assert [e.image.name for e in fmt.list_split(0, "train", lists)] == sorted(  # no list file: sorted
        p.name for p in (root / "Domain1" / "train" / "ROIs" / "image").iterdir()
    )
    (lists / "Domain2_train.txt").write_text("nope.png\n")
    with pytest.raises(FileNotFoundError, match="Domain2_train.txt:1"):
        fmt.list_split(1, "train", lists)


def test_fundus_fake_rgb_mask_and_native_size(tmp_path: Path) -> None:
    root = make_fundus(tmp_path / "F", {f"Domain{i}": (1, 1) for i in range(1, 5)}, size=24)
    fmt = open_format("fundus", root)
    e = fmt.list_split(2, "test")[0]
    s = fmt.dataset([e], patch_size=24)[0]  # P = native: no resize
    grey = np.array(Image.open(e.masks[0]).convert("L"))
    assert torch.equal(s["label"][0], torch.from_numpy((grey == 0).astype(np.float32)))
    assert torch.equal(s["label"][1], torch.from_numpy((grey <= 128).astype(np.float32)))
    assert torch.allclose(s["image"], ref_image(e.image, "RGB", None, None))
    assert fmt.dataset([e])[0]["image"].shape == (3, 256, 256)  # default P = 256 (spec 1.4)


def test_mnms_rgb_masks_later_channel_overwrites(tmp_path: Path) -> None:
    root = make_mnms(tmp_path / "mnms", {f"vendor{v}": (2, 2) for v in "ABCD"})
    fmt = open_format("mnms", root)
    for d in range(4):
        for e in fmt.list_split(d, "train"):
            s = fmt.dataset([e], patch_size=10)[0]
            assert s["domain"] == d and s["image"].shape == (1, 10, 10)
            assert torch.allclose(s["image"], ref_image(e.image, "L", 10, Image.BILINEAR), atol=1e-6)
            raw = ref_mask([e.masks[0]], "RGB", 10)
            assert torch.equal(s["label"], torch.from_numpy(ref_mnms_decode(raw)))
            assert set(s["label"].unique().tolist()) <= {0, 1, 2, 3}
    assert fmt.dataset(fmt.list_split(0, "test"))[0]["label"].shape == (288, 288)


def test_busi_groups_merge_masks_by_max(tmp_path: Path) -> None:
    root = make_busi(tmp_path / "BUSI", {"benign": 12, "malignant": 6})
    (root / "benign" / "benign (99)_mask.png").write_bytes(
        (root / "benign" / "benign (1)_mask.png").read_bytes()
    )
    save(root / "benign" / "benign (13).png", np.zeros((10, 10), np.uint8))  # image without any mask
    fmt = open_format("busi", root)
    groups, orphans = fmt._scan(0)
    names = [e.image.name for e in groups]
    assert names == sorted(names) and names[:4] == [
        "benign (1).png",
        "benign (10).png",
        "benign (11).png",
        "benign (12).png",
    ]
    assert [p.name for p in orphans] == ["benign (99)_mask.png"]
    by = {e.image.name: e for e in groups}
    assert [m.name for m in by["benign (2).png"].masks] == [
        "benign (2)_mask.png",
        "benign (2)_mask_1.png",
        "benign (2)_mask_2.png",
    ]
    assert (
        not by["benign (13).png"].has_mask and by["benign (13).png"].masks[0].name == "benign (13)_mask.png"
    )
    # 13 groups: int(0.2 * 13) = 2 test groups, the last two in order
    train, test = fmt.list_split(0, "train"), fmt.list_split(0, "test")
    assert [e.image.name for e in train + test] == names and len(test) == 2
    e = by["benign (2).png"]
    s = fmt.dataset([e], patch_size=8)[0]
    merged = ref_mask(list(e.masks), "L", 8)
    assert torch.equal(s["label"], torch.from_numpy((merged == 255).astype(np.int64)))
    single = ref_mask([e.masks[0]], "L", 8)
    assert s["label"].sum() > int((single == 255).sum())  # the other masks contribute
    assert torch.allclose(s["image"], ref_image(e.image, "L", 8, Image.LANCZOS), atol=1e-6)
    with pytest.raises(MissingMaskError, match=r"benign \(13\)_mask.png"):
        fmt.dataset([by["benign (13).png"]])


# --- generic ------------------------------------------------------------------------------------------
def test_generic_region_labels_multichannel_and_nifti(tmp_path: Path) -> None:
    import nibabel as nib

    from medsemi.data.formats.generic import codec_from_labels

    root = tmp_path / "gen"
    rng = np.random.default_rng(0)
    meta = {
        "name": "toy",
        "channel_names": {"0": "a", "1": "b"},
        "file_ending": ".nii.gz",
        "labels": {"background": 0, "inner": [2], "outer": [1, 2]},
        "domain_names": ["s2", "s1"],
        "domains": {"c1": "s1", "c2": "s2", "c3": "s1"},
        "patch_size": [6, 6],
        "resize": False,
        "normalization": "minmax",
    }
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    data = {}
    for c in ("c1", "c2", "c3"):
        chans = [rng.normal(size=(6, 6)).astype(np.float32) * 100 for _ in range(2)]
        for k, a in enumerate(chans):
            nib.save(nib.Nifti1Image(a, np.eye(4)), str(root / "imagesTr" / f"{c}_{k:04d}.nii.gz"))
        lab = rng.integers(0, 3, (6, 6)).astype(np.uint8)
        if c != "c3":  # c3 has no label: unlabelled only
            nib.save(nib.Nifti1Image(lab, np.eye(4)), str(root / "labelsTr" / f"{c}.nii.gz"))
        data[c] = (np.stack(chans), lab)
    (root / "dataset.json").write_text(json.dumps(meta))
    fmt = open_format("generic", root)
    assert fmt.domains == ("s2", "s1") and fmt.codec.label_spec.class_names == ("inner", "outer")
    assert [e.name for e in fmt.list_split(1, "train")] == ["c1", "c3"]
    s = fmt.dataset(fmt.list_split(1, "train")[:1])[0]
    x, lab = data["c1"]
    ref = (x - x.min()) / (x.max() - x.min()) * 2 - 1
    assert s["domain"] == 1 and s["image"].shape == (2, 6, 6)
    assert torch.allclose(s["image"], torch.from_numpy(ref), atol=1e-5)
    assert torch.equal(s["label"][0], torch.from_numpy((lab == 2).astype(np.float32)))
    assert torch.equal(s["label"][1], torch.from_numpy(((lab == 1) | (lab == 2)).astype(np.float32)))
    with pytest.raises(MissingMaskError, match="c3"):
        fmt.dataset(fmt.list_split(1, "train"))
    assert "label" not in fmt.dataset(fmt.list_split(1, "train"), labels=False)[1]
    # the region codec's encoder inverts its decoder on every representable pixel value
    codec = codec_from_labels(meta["labels"])
    v = np.array([[0, 1, 2], [2, 1, 0]], np.uint8)
    assert np.array_equal(codec.encode(codec.decode(v)), v)
    bits = codec_from_labels({"background": 0, "a": [1, 3], "b": [2, 3]})
    v = np.array([[0, 1, 2, 3]], np.uint8)
    assert np.array_equal(bits.encode(bits.decode(v)), v)
    assert codec_from_labels({"background": 0, "x": 1, "y": 2}).label_spec.class_names == (
        "background",
        "x",
        "y",
    )
    with pytest.raises(DataFormatError):
        codec_from_labels({"background": 0, "x": 2})
    # a case without a domain is an error naming it
    meta["domains"].pop("c2")
    (root / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(DataFormatError, match="'c2'"):
        open_format("generic", root).list_split(0, "train")


def test_generic_png_channels_and_rgb(tmp_path: Path) -> None:
    root = tmp_path / "g"
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (9, 9, 3), np.uint8)
    save(root / "imagesTr" / "a_0000.png", rgb)
    save(root / "labelsTr" / "a.png", rng.integers(0, 2, (9, 9)).astype(np.uint8))
    meta = {
        "channel_names": {"0": "R", "1": "G", "2": "B"},
        "labels": {"background": 0, "fg": 1},
        "patch_size": [5, 5],
        "image_resample": "lanczos",
    }
    (root / "dataset.json").write_text(json.dumps(meta))
    fmt = open_format("generic", root)
    assert fmt.domains == ("all",)
    s = fmt.dataset(fmt.list_split(0, "train"))[0]
    assert torch.allclose(s["image"], ref_image(root / "imagesTr" / "a_0000.png", "RGB", 5, Image.LANCZOS))
    assert s["label"].dtype == torch.int64 and s["label"].shape == (5, 5)
    meta["channel_names"] = {"0": "grey"}
    (root / "dataset.json").write_text(json.dumps(meta))
    fmt = open_format("generic", root)
    with pytest.raises(DataFormatError, match="3 channels"):
        fmt.dataset(fmt.list_split(0, "train"))[0]
