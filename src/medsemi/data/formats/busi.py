"""BUSI breast ultrasound, 2 domains benign / malignant (spec ust-run.md 2.4, 1.4; UST only).

Layout ``Dataset_BUSI_with_GT/{benign,malignant}/"benign (N).png", "benign (N)_mask.png",
"benign (N)_mask_1.png", ...``; the ``normal`` folder is not used.

Grouping: the images of a folder (file names without a ``_mask`` suffix) in lexicographic order of their
names (the order the original obtains by sorting all files, so ``(1)`` < ``(10)`` < ``(100)``); the masks
of image ``X.png`` are the files named ``X_mask.png`` and ``X_mask_<n>.png``. The match is made on the
file NAME (spec 6 item 16); the original appended any path containing ``mask`` to the preceding image,
which differs only for malformed folders (a mask without its image, reported by ``check2d``).

Split per domain: ``n_test = int(0.2 n)``; test = the last ``n_test`` groups, train = the first
``n - n_test`` (benign 437 -> 350/87, malignant 210 -> 168/42). Images: grey (L), resized 256 LANCZOS.
Masks: merged by pixel-wise maximum, grey, resized NEAREST, foreground = 255 (``codecs.BUSI``).
A list file ``{list_dir}/{domain}_{split}.txt`` selects and orders the groups of a split by image name.
"""

from __future__ import annotations

import re
from pathlib import Path

from medsemi.data.codecs import BUSI
from medsemi.data.formats.base import SPLITS, Entry, Format2D, read_list_file

_MASK = re.compile(r"^(?P<image>.*)_mask(?:_\d+)?$")


def split_sizes(n: int) -> tuple[int, int]:
    """(train, test) group counts of spec 2.4: ``n_test = int(0.2 n)``."""
    n_test = int(0.2 * n)
    return n - n_test, n_test


class BusiFormat(Format2D):
    name = "busi"
    domains = ("benign", "malignant")
    domain_titles = domains
    codec = BUSI
    native_patch = 256
    image_mode = "L"
    accepted_image_modes = ("L", "RGB")
    image_resample = "lanczos"
    mask_mode = "L"
    max_iter = 30000
    strong_range = (0.1, 2.0)
    mask_fill = 0
    default_lb_num = 40

    def folder(self, domain: int) -> Path:
        return self.root / self.domains[domain]

    def _scan(self, domain: int) -> tuple[list[Entry], list[Path]]:
        """All groups of a domain in order, and the masks that match no image."""
        folder = self.folder(domain)
        if not folder.is_dir():
            return [], []
        files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() == ".png")
        images = [p for p in files if not _MASK.match(p.stem)]
        masks: dict[str, list[Path]] = {p.stem: [] for p in images}
        orphans: list[Path] = []
        for p in files:
            m = _MASK.match(p.stem)
            if m is None:
                continue
            if m["image"] in masks:
                masks[m["image"]].append(p)
            else:
                orphans.append(p)
        entries = []
        for p in images:
            found = tuple(masks[p.stem]) or (p.with_name(f"{p.stem}_mask.png"),)
            entries.append(Entry((p,), found, domain, f"{self.domains[domain]}/{p.name}"))
        return entries, orphans

    def list_split(self, domain: int, split: str, list_dir: str | Path | None = None) -> list[Entry]:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        groups, _ = self._scan(domain)
        lf = self.list_file(list_dir, domain, split)
        if lf is not None:
            by_image = {e.image: e for e in groups}
            chosen = read_list_file(lf, [self.root, self.folder(domain)])
            missing = [p for p in chosen if p not in by_image]
            if missing:
                raise FileNotFoundError(f"{lf}: {missing[0]} is not a BUSI image of {self.folder(domain)}")
            return [by_image[p] for p in chosen]
        n_train, _ = split_sizes(len(groups))
        return groups[:n_train] if split == "train" else groups[n_train:]

    def orphan_masks(self, domain: int, split: str) -> list[Path]:
        # masks without image belong to no group, hence to no split; reported once, under "train"
        return self._scan(domain)[1] if split == "train" else []
