"""Generic 2D format modelled on nnU-Net raw data, with domains and an editable split file.

Layout::

    root/
      dataset.json
      splits.json            (optional; editable)
      imagesTr/{case}_{CCCC}{ext}     imagesTs/{case}_{CCCC}{ext}
      labelsTr/{case}{ext}            labelsTs/{case}{ext}

``ext`` is ``dataset.json["file_ending"]`` (``.png`` default, or ``.nii.gz`` / ``.nii``). ``CCCC`` is
a 4-digit channel-file index starting at ``0000``; a file contributes all its channels (a grey PNG 1, an
RGB PNG 3, a NIfTI ``(H, W)`` / ``(H, W, 1)`` array 1, ``(H, W, C)`` C), in file order; the total must
equal the number of ``channel_names``. NIfTI arrays are read as nibabel returns them, first axis = rows.
A training case without a label file is allowed: it can only be used as unlabelled data.

``dataset.json`` keys (nnU-Net's plus ours)::

    {
      "name": "fundus",
      "channel_names": {"0": "R", "1": "G", "2": "B"},
      "labels": {"background": 0, "lesion": 1},          # exclusive, see below
      "file_ending": ".png",
      "numTraining": 789,
      "domain_names": ["siteA", "siteB"],                # domain codes = this order (0-based in samples)
      "domains": {"case_id": "siteA", ...},              # every case's domain (omit: one domain "all")
      "patch_size": [256, 256],                          # patch (H, W): the loader's resize target
      "resize": true,                                    # false: images used at native size (prostate)
      "image_resample": "lanczos",                       # nearest | bilinear | bicubic | lanczos
      "normalization": "uint8",                          # uint8: v/127.5 - 1; minmax: per image to [-1, 1]
      "settings": {"max_iter": 30000}                    # optional, merged into DatasetInfo.extra
    }

Labels (the label file holds one integer per pixel; labels are always resized NEAREST):

- exclusive (every value an int): ``{"background": 0, "a": 1, "b": 2}``, values ``0..K-1`` as in
  nnU-Net; class index = value; softmax over K classes.
- multi-label / region based (any value a list, nnU-Net's region syntax): every key except
  ``background`` is one sigmoid channel, in dict order, set where the pixel value is in its list (an int
  means a one-element list). Fundus: ``{"background": 0, "cup": [2], "disc": [1, 2]}`` with pixel values
  0 = background, 1 = disc rim, 2 = cup (``convert2d`` writes the general bit code instead: value =
  sum of ``2**k`` over the classes k present, here ``{"cup": [1, 3], "disc": [2, 3]}``). Writing a
  multi-label prediction back picks, per pixel, the smallest value whose memberships equal the predicted
  channels.

``splits.json``::

    {
      "labelled": [case ids], "unlabelled": [case ids], "validation": [case ids], "test": [case ids],
      "train_order": {"siteA": [case ids], ...},         # optional order of the training cases per domain
      "test_order": {"siteA": [case ids], ...}            # optional order of the test cases per domain
    }

``formats.splits.build_splits("generic", root, lb_domain=None)`` uses the four lists as written (a case id is
looked up in imagesTr, then imagesTs); with ``lb_domain`` set it applies the paper's rule (spec 1.2) to
the per-domain orders (``train_order`` / ``test_order`` when given, else sorted case ids).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from medsemi.data.codecs import MaskCodec, index_codec
from medsemi.data.contract import DatasetInfo, LabelSpec
from medsemi.data.formats.base import (
    RESAMPLE,
    SPLITS,
    DataFormatError,
    Entry,
    Format2D,
    MissingMaskError,
    PairLoader,
    label_to_tensor,
    open_image,
)

_CHANNEL = re.compile(r"^(?P<case>.+)_(?P<ch>\d{4})$")
FOLDERS = {"train": ("imagesTr", "labelsTr"), "test": ("imagesTs", "labelsTs")}


# --- label codecs -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RegionDecode:
    """Pixel value -> K binary channels, channel k set where the value is in ``regions[k]``."""

    regions: tuple[tuple[int, ...], ...]

    def __call__(self, mask: np.ndarray) -> np.ndarray:
        grey = mask if mask.ndim == 2 else mask[..., 0]
        return np.stack([np.isin(grey, r) for r in self.regions]).astype(np.float32)


@dataclass(frozen=True)
class RegionEncode:
    """K binary channels -> pixel values: per pixel, the smallest value whose region memberships equal the
    channels; a combination that no value represents gets larger regions painted first, smaller over them."""

    regions: tuple[tuple[int, ...], ...]

    def __call__(self, label: np.ndarray) -> np.ndarray:
        k = len(self.regions)
        bits = np.zeros(label.shape[1:], np.int64)
        for c in range(k):
            bits |= (label[c] > 0).astype(np.int64) << c
        out = np.zeros(label.shape[1:], np.uint8)
        done = np.zeros(label.shape[1:], bool)
        table: dict[int, int] = {}
        for v in sorted({0, *(x for r in self.regions for x in r)}):
            table.setdefault(sum(1 << c for c in range(k) if v in self.regions[c]), v)
        for pattern, v in table.items():
            hit = bits == pattern
            out[hit], done[hit] = v, True
        for c in sorted(range(k), key=lambda c: -len(self.regions[c])):
            out[~done & (label[c] > 0)] = min(self.regions[c])
        return out


def codec_from_labels(labels: dict[str, Any]) -> MaskCodec:
    """The mask codec described by a ``dataset.json`` ``labels`` entry (see the module docstring)."""
    if not isinstance(labels, dict) or not labels:
        raise DataFormatError(f"'labels' must be a non-empty mapping, got {labels!r}")
    if any(isinstance(v, (list, tuple)) for v in labels.values()):
        names, regions = [], []
        for name, v in labels.items():
            vals = tuple(int(x) for x in (v if isinstance(v, (list, tuple)) else [v]))
            if name == "background":
                if vals != (0,):
                    raise DataFormatError(f"'background' must be 0 in region-based labels, got {v!r}")
                continue
            if not vals or 0 in vals:
                raise DataFormatError(f"region {name!r} must list non-zero values, got {v!r}")
            names.append(name)
            regions.append(vals)
        spec = LabelSpec("multilabel", tuple(names))
        allowed = tuple(sorted({0, *(x for r in regions for x in r)}))
        return MaskCodec(
            "generic-regions", spec, RegionDecode(tuple(regions)), RegionEncode(tuple(regions)), allowed
        )
    items = sorted(((int(v), k) for k, v in labels.items()), key=lambda t: t[0])
    if [v for v, _ in items] != list(range(len(items))):
        raise DataFormatError(f"exclusive label values must be 0..K-1, got {dict(labels)}")
    return index_codec(LabelSpec("exclusive", tuple(k for _, k in items)))


# --- arrays -------------------------------------------------------------------------------------------
def read_array(path: Path) -> np.ndarray:
    """A 2D image/label file as ``(H, W)`` or ``(H, W, C)`` array (PNG via PIL, NIfTI via nibabel)."""
    name = path.name.lower()
    if name.endswith(".nii") or name.endswith(".nii.gz"):
        import nibabel as nib

        try:
            a = np.asarray(nib.load(str(path)).dataobj)
        except Exception as exc:
            raise DataFormatError(f"cannot read NIfTI file {path}: {exc}") from exc
        while a.ndim > 2 and a.shape[-1] == 1:
            a = a[..., 0]
        if a.ndim not in (2, 3):
            raise DataFormatError(f"{path}: expected a 2D image, got an array of shape {a.shape}")
        return a
    img = open_image(path)
    if img.mode == "P":
        img = img.convert("RGB")
    elif img.mode == "1":
        img = img.convert("L")
    return np.asarray(img)


def read_label_array(path: Path) -> np.ndarray:
    """A label file as an integer ``(H, W)`` array (palette PNGs give their indices)."""
    name = path.name.lower()
    if name.endswith(".nii") or name.endswith(".nii.gz"):
        a = read_array(path)
    else:
        a = np.asarray(open_image(path))
    if a.ndim != 2:
        raise DataFormatError(f"label file {path} must be single-channel, got shape {a.shape}")
    if np.issubdtype(a.dtype, np.floating):
        if not np.all(a == np.round(a)):
            raise DataFormatError(f"label file {path} holds non-integer values")
        a = a.astype(np.int64)
    return a


def resize_plane(a: np.ndarray, size: tuple[int, int] | None, resample: str) -> np.ndarray:
    """Resize a 2D or ``(H, W, 3)`` array to ``size = (H, W)`` with PIL (8-bit via L/RGB, else float/int)."""
    if size is None or a.shape[:2] == tuple(size):
        return a
    wh = (size[1], size[0])
    if a.dtype == np.uint8 and (a.ndim == 2 or a.shape[2] in (3, 4)):
        mode = "L" if a.ndim == 2 else ("RGB" if a.shape[2] == 3 else "RGBA")
        return np.asarray(Image.fromarray(a, mode).resize(wh, RESAMPLE[resample]))
    if a.ndim == 3:
        return np.stack([resize_plane(a[..., c], size, resample) for c in range(a.shape[2])], axis=-1)
    if resample == "nearest" and np.issubdtype(a.dtype, np.integer):
        return np.asarray(Image.fromarray(a.astype(np.int32), "I").resize(wh, RESAMPLE["nearest"]))
    return np.asarray(Image.fromarray(a.astype(np.float32), "F").resize(wh, RESAMPLE[resample]))


@dataclass(frozen=True)
class GenericLoader(PairLoader):
    """Multi-file channels, PNG or NIfTI, ``uint8`` or ``minmax`` normalisation."""

    num_channels: int = 1
    normalization: str = "uint8"

    @property
    def channels(self) -> int:
        return self.num_channels

    def load_image(self, entry: Entry) -> torch.Tensor:
        planes = []
        for f in entry.images:
            a = resize_plane(read_array(f), self.size, self.image_resample)
            planes += [a] if a.ndim == 2 else [a[..., c] for c in range(a.shape[2])]
        if len(planes) != self.num_channels:
            raise DataFormatError(
                f"case {entry.name}: {len(planes)} channels in {[str(f) for f in entry.images]}, "
                f"dataset.json names {self.num_channels}"
            )
        shapes = {p.shape for p in planes}
        if len(shapes) > 1:
            raise DataFormatError(f"case {entry.name}: channel files have different sizes {sorted(shapes)}")
        x = np.stack(planes).astype(np.float32)
        if self.normalization == "uint8":
            x = x / np.float32(127.5) - np.float32(1.0)
        elif self.normalization == "minmax":
            lo, hi = float(x.min()), float(x.max())
            x = (x - lo) / np.float32(hi - lo) * 2 - 1 if hi > lo else np.zeros_like(x)
        else:
            raise DataFormatError(f"unknown normalization {self.normalization!r} (uint8 or minmax)")
        return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))

    def load_mask_array(self, entry: Entry) -> np.ndarray:
        if not entry.has_mask:
            raise MissingMaskError(entry.image, entry.masks)
        return resize_plane(read_label_array(entry.masks[0]), self.size, "nearest")

    def load_label(self, entry: Entry) -> torch.Tensor:
        return label_to_tensor(self.codec.decode(self.load_mask_array(entry)), self.codec)


def _strip(name: str, ending: str) -> str | None:
    return name[: -len(ending)] if name.lower().endswith(ending.lower()) else None


class GenericFormat(Format2D):
    """The generic layout of the module docstring, described by ``root/dataset.json``."""

    name = "generic"
    strict = True  # False (check2d): files with malformed names are skipped by ``scan`` instead of raising

    def __init__(self, root: str | Path) -> None:
        super().__init__(root)
        path = self.root / "dataset.json"
        if not path.is_file():
            raise FileNotFoundError(f"generic dataset {self.root}: no dataset.json")
        try:
            self.meta: dict[str, Any] = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise DataFormatError(f"{path}: not valid JSON ({exc})") from exc
        for key in ("channel_names", "labels"):
            if key not in self.meta:
                raise DataFormatError(f"{path}: missing key {key!r}")
        self.name = str(self.meta.get("name", "generic"))
        self.codec = codec_from_labels(self.meta["labels"])
        self.num_channels = len(self.meta["channel_names"])
        self.file_ending = str(self.meta.get("file_ending", ".png"))
        self.case_domains: dict[str, str] | None = self.meta.get("domains")
        names = self.meta.get("domain_names")
        if names is None:
            names = sorted(set(self.case_domains.values())) if self.case_domains else ["all"]
        self.domains = tuple(str(n) for n in names)
        self.domain_titles = self.domains
        ps = self.meta.get("patch_size")
        self.patch_hw = None if ps is None else (int(ps[0]), int(ps[-1]))
        self.resize = bool(self.meta.get("resize", ps is not None)) and ps is not None
        self.image_resample = str(self.meta.get("image_resample", "bilinear"))
        if self.image_resample not in RESAMPLE:
            raise DataFormatError(f"{path}: image_resample must be one of {sorted(RESAMPLE)}")
        self.normalization = str(self.meta.get("normalization", "uint8"))
        self.image_mode = "RGB" if self.num_channels == 3 else "L"
        self.accepted_image_modes = ()
        split_path = self.root / "splits.json"
        self.split_file: dict[str, Any] | None = None
        if split_path.is_file():
            try:
                self.split_file = json.loads(split_path.read_text())
            except json.JSONDecodeError as exc:
                raise DataFormatError(f"{split_path}: not valid JSON ({exc})") from exc

    # --- cases ---------------------------------------------------------------------------------------
    def scan(self, split: str, problems: list[tuple[Path, str]] | None = None) -> dict[str, list[Path]]:
        """Case id -> channel files of imagesTr/imagesTs. Malformed names raise, or are collected."""
        folder = self.root / FOLDERS[split][0]
        files: dict[str, dict[int, Path]] = {}
        if not folder.is_dir():
            return {}
        for p in sorted(folder.iterdir()):
            stem = _strip(p.name, self.file_ending) if p.is_file() else None
            m = _CHANNEL.match(stem) if stem is not None else None
            if m is None:
                msg = f"not a '{{case}}_{{CCCC}}{self.file_ending}' image file"
                if problems is None and not self.strict:
                    continue
                if problems is None:
                    raise DataFormatError(f"{p}: {msg}")
                problems.append((p, msg))
                continue
            files.setdefault(m["case"], {})[int(m["ch"])] = p
        out: dict[str, list[Path]] = {}
        for case, chans in files.items():
            if sorted(chans) != list(range(len(chans))):
                msg = (
                    f"case {case}: channel files {sorted(chans)} are not numbered 0000..{len(chans) - 1:04d}"
                )
                if problems is None and not self.strict:
                    continue
                if problems is None:
                    raise DataFormatError(f"{folder}: {msg}")
                problems.append((chans[min(chans)], msg))
                continue
            out[case] = [chans[c] for c in sorted(chans)]
        return out

    def label_path(self, case: str, split: str) -> Path:
        return self.root / FOLDERS[split][1] / f"{case}{self.file_ending}"

    def domain_of(self, case: str) -> int:
        name = self.domains[0] if self.case_domains is None else self.case_domains.get(case)
        if name is None:
            raise DataFormatError(f"{self.root / 'dataset.json'}: case {case!r} has no entry in 'domains'")
        if name not in self.domains:
            raise DataFormatError(
                f"{self.root / 'dataset.json'}: case {case!r} has domain {name!r}, not in {self.domains}"
            )
        return self.domains.index(name)

    def entry(self, case: str, split: str, images: Sequence[Path]) -> Entry:
        return Entry(tuple(images), (self.label_path(case, split),), self.domain_of(case), case)

    def list_split(self, domain: int, split: str, list_dir: str | Path | None = None) -> list[Entry]:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if list_dir is not None:
            raise ValueError("the generic format takes its orders from splits.json, not from list files")
        cases = self.scan(split)
        order_key = f"{split}_order"
        name = self.domains[domain]
        orders = (self.split_file or {}).get(order_key) or {}
        if name in orders:
            ids = list(orders[name])
            unknown = [c for c in ids if c not in cases]
            if unknown:
                raise DataFormatError(
                    f"{self.root / 'splits.json'}: {order_key}[{name!r}] names unknown case {unknown[0]!r}"
                )
        else:
            ids = sorted(c for c in cases if self.domain_of(c) == domain)
        return [self.entry(c, split, cases[c]) for c in ids]

    def orphan_masks(self, domain: int, split: str) -> list[Path]:
        if domain != 0:  # label files have no domain until matched: reported once
            return []
        folder = self.root / FOLDERS[split][1]
        if not folder.is_dir():
            return []
        cases = self.scan(split, problems=[])
        return sorted(
            p
            for p in folder.iterdir()
            if p.is_file() and (_strip(p.name, self.file_ending) or "\0") not in cases
        )

    def explicit_lists(self) -> dict[str, list[Entry]]:
        """The ``labelled`` / ``unlabelled`` / ``validation`` / ``test`` lists of splits.json as entries."""
        if self.split_file is None:
            raise FileNotFoundError(f"generic dataset {self.root}: no splits.json (or give lb_domain)")
        tr, ts = self.scan("train"), self.scan("test")
        out: dict[str, list[Entry]] = {}
        for key in ("labelled", "unlabelled", "validation", "test"):
            ids = self.split_file.get(key, [])
            if key in ("labelled", "unlabelled", "test") and key not in self.split_file:
                raise DataFormatError(f"{self.root / 'splits.json'}: missing list {key!r}")
            entries = []
            for c in ids:
                if c in tr:
                    entries.append(self.entry(c, "train", tr[c]))
                elif c in ts:
                    entries.append(self.entry(c, "test", ts[c]))
                else:
                    raise DataFormatError(f"{self.root / 'splits.json'}: {key} names unknown case {c!r}")
            out[key] = entries
        return out

    # --- loading -------------------------------------------------------------------------------------
    def patch(self, patch_size: int | Sequence[int] | None) -> tuple[int, int] | None:
        if patch_size is None:
            return self.patch_hw if self.resize else None
        return super().patch(patch_size)

    def loader(self, patch_size: int | Sequence[int] | None = None) -> GenericLoader:
        return GenericLoader(
            self.codec,
            self.image_mode,
            self.patch(patch_size),
            self.image_resample,
            "L",
            num_channels=self.num_channels,
            normalization=self.normalization,
        )

    def info(self, patch_size: int | Sequence[int] | None = None) -> DatasetInfo:
        size = self.patch(patch_size) or self.patch_hw
        if size is None:
            raise DataFormatError(f"{self.root / 'dataset.json'}: no patch_size; pass one")
        extra = self.settings(int(size[0]))
        extra.update(self.meta.get("settings", {}))
        extra["normalization"] = self.normalization  # predict reads new images the same way
        return DatasetInfo(
            self.name, self.num_channels, self.codec.label_spec, self.domains, tuple(size), extra=extra
        )
