"""HDF5 case reader/writer for the VerSemi 3D layout (spec versemi.md 1.2 and 1.4).

Layout: one flat folder, one ``<name>.h5`` per case, with two datasets:

- ``image``: 3D float array, axes (x, y, z) with the slice axis last;
- ``label``: 3D array of the same shape; **only the value 1 is foreground** (spec 1.4: the
  original casts to float then long and compares ``== 1``; a 2 counts as background).

Optional HDF5 attributes written by :mod:`medsemi.data.tools.prepare3d`: ``spacing`` (mm, x/y/z),
``original_spacing``, ``task_id``, ``kind``, ``source``, ...

The task id comes from the file name (spec 1.2, ``dataset/pancreas.py``): prefix ``data`` -> 1
(pancreas), ``spleen`` -> 3, ``lung`` -> 4, anything else -> 2 (left atrium). Task 5 (synthetic)
never comes from data.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

TASK_NAMES: dict[int, str] = {1: "pancreas", 2: "la", 3: "spleen", 4: "lung"}
"""Real tasks, 1-based ids as in the original (one-hot position = id - 1)."""
SYNTHETIC_TASK: int = 5
"""The synthetic "segment every foreground" task (spec 1.1); never read from files."""
NUM_TASKS: int = 5
"""Length of the task code (4 real + 1 synthetic)."""
TASK_IDS: dict[str, int] = {v: k for k, v in TASK_NAMES.items()}


def case_name(path_or_name: str | Path) -> str:
    """Case name of a file or list entry: directory and a trailing ``.h5`` removed, whitespace stripped."""
    name = Path(str(path_or_name).strip()).name
    return name[:-3] if name.endswith(".h5") else name


def task_id_from_name(name: str | Path) -> int:
    """Task id from the file-name rule of spec 1.2: ``data*`` 1, ``spleen*`` 3, ``lung*`` 4, else 2."""
    stem = case_name(name)
    if stem.startswith("data"):
        return 1
    if stem.startswith("spleen"):
        return 3
    if stem.startswith("lung"):
        return 4
    return 2


def case_path(root: str | Path, name: str) -> Path:
    """``<root>/<name>.h5`` (the flat layout of spec 1.3)."""
    return Path(root) / f"{case_name(name)}.h5"


def binarize_label(label: np.ndarray) -> np.ndarray:
    """Foreground = value 1 after the original's float -> long cast (truncation), as uint8 {0, 1}."""
    arr = np.asarray(label)
    if arr.dtype.kind == "f":
        arr = np.trunc(arr)
    return (arr == 1).astype(np.uint8)


@dataclass
class Volume:
    """One case in memory: ``image`` float32 (X, Y, Z); ``label`` uint8 (X, Y, Z) in {0, 1} or None."""

    name: str
    image: np.ndarray
    label: np.ndarray | None
    task_id: int
    spacing: tuple[float, float, float] | None = None
    attrs: dict[str, Any] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.image.shape)  # type: ignore[return-value]


class VolumeReadError(ValueError):
    """A case file that cannot be used; the message names the file and the problem."""


def read_case(path: str | Path, *, with_label: bool = True, binarize: bool = True) -> Volume:
    """Read one ``<name>.h5`` case.

    ``binarize``: return the label as uint8 {0, 1} with only the value 1 as foreground (spec 1.4);
    ``False`` keeps the raw stored values. Raises :class:`VolumeReadError` naming the file when it is
    unreadable, lacks ``image``/``label``, is not 3D or has mismatching shapes.
    """
    import h5py

    path = Path(path)
    if not path.is_file():
        raise VolumeReadError(f"{path}: file not found")
    try:
        with h5py.File(path, "r") as f:
            if "image" not in f:
                raise VolumeReadError(f"{path}: no 'image' dataset (keys: {sorted(f.keys())})")
            image = np.asarray(f["image"][()], dtype=np.float32)
            label = None
            if with_label:
                if "label" not in f:
                    raise VolumeReadError(f"{path}: no 'label' dataset (keys: {sorted(f.keys())})")
                label = np.asarray(f["label"][()])
            attrs = {k: _attr_value(v) for k, v in f.attrs.items()}
    except VolumeReadError:
        raise
    except (OSError, KeyError, ValueError, TypeError) as exc:
        raise VolumeReadError(f"{path}: unreadable HDF5 file ({exc})") from exc
    if image.ndim != 3:
        raise VolumeReadError(f"{path}: 'image' must be 3D (x, y, z), got shape {image.shape}")
    if label is not None:
        if label.shape != image.shape:
            raise VolumeReadError(f"{path}: image shape {image.shape} != label shape {label.shape}")
        if binarize:
            label = binarize_label(label)
    spacing = attrs.get("spacing")
    spacing_t = tuple(float(s) for s in spacing) if spacing is not None else None
    name = case_name(path)
    return Volume(name, image, label, task_id_from_name(name), spacing_t, attrs)  # type: ignore[arg-type]


def read_cases(root: str | Path, names: Iterable[str], **kwargs: Any) -> list[Volume]:
    """Read the listed cases from ``root`` (``<root>/<name>.h5``), in list order."""
    return [read_case(case_path(root, n), **kwargs) for n in names]


def write_case(
    path: str | Path,
    image: np.ndarray,
    label: np.ndarray,
    *,
    spacing: Sequence[float] | None = None,
    attrs: dict[str, Any] | None = None,
    compression: str | None = "gzip",
) -> Path:
    """Write one case in the layout above (image float32, label uint8). Returns the path."""
    import h5py

    path = Path(path)
    image = np.asarray(image, dtype=np.float32)
    label = np.asarray(label)
    if image.ndim != 3 or image.shape != label.shape:
        raise ValueError(f"{path}: need 3D image and label of one shape, got {image.shape} / {label.shape}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with h5py.File(tmp, "w") as f:
        f.create_dataset("image", data=image, compression=compression)
        f.create_dataset("label", data=label.astype(np.uint8), compression=compression)
        if spacing is not None:
            f.attrs["spacing"] = np.asarray(spacing, dtype=np.float64)
        for k, v in (attrs or {}).items():
            f.attrs[k] = v
    tmp.replace(path)
    return path


def _attr_value(v: Any) -> Any:
    if isinstance(v, bytes):
        return v.decode()
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, np.generic):
        return v.item()
    return v
