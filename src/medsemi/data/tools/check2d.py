"""``medsemi data check`` for the 2D formats: what is on disk, and every problem with the file that has it.

``check_dataset(root, format)`` lists every domain and split like the readers do, opens every file
(``deep=False``: headers only) and returns a :class:`CheckReport`:

- per domain and split: number of images, of images with masks, image sizes, channel counts, raw label
  values found in the masks;
- errors (training refuses data with any): image without mask (labelled/test use; an image listed in
  ``mask_optional``, or a generic training case not named as labelled/validation in splits.json, is only
  a warning since unlabelled data needs no mask, spec 6 item 12), image/mask size mismatch, mask values the
  codec does not know, unreadable or corrupt file, empty domain, wrong channel count or mode, image size
  other than the patch size when the reader does not resize, malformed generic file names / unknown cases /
  cases without a domain;
- warnings: mask without image, counts that differ from the paper's (spec 1.2 table; the shipped samples
  are partial), unexpected values in RGB (M&Ms) masks, 8-bit normalisation of values outside 0..255.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from medsemi.data.formats.base import (
    SPLITS,
    DataFormatError,
    Entry,
    Format2D,
    PairLoader,
)
from medsemi.data.formats.registry import open_format

_MAX_VALUES = 32  # label values listed per split


@dataclass(frozen=True)
class Problem:
    severity: str  # "error" | "warning"
    code: str
    message: str
    path: Path | None = None
    domain: str | None = None
    split: str | None = None

    def __str__(self) -> str:
        where = f"{self.path}: " if self.path is not None else ""
        ctx = "/".join(x for x in (self.domain, self.split) if x)
        return f"[{self.code}] {where}{self.message}" + (f" ({ctx})" if ctx else "")


@dataclass
class SplitStats:
    domain: str
    split: str
    images: int = 0
    with_mask: int = 0
    sizes: Counter = field(default_factory=Counter)  # (H, W) -> count
    channels: Counter = field(default_factory=Counter)  # channels on disk -> count
    label_values: set = field(default_factory=set)  # raw values (grey) or colours (RGB masks)

    def to_dict(self) -> dict[str, Any]:
        return {
            "domain": self.domain,
            "split": self.split,
            "images": self.images,
            "with_mask": self.with_mask,
            "sizes": {f"{h}x{w}": n for (h, w), n in sorted(self.sizes.items())},
            "channels": dict(sorted(self.channels.items())),
            "label_values": sorted(self.label_values, key=str)[:_MAX_VALUES],
        }


@dataclass
class CheckReport:
    root: Path
    format: str
    stats: list[SplitStats] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "warning"]

    @property
    def ok(self) -> bool:
        return not self.errors

    def add(
        self,
        severity: str,
        code: str,
        message: str,
        path: Path | None = None,
        domain: str | None = None,
        split: str | None = None,
    ) -> None:
        self.problems.append(Problem(severity, code, message, path, domain, split))

    def stat(self, domain: str, split: str) -> SplitStats | None:
        return next((s for s in self.stats if s.domain == domain and s.split == split), None)

    def to_dict(self) -> dict[str, Any]:
        return {
            "root": str(self.root),
            "format": self.format,
            "ok": self.ok,
            "stats": [s.to_dict() for s in self.stats],
            "errors": [str(p) for p in self.errors],
            "warnings": [str(p) for p in self.warnings],
        }

    def to_text(self) -> str:
        lines = [
            f"{self.format} dataset at {self.root}: "
            f"{len(self.errors)} error(s), {len(self.warnings)} warning(s)"
        ]
        lines.append(
            f"  {'domain':<14}{'split':<7}{'images':>7}{'masks':>7}  sizes (HxW)  channels  label values"
        )
        for s in self.stats:
            sizes = ", ".join(f"{h}x{w}:{n}" for (h, w), n in s.sizes.most_common(3)) or "-"
            if len(s.sizes) > 3:
                sizes += ", ..."
            chans = ",".join(str(c) for c in sorted(s.channels)) or "-"
            vals = sorted(s.label_values, key=str)
            shown = ",".join(str(v) for v in vals[:8]) + (",..." if len(vals) > 8 else "")
            lines.append(
                f"  {s.domain:<14}{s.split:<7}{s.images:>7}{s.with_mask:>7}  {sizes}  {chans}  {shown or '-'}"
            )
        for title, items in (("ERRORS", self.errors), ("WARNINGS", self.warnings)):
            if items:
                lines.append(f"{title}:")
                lines += [f"  {p}" for p in items]
        return "\n".join(lines)

    def raise_if_errors(self) -> None:
        if self.errors:
            raise DataFormatError("data check failed:\n" + self.to_text())


def _channels(img: Image.Image) -> int:
    return len(img.getbands())


class _Checker:
    def __init__(
        self,
        fmt: Format2D,
        loader: PairLoader,
        report: CheckReport,
        deep: bool,
        optional: set[Path],
        generic_needed: set[str],
    ) -> None:
        self.fmt, self.loader, self.report, self.deep = fmt, loader, report, deep
        self.optional, self.generic_needed = optional, generic_needed
        self.generic = hasattr(fmt, "scan")

    def image(self, e: Entry, st: SplitStats, d: str, split: str) -> tuple[int, int] | None:
        """Checks the image file(s); returns (H, W) or None when unreadable."""
        rep = self.report
        if self.generic:
            from medsemi.data.formats.generic import read_array

            shapes, chans = set(), 0
            for f in e.images:
                try:
                    a = read_array(f)
                except Exception as exc:
                    rep.add("error", "unreadable", str(exc), f, d, split)
                    return None
                shapes.add(a.shape[:2])
                chans += 1 if a.ndim == 2 else a.shape[2]
                norm = getattr(self.loader, "normalization", "uint8")
                if norm == "uint8" and a.size and (a.min() < 0 or a.max() > 255):
                    rep.add(
                        "warning",
                        "intensity",
                        f"values {a.min()}..{a.max()} outside 0..255 with uint8 normalisation",
                        f,
                        d,
                        split,
                    )
            st.channels[chans] += 1
            if len(shapes) > 1:
                rep.add(
                    "error", "size_mismatch", f"channel files have sizes {sorted(shapes)}", e.image, d, split
                )
            if chans != self.loader.channels:
                rep.add(
                    "error",
                    "channels",
                    f"case {e.name} has {chans} channel(s), dataset.json names {self.loader.channels}",
                    e.image,
                    d,
                    split,
                )
            return next(iter(shapes))
        try:
            img = Image.open(e.image)
            if self.deep:
                img.load()
        except Exception as exc:
            rep.add("error", "unreadable", f"cannot read image: {exc}", e.image, d, split)
            return None
        st.channels[_channels(img)] += 1
        if img.mode not in self.fmt.accepted_image_modes:
            rep.add(
                "error",
                "channels",
                f"image mode {img.mode} ({_channels(img)} channel(s)); "
                f"{self.fmt.name} expects {' or '.join(self.fmt.accepted_image_modes)}",
                e.image,
                d,
                split,
            )
        return (img.size[1], img.size[0])

    def mask(self, e: Entry, hw: tuple[int, int] | None, st: SplitStats, d: str, split: str) -> None:
        rep = self.report
        if not e.has_mask:
            missing = [m for m in e.masks if not m.is_file()] or list(e.masks)
            expected = ", ".join(str(m) for m in missing) or "(no mask name known)"
            if self.generic:
                severe = split == "test" or e.name in self.generic_needed
            else:
                severe = e.image.resolve() not in self.optional
            if severe:
                rep.add("error", "missing_mask", f"image has no mask: expected {expected}", e.image, d, split)
            else:
                rep.add(
                    "warning",
                    "missing_mask",
                    f"image has no mask (usable only as unlabelled): expected {expected}",
                    e.image,
                    d,
                    split,
                )
            return
        st.with_mask += 1
        for m in e.masks:
            try:
                if self.generic:
                    from medsemi.data.formats.generic import read_label_array

                    arr = read_label_array(m)
                    mhw, raw = arr.shape[:2], (arr if self.deep else None)
                else:
                    img = Image.open(m)
                    mhw = (img.size[1], img.size[0])
                    raw = np.asarray(img.convert(self.fmt.mask_mode)) if self.deep else None
            except Exception as exc:
                rep.add("error", "unreadable", f"cannot read mask: {exc}", m, d, split)
                continue
            if hw is not None and tuple(mhw) != tuple(hw):
                rep.add(
                    "error",
                    "size_mismatch",
                    f"mask is {mhw[0]}x{mhw[1]} but its image {e.image.name} is {hw[0]}x{hw[1]}",
                    m,
                    d,
                    split,
                )
            if raw is not None:
                self.values(raw, m, st, d, split)

    def values(self, raw: np.ndarray, m: Path, st: SplitStats, d: str, split: str) -> None:
        codec = self.loader.codec
        if raw.ndim == 3:  # RGB masks (M&Ms): colours and per-channel values
            colours = np.unique(raw.reshape(-1, raw.shape[-1]), axis=0)
            st.label_values.update(tuple(int(x) for x in c) for c in colours[:_MAX_VALUES])
            bad = sorted(set(np.unique(raw).tolist()) - {0, 255})
            if bad:
                self.report.add(
                    "warning",
                    "label_values",
                    f"channel values {bad[:10]} other than 0/255 (decoded as background)",
                    m,
                    d,
                    split,
                )
            return
        found = np.unique(raw).tolist()
        st.label_values.update(int(v) for v in found[:_MAX_VALUES])
        if codec.allowed_values is not None:
            bad = sorted(set(found) - set(codec.allowed_values))
            if bad:
                self.report.add(
                    "error",
                    "label_values",
                    f"unexpected mask values {bad[:10]}; "
                    f"{codec.name} masks hold {list(codec.allowed_values)}",
                    m,
                    d,
                    split,
                )


def _generic_groups(fmt: Any, split: str, report: CheckReport) -> dict[int, list[Entry]]:
    problems: list[tuple[Path, str]] = []
    cases = fmt.scan(split, problems)
    for p, msg in problems:
        report.add("error", "bad_name", msg, p, None, split)
    groups: dict[int, list[Entry]] = {}
    for case in sorted(cases):
        try:
            e = fmt.entry(case, split, cases[case])
        except DataFormatError as exc:
            report.add("error", "no_domain", str(exc), cases[case][0], None, split)
            continue
        groups.setdefault(e.domain, []).append(e)
    orders = (fmt.split_file or {}).get(f"{split}_order") or {}
    for d, ids in orders.items():  # the orders of splits.json must name known cases of their domain
        if d not in fmt.domains:
            report.add(
                "error",
                "splits_json",
                f"{split}_order names unknown domain {d!r}",
                fmt.root / "splits.json",
                None,
                split,
            )
            continue
        i = fmt.domains.index(d)
        known = {e.name for e in groups.get(i, [])}
        for c in ids:
            if c not in known:
                report.add(
                    "error",
                    "splits_json",
                    f"{split}_order[{d!r}] names {c!r}, not a {split} case of domain {d}",
                    fmt.root / "splits.json",
                    d,
                    split,
                )
    return groups


def check_dataset(
    root: str | Path,
    format: str | Format2D,
    *,
    patch_size: int | Sequence[int] | None = None,
    list_dir: str | Path | None = None,
    deep: bool = True,
    mask_optional: Iterable[str | Path] = (),
    compare_counts: bool = True,
) -> CheckReport:
    """Check a 2D dataset on disk (see the module docstring). Never raises for bad data: it reports.

    ``mask_optional``: image paths used only as unlabelled data (e.g. ``splits.unlabelled.image_paths``),
    whose missing masks are warnings. ``deep=False`` reads headers only (no label values, no corrupt
    pixel data detected).
    """
    name = format if isinstance(format, str) else format.name
    report = CheckReport(Path(root), name)
    if not Path(root).is_dir():
        report.add("error", "missing_root", "dataset folder does not exist", Path(root))
        return report
    try:
        fmt = open_format(format, root)
    except (OSError, DataFormatError, ValueError) as exc:
        report.add("error", "format", str(exc), Path(root))
        return report
    if hasattr(fmt, "strict"):
        fmt.strict = False  # type: ignore[attr-defined]
    loader = fmt.loader(patch_size)
    generic_needed: set[str] = set()
    if hasattr(fmt, "scan"):
        sf = getattr(fmt, "split_file", None) or {}
        generic_needed = set(sf.get("labelled", [])) | set(sf.get("validation", []))
        if sf:
            try:
                fmt.explicit_lists()  # type: ignore[attr-defined]
            except (DataFormatError, FileNotFoundError) as exc:
                report.add("error", "splits_json", str(exc), fmt.root / "splits.json")
    expected: dict[str, dict[str, int | None]] = {}
    if compare_counts:
        from medsemi.data.formats.splits import _EXPECTED

        expected = _EXPECTED.get(fmt.name, {})
    checker = _Checker(fmt, loader, report, deep, {Path(p).resolve() for p in mask_optional}, generic_needed)
    native_hw: tuple[int, int] | None = None
    if loader.size is None:
        native_hw = (
            getattr(fmt, "patch_hw", None)
            if hasattr(fmt, "scan")
            else (None if fmt.native_patch is None else (fmt.native_patch, fmt.native_patch))
        )
    for split in SPLITS:
        if hasattr(fmt, "scan"):
            groups = _generic_groups(fmt, split, report)
        else:
            groups = {}
            for i, d in enumerate(fmt.domains):
                try:
                    groups[i] = fmt.list_split(i, split, list_dir)
                except (OSError, DataFormatError) as exc:
                    report.add("error", "list_file", str(exc), None, d, split)
        for i, d in enumerate(fmt.domains):
            entries = groups.get(i, [])
            st = SplitStats(d, split, images=len(entries))
            report.stats.append(st)
            if not entries:
                report.add("error", "empty_domain", f"domain {d} has no {split} images", fmt.root, d, split)
            for e in entries:
                hw = checker.image(e, st, d, split)
                if hw is not None:
                    st.sizes[hw] += 1
                    if native_hw is not None and tuple(hw) != tuple(native_hw):
                        report.add(
                            "error",
                            "image_size",
                            f"image is {hw[0]}x{hw[1]}; the {fmt.name} reader "
                            f"does not resize and the patch is {native_hw[0]}x{native_hw[1]}",
                            e.image,
                            d,
                            split,
                        )
                checker.mask(e, hw, st, d, split)
            for m in fmt.orphan_masks(i, split):
                report.add(
                    "warning",
                    "orphan_mask",
                    "mask without image",
                    m,
                    None if hasattr(fmt, "scan") else d,
                    split,
                )
            n_exp = expected.get(split, {}).get(d)
            if n_exp is not None and n_exp != len(entries):
                report.add(
                    "warning",
                    "count",
                    f"{len(entries)} {split} images, the paper has {n_exp}",
                    None,
                    d,
                    split,
                )
        if hasattr(fmt, "scan") and loader.size is None and native_hw is None:
            sizes = Counter(s for st in report.stats if st.split == split for s in st.sizes.elements())
            if len(sizes) > 1:
                report.add(
                    "error",
                    "image_size",
                    f"images of different sizes {dict(sizes)} and no patch_size "
                    "in dataset.json to resize them",
                    fmt.root,
                    None,
                    split,
                )
    return report
