"""``medsemi data convert``: any 2D format -> the generic format of ``generic.py``.

What is written (so that the generic reader yields the same samples, in the same order, with the same
decoded tensors as the source reader):

- images at their ORIGINAL resolution after the source's mode conversion (RGB for fundus, grey for the
  others), ``imagesTr/{case}_0000{ext}`` / ``imagesTs/...``; the source's resize (size and filter) is
  recorded in ``dataset.json`` (``patch_size``, ``image_resample``) and applied at load time;
- labels decoded by the source codec at the original resolution and stored as class indices
  (exclusive) or as the bit code ``sum 2**k`` of the classes present (multi-label, e.g. fundus cup = bit 0,
  disc = bit 1); decoding is per pixel, so it commutes with the NEAREST resize of the mask;
- ``dataset.json`` with channels, labels, domain order (``domain_names``), each case's domain, the
  source's settings (spec 1.4) and the original sample names;
- ``splits.json`` with the paper split for ``lb_domain`` / ``lb_num`` (spec 1.2; the labelled, unlabelled,
  validation and test lists) and the per-domain orders ``train_order`` / ``test_order`` so that
  ``build_splits("generic", out, lb_domain=k, lb_num=n)`` reproduces the paper split for any k.

Case ids are ``{domain}_{file stem}`` (test: ``{domain}_test_{file stem}``, since train and test files
may share names) with every run of characters other than letters, digits, ``-`` and
``_`` replaced by ``-`` (``benign (1).png`` -> ``benign_benign-1``). A training image without a mask is
written without a label (usable as unlabelled only); a labelled, validation or test image without a mask
is an error.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from medsemi.data.formats.base import Entry, Format2D, MissingMaskError, PairLoader
from medsemi.data.formats.registry import open_format
from medsemi.data.formats.splits import split_lists


def case_id(entry: Entry, domain: str, split: str = "train") -> str:
    stem = entry.image.name
    for ext in (".nii.gz", ".nii", ".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"):
        if stem.lower().endswith(ext):
            stem = stem[: -len(ext)]
            break
    clean = re.sub(r"[^A-Za-z0-9_-]+", "-", stem).strip("-")
    return f"{domain}_{clean}" if split == "train" else f"{domain}_{split}_{clean}"


def _write(array: np.ndarray, path: Path) -> None:
    if path.name.endswith(".png"):
        mode = "L" if array.ndim == 2 else "RGB"
        Image.fromarray(np.ascontiguousarray(array), mode).save(path)
    else:
        import nibabel as nib

        nib.save(nib.Nifti1Image(np.ascontiguousarray(array), np.eye(4)), str(path))


def labels_entry(fmt: Format2D) -> dict[str, Any]:
    """The ``dataset.json`` ``labels`` of a source codec (index or bit code, see the module docstring)."""
    spec = fmt.codec.label_spec
    if not spec.multilabel:
        return {name: i for i, name in enumerate(spec.class_names)}
    k = spec.num_outputs
    out: dict[str, Any] = {"background": 0}
    for c, name in enumerate(spec.class_names):
        out[name] = [v for v in range(1, 2**k) if v >> c & 1]
    return out


def encode_label(fmt: Format2D, label: np.ndarray) -> np.ndarray:
    if not fmt.codec.label_spec.multilabel:
        return label.astype(np.uint8)
    out = np.zeros(label.shape[1:], np.uint8)
    for c in range(label.shape[0]):
        out |= ((label[c] > 0).astype(np.uint8) << c).astype(np.uint8)
    return out


def convert_to_generic(
    format: str | Format2D,
    root: str | Path,
    out_dir: str | Path,
    lb_domain: int = 1,
    lb_num: int | None = None,
    lb_ratio: float = 0.0,
    val_fraction: float = 0.0,
    split_seed: int = 0,
    list_dir: str | Path | None = None,
    file_ending: str = ".png",
    overwrite: bool = False,
    name: str | None = None,
) -> dict[str, Any]:
    """Write ``out_dir`` in the generic format; returns a summary (counts per domain and split)."""
    fmt = open_format(format, root)
    if file_ending not in (".png", ".nii.gz", ".nii"):
        raise ValueError(f"file_ending must be .png, .nii.gz or .nii, got {file_ending!r}")
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out} is not empty; choose an empty folder, or pass --overwrite "
                                  "(overwrite=True) to replace its imagesTr/labelsTr/imagesTs/labelsTs")
        for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
            shutil.rmtree(out / sub, ignore_errors=True)
    sl = split_lists(fmt, root, lb_domain, lb_num, lb_ratio, val_fraction, split_seed, list_dir)
    for e in sl.labelled + [e for v in sl.validation.values() for e in v]:
        if not e.has_mask:
            raise MissingMaskError(e.image, e.masks)
    native = PairLoader(fmt.codec, fmt.image_mode, None, fmt.image_resample, fmt.mask_mode)

    ids: dict[Path, str] = {}
    domains: dict[str, str] = {}
    names: dict[str, str] = {}
    counts: dict[str, dict[str, int]] = {"train": {}, "test": {}}
    missing: list[str] = []
    orders: dict[str, dict[str, list[str]]] = {"train": {}, "test": {}}
    for split, by_domain, (img_dir, lab_dir) in (
        ("train", sl.train_order, ("imagesTr", "labelsTr")),
        ("test", sl.test_order, ("imagesTs", "labelsTs")),
    ):
        (out / img_dir).mkdir(parents=True, exist_ok=True)
        (out / lab_dir).mkdir(parents=True, exist_ok=True)
        for d, entries in by_domain.items():
            orders[split][d] = []
            for e in entries:
                cid = case_id(e, d, split)
                if cid in domains:
                    raise ValueError(f"two images map to case id {cid!r}: {e.image} and {names[cid]}")
                ids[e.image], domains[cid], names[cid] = cid, d, e.name
                orders[split][d].append(cid)
                img = np.asarray(Image.open(e.image).convert(fmt.image_mode))
                _write(img, out / img_dir / f"{cid}_0000{file_ending}")
                if e.has_mask:
                    label = fmt.codec.decode(native.load_mask_array(e))
                    _write(encode_label(fmt, label), out / lab_dir / f"{cid}{file_ending}")
                elif split == "test":
                    raise MissingMaskError(e.image, e.masks)
                else:
                    missing.append(str(e.image))
            counts[split][d] = len(entries)

    patch = fmt.patch(None) or (fmt.native_patch, fmt.native_patch)
    settings = {k: (list(v) if isinstance(v, tuple) else v) for k, v in fmt.settings(int(patch[0])).items()}
    meta = {
        "name": name or fmt.name,
        "channel_names": {
            str(i): c for i, c in enumerate(("R", "G", "B") if fmt.image_mode == "RGB" else ("grey",))
        },
        "labels": labels_entry(fmt),
        "file_ending": file_ending,
        "numTraining": sum(counts["train"].values()),
        "domain_names": list(fmt.domains),
        "domains": domains,
        "patch_size": list(patch),
        "resize": fmt.resize,
        "image_resample": fmt.image_resample,
        "normalization": "uint8",
        "settings": settings,
        "source": {"format": fmt.name, "root": str(Path(root)), "names": names},
    }
    splits = {
        "labelled": [ids[e.image] for e in sl.labelled],
        "unlabelled": [ids[e.image] for e in sl.unlabelled],
        "validation": [ids[e.image] for v in sl.validation.values() for e in v],
        "test": [ids[e.image] for v in sl.test.values() for e in v],
        "train_order": orders["train"],
        "test_order": orders["test"],
        "paper_split": {
            "lb_domain": sl.lb_domain,
            "lb_num": sl.lb_num,
            "val_fraction": val_fraction,
            "split_seed": split_seed,
        },
    }
    (out / "dataset.json").write_text(json.dumps(meta, indent=2))
    (out / "splits.json").write_text(json.dumps(splits, indent=2))
    return {
        "out_dir": str(out),
        "counts": counts,
        "train_without_label": missing,
        "split": {k: len(v) for k, v in splits.items() if isinstance(v, list)},
    }


def converted_names(out_dir: str | Path) -> dict[str, str]:
    """Case id -> original sample name, from a converted ``dataset.json``."""
    meta = json.loads((Path(out_dir) / "dataset.json").read_text())
    return dict(meta.get("source", {}).get("names", {}))


__all__: Sequence[str] = ("convert_to_generic", "converted_names", "case_id", "labels_entry")
