"""Shared machinery of the 2D file readers (spec ust-run.md 2.1-2.4, 2.7; section 6 items 12, 15, 16, 23).

Each on-disk format lives in its own module (``fundus``, ``prostate``, ``mnms``, ``busi``, ``generic``)
and subclasses :class:`Format2D`. A format is bound to a root folder and knows

- its domains, in the spec's order (domain code = position, stored 0-based in samples);
- how to list the files of one domain and split (:meth:`Format2D.list_split`), sorted by file name
  by default, or in the order of an optional list file per domain (``{list_dir}/{domain}_{split}.txt``,
  one image path per line: absolute, relative to the root, or a bare file name; spec 6 item 15);
- how to load one image and its label (:class:`PairLoader`): PIL mode conversion, resize (image with
  the format's filter, mask NEAREST), ``v / 127.5 - 1`` on 8-bit values, mask decoded by the codec of
  ``codecs.py`` into the label convention of ``contract.py``.

:class:`FilePairDataset` is the lazy torch ``Dataset`` of file pairs; ``cache()`` turns it into an
in-memory :class:`~medsemi.data.datasets.TensorDataset2D`. Unlabelled training data never needs a mask
file (``labels=False``). A labelled or test image whose mask is missing raises :class:`MissingMaskError`
naming the image and the expected mask path.

The mask of ``.../image/NAME`` is ``.../mask/NAME``: only the folder component called ``image`` is
replaced, never a substring of the root path (spec 6 item 16).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from medsemi.data.codecs import MaskCodec
from medsemi.data.contract import DatasetInfo
from medsemi.data.datasets import Sample, TensorDataset2D

RESAMPLE: dict[str, Image.Resampling] = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}

SPLITS = ("train", "test")


class MissingMaskError(FileNotFoundError):
    """A labelled or test image has no mask file."""

    def __init__(self, image: Path, expected: Sequence[Path] | str) -> None:
        where = expected if isinstance(expected, str) else ", ".join(str(p) for p in expected)
        super().__init__(f"image {image} has no mask: expected {where or '(no mask name known)'}")
        self.image = Path(image)


class DataFormatError(ValueError):
    """A file or a dataset description does not follow its format."""


@dataclass(frozen=True)
class Entry:
    """One sample on disk: image file(s) (one per channel group), expected mask file(s), domain, name.

    ``masks`` lists the mask paths the format expects (they may not exist); an empty tuple means the
    format knows no mask for this image (a BUSI image without ``_mask`` files, an unlabelled generic case).
    """

    images: tuple[Path, ...]
    masks: tuple[Path, ...]
    domain: int
    name: str

    @property
    def image(self) -> Path:
        return self.images[0]

    @property
    def has_mask(self) -> bool:
        return len(self.masks) > 0 and all(m.is_file() for m in self.masks)


def mask_path_for(image: Path, root: Path, image_dir: str = "image", mask_dir: str = "mask") -> Path:
    """Replace the last folder named ``image_dir`` below ``root`` by ``mask_dir`` (spec 6 item 16)."""
    image, root = Path(image), Path(root)
    try:
        rel = image.relative_to(root)
        base = root
    except ValueError:
        rel, base = image, Path()
    parts = list(rel.parts)
    for i in range(len(parts) - 2, -1, -1):  # folders only, never the file name
        if parts[i] == image_dir:
            parts[i] = mask_dir
            return base.joinpath(*parts)
    raise DataFormatError(f"image {image} is not inside a folder named {image_dir!r}")


def read_list_file(list_file: Path, search_dirs: Sequence[Path]) -> list[Path]:
    """Ordered image paths from a list file: one per line, absolute, relative to a search dir, or a name.

    Blank lines and lines starting with ``#`` are skipped. A line that matches no file is an error naming
    the list file and the line number.
    """
    out: list[Path] = []
    for number, raw in enumerate(Path(list_file).read_text().splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        p = Path(line)
        candidates = [p] if p.is_absolute() else []
        candidates += [d / p for d in search_dirs] + [d / p.name for d in search_dirs]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            raise FileNotFoundError(f"{list_file}:{number}: no file {line!r} (searched {list(search_dirs)})")
        out.append(found)
    return out


def to_unit_range(array: np.ndarray) -> torch.Tensor:
    """8-bit ``(H, W)`` / ``(H, W, C)`` -> float32 ``(C, H, W)``, ``v / 127.5 - 1`` (spec 2, Normalize_tf)."""
    a = np.asarray(array, dtype=np.float32)
    if a.ndim == 2:
        a = a[None]
    else:
        a = np.ascontiguousarray(a.transpose(2, 0, 1))
    return torch.from_numpy(a / np.float32(127.5) - np.float32(1.0))


def label_to_tensor(label: np.ndarray, codec: MaskCodec) -> torch.Tensor:
    """Decoded label array -> int64 ``(H, W)`` (exclusive) or float32 ``(K, H, W)`` (multi-label)."""
    if codec.label_spec.multilabel:
        return torch.from_numpy(np.ascontiguousarray(label, dtype=np.float32))
    return torch.from_numpy(np.ascontiguousarray(label, dtype=np.int64))


def open_image(path: Path) -> Image.Image:
    """Open and fully decode an image, turning any decoder failure into an error naming the file."""
    try:
        img = Image.open(path)
        img.load()
    except FileNotFoundError:
        raise
    except Exception as exc:  # PIL raises many types for corrupt files
        raise DataFormatError(f"cannot read image {path}: {exc}") from exc
    return img


@dataclass(frozen=True)
class PairLoader:
    """How one format turns an :class:`Entry` into tensors (PNG formats; ``generic`` overrides).

    ``size`` is ``(H, W)`` or None (native size, no resize). Multiple masks (BUSI) are merged by a
    pixel-wise maximum before resizing (spec 2.4).
    """

    codec: MaskCodec
    image_mode: str  # PIL mode the image is converted to: "RGB" or "L"
    size: tuple[int, int] | None
    image_resample: str = "bilinear"
    mask_mode: str = "L"

    @property
    def channels(self) -> int:
        return 3 if self.image_mode == "RGB" else 1

    def _resize(self, img: Image.Image, resample: str) -> Image.Image:
        if self.size is None or img.size == (self.size[1], self.size[0]):
            return img
        return img.resize((self.size[1], self.size[0]), RESAMPLE[resample])

    def load_image(self, entry: Entry) -> torch.Tensor:
        img = open_image(entry.image).convert(self.image_mode)
        return to_unit_range(np.asarray(self._resize(img, self.image_resample)))

    def load_mask_array(self, entry: Entry) -> np.ndarray:
        """The raw (merged, resized) 8-bit mask, before decoding."""
        if not entry.has_mask:
            raise MissingMaskError(entry.image, [m for m in entry.masks if not m.is_file()] or "")
        arrays = [np.asarray(open_image(m).convert(self.mask_mode)) for m in entry.masks]
        for m, a in zip(entry.masks[1:], arrays[1:]):
            if a.shape != arrays[0].shape:
                raise DataFormatError(f"mask {m} is {a.shape}, but {entry.masks[0]} is {arrays[0].shape}")
        merged = arrays[0] if len(arrays) == 1 else np.maximum.reduce(arrays)
        return np.asarray(self._resize(Image.fromarray(merged, self.mask_mode), "nearest"))

    def load_label(self, entry: Entry) -> torch.Tensor:
        return label_to_tensor(self.codec.decode(self.load_mask_array(entry)), self.codec)


class FilePairDataset(Dataset):
    """Lazy dataset of image/mask files (samples as in ``datasets.Sample``).

    ``labels=False``: masks are neither needed nor read (unlabelled data, spec 6 item 12).
    ``labels=True``: every entry must have its mask; checked here, at construction, so that a run fails
    before its first step with the image and the expected mask path.
    """

    def __init__(self, entries: Sequence[Entry], loader: PairLoader, labels: bool = True) -> None:
        self.entries = list(entries)
        self.loader = loader
        self.labels = labels
        if labels:
            for e in self.entries:
                if not e.has_mask:
                    raise MissingMaskError(e.image, [m for m in e.masks if not m.is_file()] or "")

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def names(self) -> list[str]:
        return [e.name for e in self.entries]

    @property
    def domains(self) -> torch.Tensor:
        return torch.tensor([e.domain for e in self.entries], dtype=torch.long)

    @property
    def image_paths(self) -> list[Path]:
        return [e.image for e in self.entries]

    def __getitem__(self, i: int) -> Sample:
        e = self.entries[i]
        sample: Sample = {"image": self.loader.load_image(e), "domain": e.domain, "name": e.name}
        if self.labels:
            sample["label"] = self.loader.load_label(e)
        return sample

    def subset(self, indices: Sequence[int]) -> FilePairDataset:
        return FilePairDataset([self.entries[i] for i in indices], self.loader, self.labels)

    def cache(self) -> TensorDataset2D:
        """Load everything into memory (all images must then share one size)."""
        if not self.entries:
            raise ValueError("cannot cache an empty dataset")
        samples = [self[i] for i in range(len(self))]
        shapes = {tuple(s["image"].shape) for s in samples}
        if len(shapes) > 1:
            raise DataFormatError(
                f"images have different shapes {sorted(shapes)}; set a patch size to resize"
            )
        images = torch.stack([s["image"] for s in samples])
        labels = torch.stack([s["label"] for s in samples]) if self.labels else None
        return TensorDataset2D(images, labels, [s["domain"] for s in samples], [s["name"] for s in samples])


class Format2D:
    """A dataset layout bound to a root folder. Subclasses fill the class attributes and ``list_split``."""

    name: str = ""
    domains: tuple[str, ...] = ()
    domain_titles: tuple[str, ...] = ()
    codec: MaskCodec
    native_patch: int | None = None  # patch size P of spec 1.4
    resize: bool = True  # False: images are used at native size unless a patch size is given
    image_mode: str = "L"
    accepted_image_modes: tuple[str, ...] = ("L",)  # on-disk modes check2d accepts without an error
    image_resample: str = "bilinear"
    mask_mode: str = "L"
    # spec 1.2 / 1.4 settings
    max_iter: int = 30000
    strong_range: tuple[float, float] = (0.1, 2.0)
    mask_fill: int = 0  # raw mask value used to fill rotated masks (the background value on disk)
    default_lb_num: int = 40

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    # --- listing -------------------------------------------------------------------------------------
    def list_split(self, domain: int, split: str, list_dir: str | Path | None = None) -> list[Entry]:
        """Ordered entries of one domain (0-based) and split ("train"/"test")."""
        raise NotImplementedError

    def orphan_masks(self, domain: int, split: str) -> list[Path]:
        """Mask files that belong to no image (for ``check2d``)."""
        return []

    def domain_index(self, domain: int | str) -> int:
        if isinstance(domain, str):
            if domain not in self.domains:
                raise KeyError(f"{self.name}: unknown domain {domain!r}; domains are {self.domains}")
            return self.domains.index(domain)
        if not 0 <= domain < len(self.domains):
            raise IndexError(f"{self.name}: domain index {domain} out of range 0..{len(self.domains) - 1}")
        return domain

    def list_file(self, list_dir: str | Path | None, domain: int, split: str) -> Path | None:
        """``{list_dir}/{domain name}_{split}.txt`` when it exists (UST's ``DomainN_train.txt``)."""
        if list_dir is None:
            return None
        p = Path(list_dir) / f"{self.domains[domain]}_{split}.txt"
        return p if p.is_file() else None

    # --- loading -------------------------------------------------------------------------------------
    def patch(self, patch_size: int | Sequence[int] | None) -> tuple[int, int] | None:
        if patch_size is None:
            return (self.native_patch, self.native_patch) if self.resize and self.native_patch else None
        if isinstance(patch_size, int):
            return (patch_size, patch_size)
        h, w = tuple(patch_size)
        return (int(h), int(w))

    def loader(self, patch_size: int | Sequence[int] | None = None) -> PairLoader:
        return PairLoader(
            self.codec, self.image_mode, self.patch(patch_size), self.image_resample, self.mask_mode
        )

    def dataset(
        self, entries: Sequence[Entry], patch_size: int | Sequence[int] | None = None, labels: bool = True
    ) -> FilePairDataset:
        return FilePairDataset(entries, self.loader(patch_size), labels)

    def info(self, patch_size: int | Sequence[int] | None = None) -> DatasetInfo:
        size = self.patch(patch_size) or (self.native_patch, self.native_patch)
        return DatasetInfo(
            name=self.name,
            in_channels=3 if self.image_mode == "RGB" else 1,
            label_spec=self.codec.label_spec,
            domains=self.domains,
            patch_size=tuple(int(s) for s in size),
            extra=self.settings(int(size[0])),
        )

    def settings(self, p: int) -> dict[str, Any]:
        """Per-dataset training settings of spec 1.4 (patch-dependent ones computed from ``p``).

        Blur kernel: ``k = int(0.1 P)`` made odd as ``2 floor(k/2) + 1``; TP-RAM window side
        ``2 floor(0.01 P) + 1``.
        """
        k = int(0.1 * p)
        return {
            "domain_titles": self.domain_titles,
            "max_iter": self.max_iter,
            "eval_every": 500,
            "labelled_batch": 4,
            "unlabelled_batch": 4,
            "strong_range": self.strong_range,
            "blur_kernel": 2 * (k // 2) + 1,
            "tpram_window": 2 * int(0.01 * p) + 1,
            "mask_fill_raw": self.mask_fill,
            "default_lb_num": self.default_lb_num,
            "resize": self.resize,
            "image_resample": self.image_resample,
        }


class FolderFormat(Format2D):
    """Layouts ``root/{domain}/{split}/[sub/]image/*.png`` with masks of the same name in ``mask/``."""

    sub: str = ""  # extra folder between split and image (fundus: "ROIs")
    extensions: tuple[str, ...] = (".png",)

    def image_dir(self, domain: int, split: str) -> Path:
        d = self.root / self.domains[domain] / split
        return (d / self.sub / "image") if self.sub else (d / "image")

    def _entry(self, image: Path, domain: int) -> Entry:
        name = f"{self.domains[domain]}/{image.name}"
        return Entry((image,), (mask_path_for(image, self.root),), domain, name)

    def list_split(self, domain: int, split: str, list_dir: str | Path | None = None) -> list[Entry]:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        folder = self.image_dir(domain, split)
        lf = self.list_file(list_dir, domain, split)
        if lf is not None:
            images = read_list_file(lf, [self.root, folder])
        elif folder.is_dir():
            images = sorted(
                p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in self.extensions
            )
        else:
            images = []
        return [self._entry(p, domain) for p in images]

    def orphan_masks(self, domain: int, split: str) -> list[Path]:
        folder = self.image_dir(domain, split)
        mfolder = mask_path_for(folder / "x", self.root).parent
        if not mfolder.is_dir():
            return []
        expected = {e.masks[0] for e in self.list_split(domain, split)}
        return sorted(
            p
            for p in mfolder.iterdir()
            if p.is_file() and p.suffix.lower() in self.extensions and p not in expected
        )
