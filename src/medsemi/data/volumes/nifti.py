"""MSD / nnU-Net style NIfTI folders (``imagesTr/``, ``labelsTr/``) read with nibabel.

Supported names: MSD (``imagesTr/spleen_2.nii.gz`` + ``labelsTr/spleen_2.nii.gz``) and nnU-Net
(``imagesTr/case_0000.nii.gz`` + ``labelsTr/case.nii.gz``; only single-channel images). macOS
``._*`` files (present in the MSD archives) and hidden files are skipped. Arrays keep nibabel's
voxel order (x, y, z), which is the layout of spec versemi.md 1.4 (slice axis last).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

NIFTI_SUFFIXES = (".nii.gz", ".nii")


def _strip_suffix(name: str) -> str | None:
    for s in NIFTI_SUFFIXES:
        if name.endswith(s):
            return name[: -len(s)]
    return None


@dataclass(frozen=True)
class NiftiCase:
    """One case of a NIfTI folder: its name (file stem, nnU-Net ``_0000`` removed) and paths."""

    name: str
    image_path: Path
    label_path: Path | None


@dataclass
class NiftiVolume:
    """A NIfTI array with its geometry: ``spacing`` from the header zooms, ``affine``, ``header``."""

    data: np.ndarray
    affine: np.ndarray
    header: Any
    spacing: tuple[float, float, float]
    path: Path


def _exists(folder: Path, stem: str) -> Path | None:
    for s in NIFTI_SUFFIXES:
        cand = folder / f"{stem}{s}"
        if cand.is_file():
            return cand
    return None


def find_nifti_cases(src_dir: str | Path, *, images: str = "imagesTr", labels: str = "labelsTr",
                     require_labels: bool = True) -> list[NiftiCase]:
    """List the cases of ``src_dir/imagesTr`` with their ``labelsTr`` file, sorted by name.

    Raises ``FileNotFoundError``/``ValueError`` naming the folder or file when the image folder is
    missing or empty, or (``require_labels``) a label file is missing.
    """
    src = Path(src_dir)
    img_dir, lab_dir = src / images, src / labels
    if not img_dir.is_dir():
        raise FileNotFoundError(f"{img_dir}: image folder not found (expected an MSD/nnU-Net layout)")
    cases: list[NiftiCase] = []
    for p in sorted(img_dir.iterdir()):
        if p.name.startswith(".") or p.name.startswith("._"):
            continue
        stem = _strip_suffix(p.name)
        if stem is None:
            continue
        channel = re.search(r"_\d{4}$", stem) and not stem.endswith("_0000")
        if channel and _exists(img_dir, stem[:-5] + "_0000"):
            raise ValueError(f"{p}: multi-channel nnU-Net images are not supported (only _0000)")
        name, label_path = stem, _exists(lab_dir, stem)
        if label_path is None and stem.endswith("_0000"):
            name, label_path = stem[:-5], _exists(lab_dir, stem[:-5])
        if label_path is None and require_labels:
            raise FileNotFoundError(f"{p}: no label file {lab_dir}/{name}.nii.gz")
        cases.append(NiftiCase(name, p, label_path))
    if not cases:
        raise ValueError(f"{img_dir}: no NIfTI images (*.nii.gz, *.nii) found")
    return cases


def load_nifti(path: str | Path, *, dtype: Any = np.float32) -> NiftiVolume:
    """Load a 3D NIfTI with nibabel; errors name the file. A trailing singleton 4th axis is dropped."""
    import nibabel as nib

    path = Path(path)
    try:
        img = nib.load(str(path))
        data = np.asarray(img.dataobj, dtype=dtype)
    except Exception as exc:  # nibabel raises several types for broken files
        raise ValueError(f"{path}: unreadable NIfTI file ({exc})") from exc
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise ValueError(f"{path}: expected a 3D volume, got shape {data.shape}")
    zooms = tuple(float(z) for z in img.header.get_zooms()[:3])
    return NiftiVolume(data, np.asarray(img.affine, dtype=np.float64), img.header, zooms, path)  # type: ignore[arg-type]


def read_nifti_case(case: NiftiCase) -> tuple[NiftiVolume, NiftiVolume | None]:
    """Image (float32) and label (int16 when present) of one case; shapes must agree."""
    image = load_nifti(case.image_path, dtype=np.float32)
    if case.label_path is None:
        return image, None
    label = load_nifti(case.label_path, dtype=np.int16)
    if label.data.shape != image.data.shape:
        raise ValueError(
            f"{case.label_path}: label shape {label.data.shape} != image shape {image.data.shape} "
            f"({case.image_path})"
        )
    return image, label


def write_nifti_like(array: np.ndarray, reference: str | Path | Any, out_path: str | Path,
                     *, dtype: Any = np.uint8) -> Path:
    """Write ``array`` as NIfTI with the affine and header of ``reference`` (a path or nibabel image).

    The array must have the reference's 3D shape; the header's data type is set to ``dtype``.
    """
    import nibabel as nib

    ref = nib.load(str(reference)) if isinstance(reference, (str, Path)) else reference
    arr = np.asarray(array).astype(dtype)
    if tuple(arr.shape) != tuple(ref.shape[:3]):
        raise ValueError(f"{out_path}: array shape {arr.shape} != reference shape {tuple(ref.shape[:3])}")
    header = ref.header.copy()
    header.set_data_dtype(dtype)
    header.set_slope_inter(None, None)  # labels are stored unscaled
    out = nib.Nifti1Image(arr, ref.affine, header)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(out, str(out_path))
    return out_path
