"""Checks of a VerSemi HDF5 folder (spec versemi.md 1.4): one problem string per issue, naming the file.

Used by ``medsemi data check``. Nothing is fixed; an empty list means the folder is usable.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from medsemi.data.volumes.cases import case_path, task_id_from_name


def _check_file(path: Path, allowed_labels: Sequence[int], require_label: bool) -> list[str]:
    import h5py

    problems: list[str] = []
    try:
        with h5py.File(path, "r") as f:
            keys = sorted(f.keys())
            img = f["image"] if "image" in f else None
            lab = f["label"] if "label" in f else None
            if img is None:
                problems.append(f"{path}: missing 'image' dataset (keys: {keys})")
            if lab is None and require_label:
                problems.append(f"{path}: missing 'label' dataset (keys: {keys})")
            if img is not None and not hasattr(img, "shape"):
                problems.append(f"{path}: 'image' is a group, not a dataset")
                img = None
            if lab is not None and not hasattr(lab, "shape"):
                problems.append(f"{path}: 'label' is a group, not a dataset")
                lab = None
            if img is not None and len(img.shape) != 3:
                problems.append(f"{path}: 'image' is not 3D (shape {img.shape})")
            if img is not None and lab is not None and img.shape != lab.shape:
                problems.append(f"{path}: image shape {img.shape} != label shape {lab.shape}")
            if img is not None and img.dtype.kind not in "fiu":
                problems.append(f"{path}: 'image' has non-numeric dtype {img.dtype}")
            elif img is not None and img.dtype.kind == "f":
                arr = img[()]
                if not np.isfinite(arr).all():
                    problems.append(f"{path}: 'image' contains NaN or infinite values")
            if lab is not None:
                values = np.unique(lab[()])
                bad = [v for v in values.tolist() if v not in allowed_labels]
                if bad:
                    problems.append(
                        f"{path}: unexpected label values {bad[:10]} (allowed {list(allowed_labels)}; "
                        "only 1 is foreground, others count as background)"
                    )
                elif lab.shape and 1 not in values.tolist():
                    problems.append(f"{path}: label has no foreground (no voxel equal to 1)")
    except OSError as exc:
        problems.append(f"{path}: unreadable HDF5 file ({exc})")
    return problems


def check_volumes(
    root: str | Path,
    names: Iterable[str] | None = None,
    *,
    allowed_labels: Sequence[int] = (0, 1),
    require_label: bool = True,
    check_unlisted: bool = False,
) -> list[str]:
    """Problems of the ``<name>.h5`` files under ``root``.

    ``names``: cases that must be present (e.g. the union of a split's lists); each missing one is a
    problem. Without ``names`` every ``*.h5`` in ``root`` is checked; with ``names`` only the listed
    ones (``check_unlisted`` adds the others). Checks: folder missing or empty, unreadable file,
    missing ``image``/``label``, non-3D image, image/label shape mismatch, non-finite image values,
    label values outside ``allowed_labels``, label without foreground.
    """
    root = Path(root)
    if not root.is_dir():
        return [f"{root}: folder not found"]
    present = sorted(root.glob("*.h5"))
    if not present:
        return [f"{root}: empty folder (no *.h5 files)"]
    problems: list[str] = []
    if names is None:
        files = present
    else:
        listed = list(dict.fromkeys(n.strip() for n in names if n.strip()))
        files = []
        for n in listed:
            p = case_path(root, n)
            if p.is_file():
                files.append(p)
            else:
                problems.append(f"{p}: listed case {n!r} missing")
        if check_unlisted:
            known = set(files)
            files += [p for p in present if p not in known]
    for p in files:
        problems.extend(_check_file(p, tuple(allowed_labels), require_label))
    return problems


def summarise_volumes(root: str | Path) -> dict:
    """Counts, shapes, spacing and label values of the ``*.h5`` cases under ``root``, per task (spec 1.2's
    file-name rule), for ``medsemi data check --format versemi``."""
    import h5py

    tasks: dict[str, dict] = {}
    for path in sorted(Path(root).glob("*.h5")) if Path(root).is_dir() else []:
        task = f"task {task_id_from_name(path)}"
        t = tasks.setdefault(task, {"cases": 0, "with_label": 0, "shapes": set(), "spacings": set(),
                                    "label_values": set()})
        t["cases"] += 1
        try:
            with h5py.File(path, "r") as f:
                if "image" in f and hasattr(f["image"], "shape"):
                    t["shapes"].add(tuple(int(s) for s in f["image"].shape))
                if "spacing" in f.attrs:
                    t["spacings"].add(tuple(round(float(s), 3) for s in np.asarray(f.attrs["spacing"]).ravel()))
                if "label" in f and hasattr(f["label"], "shape"):
                    t["with_label"] += 1
                    t["label_values"].update(int(v) for v in np.unique(f["label"][()]).tolist())
        except OSError:
            continue  # reported by check_volumes
    return {
        task: {"cases": t["cases"], "with_label": t["with_label"], "shapes": sorted(map(list, t["shapes"])),
               "spacings": sorted(map(list, t["spacings"])), "label_values": sorted(t["label_values"])}
        for task, t in tasks.items()
    }


def summary_text(root: str | Path, summary: dict, problems: list[str]) -> str:
    """The ``data check`` table of a volume folder: one row per task, then every problem."""
    lines = [f"{root} (versemi): {sum(t['cases'] for t in summary.values())} case(s), {len(problems)} problem(s)",
             f"  {'task':<12}{'cases':>6}{'labels':>7}  shapes (DxHxW)  spacing (mm)  label values"]
    for task, t in summary.items():
        shapes = ", ".join("x".join(map(str, s)) for s in t["shapes"][:3]) + (" ..." if len(t["shapes"]) > 3 else "")
        spacing = ", ".join("x".join(f"{v:g}" for v in s) for s in t["spacings"][:2]) or "-"
        lines.append(f"  {task:<12}{t['cases']:>6}{t['with_label']:>7}  {shapes or '-'}  {spacing}  "
                     f"{t['label_values'] or '-'}")
    if problems:
        lines += ["", "PROBLEMS", *(f"  {p}" for p in problems)]
    return "\n".join(lines)
