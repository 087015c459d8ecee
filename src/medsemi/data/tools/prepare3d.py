"""Build the VerSemi HDF5 layout from public NIfTI data (spec versemi.md 1.5; the original's
preprocessing was never released, so each recipe says where it comes from).

- **pancreas** [INF strong, BCP ``pancreas_preprocess.py``]: resample to 1 mm with that script's quirk
  (the slice spacing is first set equal to the in-plane x spacing, so every axis is zoomed by the
  in-plane factor; ``true_z_spacing=True`` uses the real slice thickness instead); clip HU to
  [-125, 275]; min-max to [0, 1] over the whole volume; crop to the ground-truth bounding box grown by
  25 voxels per side and to at least 96 voxels per axis (as far as the volume allows).
- **la** [INF strong, UA-MT ``la_heart_processing.py``]: native spacing (0.625 mm); per-volume z-score
  over the whole volume; crop x and y only around the ground truth with a random 10-19 voxel margin per
  side (plus symmetric widening to at least 112), full z range. Foreground = any non-zero label value
  (the challenge masks use 255). A folder of UA-MT ``<ID>/mri_norm2.h5`` files (already preprocessed)
  is also accepted and copied into the flat layout.
- **spleen** [our choice, UNK in the spec]: MSD Task09; resample to 1 x 1 x 1 mm with the true spacing;
  abdominal window [-125, 275] HU (as pancreas); min-max to [0, 1]; crop = GT box + 25, at least 96.
- **lung** [our choice, UNK in the spec]: MSD Task06 (label 1 = tumour); resample to 1 x 1 x 1 mm with
  the true spacing; lung window [-1000, 500] HU (keeps parenchyma and soft-tissue tumour apart);
  min-max to [0, 1]; crop = GT box + 25, at least 96.

Label mapping (``Recipe.foreground_values``, printed by ``medsemi data prepare``): pancreas, spleen and
lung take label value 1 as the foreground, la any non-zero value. Every other non-zero value becomes
background, and the summary says so per case with its voxel count (e.g. MSD Task07's tumour, value 2);
``foreground=(1, 2)`` (``--foreground 1,2``) merges such values into the foreground. A case whose label
holds none of the foreground values is not written, and the summary says why.

The ground-truth crop is label-dependent for test cases too, as in the original (spec 1.5, N21).
Image interpolation is trilinear (``scipy.ndimage.zoom`` order 1), labels nearest-neighbour.
Output: ``<out_dir>/<name>.h5`` (``image`` float32, ``label`` uint8 {0,1}) with attributes ``spacing``,
``original_spacing``, ``original_shape``, ``crop_start``, ``crop_stop`` (in resampled voxels),
``task_id``, ``kind``, ``source``; plus ``<out_dir>/preprocessing.json`` describing the recipe.
Case names follow the release lists: ``data%04d``, LA ids, ``spleen_%02d``, ``lung_%03d``.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal

import numpy as np

from medsemi.data.volumes.cases import TASK_IDS, read_case, task_id_from_name, write_case
from medsemi.data.volumes.nifti import find_nifti_cases, read_nifti_case

Kind = Literal["pancreas", "la", "spleen", "lung"]


@dataclass(frozen=True)
class Recipe:
    """Preprocessing of one dataset kind (see the module docstring for the sources)."""

    kind: str
    target_spacing: tuple[float, float, float] | None
    intensity: Literal["clip_minmax", "zscore"]
    hu_window: tuple[float, float] | None = None
    crop: Literal["box_margin", "la_xy"] = "box_margin"
    margin: int = 25
    min_size: tuple[int, int, int] = (96, 96, 96)
    pancreas_z_quirk: bool = False
    foreground_values: tuple[int, ...] | None = (1,)
    la_margin_range: tuple[int, int] = (10, 20)

    @property
    def task_id(self) -> int:
        return TASK_IDS[self.kind]


RECIPES: dict[str, Recipe] = {
    "pancreas": Recipe("pancreas", (1.0, 1.0, 1.0), "clip_minmax", (-125.0, 275.0), pancreas_z_quirk=True),
    "la": Recipe("la", None, "zscore", None, crop="la_xy", min_size=(112, 112, 0), foreground_values=None),
    "spleen": Recipe("spleen", (1.0, 1.0, 1.0), "clip_minmax", (-125.0, 275.0)),
    "lung": Recipe("lung", (1.0, 1.0, 1.0), "clip_minmax", (-1000.0, 500.0)),
}


@dataclass
class PrepareReport:
    """What :func:`prepare_dataset` did: written files, skipped cases (with the reason) and label notes."""

    written: list[Path] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # label values turned into background, per case
    mapping: str = ""

    @property
    def existing(self) -> list[str]:
        return [s for s in self.skipped if s.endswith(EXISTS)]

    @property
    def problems(self) -> list[str]:
        """Cases not written because of their data (not because their output already existed)."""
        return [s for s in self.skipped if not s.endswith(EXISTS)]

    def summary(self, out_dir: str | Path) -> str:
        lines = [f"label mapping: {self.mapping}"] if self.mapping else []
        lines += [f"note: {n}" for n in self.notes]
        lines += [f"not written: {s}" for s in self.problems]
        if self.existing:
            lines.append(f"skipped {len(self.existing)} case(s) whose output already exists in {out_dir} "
                         "(--overwrite replaces them)")
        lines.append(f"{len(self.written)} case(s) written, {len(self.existing)} already there, "
                     f"{len(self.problems)} not written because of a problem, into {out_dir}")
        return "\n".join(lines)


EXISTS = "exists (use overwrite)"


def describe_mapping(values: tuple[int, ...] | None) -> str:
    if values is None:
        return "foreground = any non-zero label value"
    return f"foreground = label value(s) {', '.join(map(str, values))}; every other value -> background"


def output_name(kind: str, stem: str) -> str:
    """Case name in the release naming for a source file stem (e.g. ``spleen_2`` -> ``spleen_02``)."""
    if kind == "la":
        name = stem
    else:
        digits = re.findall(r"\d+", stem)
        if not digits:
            raise ValueError(f"{stem}: cannot find a case number in the file name for kind {kind!r}")
        n = int(digits[-1])
        name = {"pancreas": f"data{n:04d}", "spleen": f"spleen_{n:02d}", "lung": f"lung_{n:03d}"}[kind]
    if task_id_from_name(name) != TASK_IDS[kind]:
        raise ValueError(f"{stem}: output name {name!r} would be read as task {task_id_from_name(name)}, "
                         f"not {kind} ({TASK_IDS[kind]}); rename the source file")
    return name


def _foreground(label: np.ndarray, values: tuple[int, ...] | None) -> np.ndarray:
    if values is None:
        return (label != 0).astype(np.uint8)
    return np.isin(label, values).astype(np.uint8)


def dropped_values(label: np.ndarray, values: tuple[int, ...] | None) -> dict[int, int]:
    """Non-zero label values that the mapping turns into background, with their voxel counts."""
    if values is None:
        return {}
    found, counts = np.unique(np.asarray(label), return_counts=True)
    return {int(v): int(c) for v, c in zip(found, counts) if v != 0 and int(v) not in values}


def _resample(image: np.ndarray, label: np.ndarray, spacing: tuple[float, float, float],
              recipe: Recipe) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    if recipe.target_spacing is None:
        return image, label, spacing
    from scipy import ndimage

    src = (spacing[0], spacing[1], spacing[0]) if recipe.pancreas_z_quirk else spacing
    factors = tuple(s / t for s, t in zip(src, recipe.target_spacing))
    if all(abs(f - 1.0) < 1e-6 for f in factors):
        return image, label, recipe.target_spacing
    image = ndimage.zoom(image, factors, order=1)
    label = ndimage.zoom(label, factors, order=0)
    return image, label, recipe.target_spacing


def _box_crop(fg: np.ndarray, margin: int, min_size: tuple[int, int, int]) -> tuple[list[int], list[int]]:
    """GT bounding box grown by ``margin``, then widened symmetrically to ``min_size``, inside the volume."""
    idx = np.nonzero(fg)
    start, stop = [], []
    for ax in range(3):
        n = fg.shape[ax]
        lo, hi = int(idx[ax].min()) - margin, int(idx[ax].max()) + 1 + margin
        lo, hi = max(lo, 0), min(hi, n)
        need = min(min_size[ax], n) - (hi - lo)
        if need > 0:
            lo -= need // 2
            hi += need - need // 2
            if lo < 0:
                hi, lo = hi - lo, 0
            if hi > n:
                lo, hi = lo - (hi - n), n
        start.append(lo)
        stop.append(hi)
    return start, stop


def _la_crop(fg: np.ndarray, recipe: Recipe, rng: np.random.Generator) -> tuple[list[int], list[int]]:
    """UA-MT crop: x and y around the GT with random margins, widened to ``min_size``; full z."""
    idx = np.nonzero(fg)
    start, stop = [0, 0, 0], list(fg.shape)
    a, b = recipe.la_margin_range
    for ax in range(2):
        lo, hi = int(idx[ax].min()), int(idx[ax].max())
        pad = max(recipe.min_size[ax] - (hi - lo), 0) // 2
        start[ax] = max(lo - int(rng.integers(a, b)) - pad, 0)
        stop[ax] = min(hi + int(rng.integers(a, b)) + pad, fg.shape[ax])
    return start, stop


def preprocess_arrays(image: np.ndarray, label: np.ndarray, spacing: tuple[float, float, float],
                      recipe: Recipe, rng: np.random.Generator | None = None, *, source: str = "<array>"
                      ) -> tuple[np.ndarray, np.ndarray, dict]:
    """Apply ``recipe`` to one volume; returns (image float32, label uint8 {0,1}, attributes)."""
    rng = rng if rng is not None else np.random.default_rng(0)
    fg = _foreground(np.asarray(label), recipe.foreground_values)
    if not fg.any():
        present = sorted(int(v) for v in np.unique(np.asarray(label)) if v != 0)
        raise ValueError(
            f"{source}: label has no foreground (non-zero values present: {present or 'none'}; "
            f"{describe_mapping(recipe.foreground_values)}), so there is nothing to crop around"
            + ("; --foreground chooses the foreground values" if present else "")
        )
    img = np.asarray(image, dtype=np.float32)
    img, fg, new_spacing = _resample(img, fg, spacing, recipe)
    if recipe.intensity == "clip_minmax":
        lo, hi = recipe.hu_window  # type: ignore[misc]
        img = np.clip(img, lo, hi)
        vmin, vmax = float(img.min()), float(img.max())
        if vmax <= vmin:
            raise ValueError(f"{source}: constant image after clipping to {recipe.hu_window}")
        img = (img - vmin) / (vmax - vmin)
    else:
        std = float(img.std())
        if std == 0:
            raise ValueError(f"{source}: constant image, cannot z-score")
        img = (img - float(img.mean())) / std
    if recipe.crop == "la_xy":
        start, stop = _la_crop(fg, recipe, rng)
    else:
        start, stop = _box_crop(fg, recipe.margin, recipe.min_size)
    sl = tuple(slice(a, b) for a, b in zip(start, stop))
    attrs = {
        "spacing": np.asarray(new_spacing, dtype=np.float64),
        "original_spacing": np.asarray(spacing, dtype=np.float64),
        "original_shape": np.asarray(np.shape(image), dtype=np.int64),
        "crop_start": np.asarray(start, dtype=np.int64),
        "crop_stop": np.asarray(stop, dtype=np.int64),
        "task_id": recipe.task_id,
        "kind": recipe.kind,
        "source": source,
    }
    return img[sl].astype(np.float32), fg[sl].astype(np.uint8), attrs


def prepare_dataset(
    kind: Kind,
    src_dir: str | Path,
    out_dir: str | Path,
    *,
    overwrite: bool = False,
    seed: int = 0,
    recipe: Recipe | None = None,
    true_z_spacing: bool = False,
    foreground: tuple[int, ...] | None = None,
) -> PrepareReport:
    """Convert an MSD/nnU-Net NIfTI folder (``imagesTr``/``labelsTr``) of ``kind`` into ``<name>.h5`` files.

    ``kind``: pancreas, la, spleen or lung. ``recipe`` overrides :data:`RECIPES`; ``true_z_spacing``
    turns off the pancreas z-spacing quirk; ``foreground`` sets the label values that are foreground
    (e.g. ``(1, 2)`` merges MSD pancreas tumour into the pancreas). For ``la``, ``src_dir`` may instead hold UA-MT
    ``<ID>/mri_norm2.h5`` folders (copied as they are). Existing outputs are kept unless ``overwrite``.
    Cases whose label has no foreground are skipped and reported.
    """
    if kind not in RECIPES:
        raise ValueError(f"kind must be one of {sorted(RECIPES)}, got {kind!r}")
    rec = recipe or RECIPES[kind]
    if true_z_spacing:
        rec = replace(rec, pancreas_z_quirk=False)
    if foreground is not None:
        rec = replace(rec, foreground_values=tuple(int(v) for v in foreground))
    src, out = Path(src_dir), Path(out_dir)
    if not src.is_dir():
        raise FileNotFoundError(f"{src}: source folder not found")
    out.mkdir(parents=True, exist_ok=True)
    report = PrepareReport(mapping=f"{kind}: {describe_mapping(rec.foreground_values)}")
    if kind == "la" and not (src / "imagesTr").is_dir():
        return _copy_uamt_la(src, out, overwrite, report)
    for i, case in enumerate(find_nifti_cases(src)):
        name = output_name(kind, case.name)
        target = out / f"{name}.h5"
        case_rng = np.random.default_rng([seed, i])  # per case: independent of skips and order of runs
        if target.exists() and not overwrite:
            report.skipped.append(f"{target}: {EXISTS}")
            continue
        image, label = read_nifti_case(case)
        assert label is not None
        dropped = dropped_values(label.data, rec.foreground_values)
        if dropped:
            report.notes.append(
                f"{case.label_path}: label value(s) " + ", ".join(f"{v} ({n} voxels)" for v, n in dropped.items())
                + " set to background (--foreground merges them)"
            )
        try:
            img, lab, attrs = preprocess_arrays(image.data, label.data, image.spacing, rec, case_rng,
                                                source=str(case.image_path))
        except ValueError as exc:
            report.skipped.append(str(exc))
            continue
        report.written.append(write_case(target, img, lab, attrs=attrs))
    _write_recipe(out, rec, seed)
    return report


def _copy_uamt_la(src: Path, out: Path, overwrite: bool, report: PrepareReport) -> PrepareReport:
    files = sorted(src.glob("*/mri_norm2.h5"))
    if not files:
        raise FileNotFoundError(f"{src}: neither imagesTr/ (NIfTI) nor <ID>/mri_norm2.h5 (UA-MT) found")
    for f in files:
        name = output_name("la", f.parent.name)
        target = out / f"{name}.h5"
        if target.exists() and not overwrite:
            report.skipped.append(f"{target}: {EXISTS}")
            continue
        vol = read_case(f, binarize=False)
        attrs = {"task_id": 2, "kind": "la", "source": str(f), "spacing": np.full(3, 0.625)}
        report.written.append(write_case(target, vol.image, (vol.label == 1).astype(np.uint8), attrs=attrs))
    _write_recipe(out, RECIPES["la"], None, note="copied from UA-MT mri_norm2.h5 (already preprocessed)")
    return report


def _write_recipe(out: Path, rec: Recipe, seed: int | None, note: str = "") -> None:
    info = {"recipe": asdict(rec), "seed": seed, "note": note, "layout": "<name>.h5 with image/label"}
    path = out / "preprocessing.json"
    existing = json.loads(path.read_text()) if path.is_file() else {}
    existing[rec.kind] = info
    path.write_text(json.dumps(existing, indent=2))


__all__ = ["RECIPES", "Recipe", "PrepareReport", "prepare_dataset", "preprocess_arrays", "output_name"]
