"""``medsemi predict`` for task-prompted 3D models: NIfTI volumes in, NIfTI masks out (spec versemi.md 4.2).

For each ``*.nii``/``*.nii.gz`` in the input folder (macOS ``._*`` and hidden files skipped):

1. read the volume with its geometry (nibabel; axes (x, y, z) as in training, spec 1.4);
2. apply the training preprocessing of the chosen task that does not need a label
   (``info.extra["preprocessing"]``, written by ``families/volumes.py`` from ``data/tools/prepare3d.py``'s
   recipes: resampling to the target spacing, HU clip + min-max or z-score). The ground-truth crop of
   the training data cannot be reproduced on new images, so the whole volume is segmented; synthetic
   models have no recipe and take the volume as it is;
3. sliding-window inference with the task prompt (window = training crop, the run's strides, optional
   largest connected component: ``data.options``);
4. resample the mask back to the input grid (nearest neighbour) and write ``<stem>.nii.gz`` with the
   input's affine and header.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medsemi.config import Config
from medsemi.data.contract import DatasetInfo
from medsemi.workflows.output_plan import plan_outputs

NIFTI_SUFFIXES = (".nii.gz", ".nii")


def _stem(path: Path) -> str | None:
    for s in NIFTI_SUFFIXES:
        if path.name.endswith(s):
            return path.name[: -len(s)]
    return None


def list_nifti(folder: str | Path) -> list[Path]:
    """NIfTI files of a folder, sorted; a clear error when the folder is missing or holds none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: input folder not found")
    files = sorted(p for p in folder.iterdir()
                   if p.is_file() and _stem(p) is not None and not p.name.startswith("."))
    if not files:
        raise FileNotFoundError(f"{folder}: no NIfTI volumes (*.nii, *.nii.gz)")
    return files


def resolve_task(info: DatasetInfo, task: int | None) -> int:
    """The task id to query: required when the model knows several tasks; never the synthetic task."""
    tasks = {int(k): v for k, v in info.extra.get("tasks", {}).items()} or {
        i + 1: d for i, d in enumerate(info.domains)
    }
    names = ", ".join(f"{k} = {v}" for k, v in sorted(tasks.items()))
    only = str(info.extra.get("task", "") or "")  # a single-task model (data.options.task)
    if only:
        tid = next(k for k, v in tasks.items() if v == only)
        if task is not None and int(task) != tid:
            raise ValueError(f"--task {task}: this model was trained on task {tid} = {only} only")
        return tid
    if task is None:
        if len(tasks) == 1:
            return next(iter(tasks))
        raise ValueError(f"this model segments several tasks; pass --task ({names})")
    if int(task) not in tasks:
        raise ValueError(f"--task {task} is not a task of this model ({names})")
    return int(task)


def preprocess(image: np.ndarray, spacing: tuple[float, ...], recipe: dict[str, Any] | None,
               source: str = "<array>") -> np.ndarray:
    """Label-free part of a training recipe: resample to its spacing, then normalise intensities."""
    img = np.asarray(image, dtype=np.float32)
    if not recipe:
        return img
    target = recipe.get("target_spacing")
    if target:
        from scipy import ndimage

        src = (spacing[0], spacing[1], spacing[0]) if recipe.get("pancreas_z_quirk") else spacing
        factors = [s / t for s, t in zip(src, target)]
        if any(abs(f - 1.0) > 1e-6 for f in factors):
            img = ndimage.zoom(img, factors, order=1).astype(np.float32)
    if recipe.get("intensity") == "clip_minmax":
        lo, hi = recipe["hu_window"]
        img = np.clip(img, lo, hi)
        vmin, vmax = float(img.min()), float(img.max())
        if vmax <= vmin:
            raise ValueError(f"{source}: constant image after clipping to {recipe['hu_window']}")
        img = (img - vmin) / (vmax - vmin)
    elif recipe.get("intensity") == "zscore":
        std = float(img.std())
        if std == 0:
            raise ValueError(f"{source}: constant image, cannot z-score")
        img = (img - float(img.mean())) / std
    return img.astype(np.float32)


def back_to_shape(mask: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Nearest-neighbour resampling of a mask onto the input grid (identity when shapes agree)."""
    if tuple(mask.shape) == tuple(shape):
        return mask
    from scipy import ndimage

    factors = [t / s for t, s in zip(shape, mask.shape)]
    out = ndimage.zoom(mask.astype(np.uint8), factors, order=0)
    if tuple(out.shape) != tuple(shape):  # rounding guard: pad or cut the last voxel
        fixed = np.zeros(shape, dtype=np.uint8)
        sl = tuple(slice(0, min(a, b)) for a, b in zip(out.shape, shape))
        fixed[sl] = out[sl]
        out = fixed
    return out


def sliding_options(info: DatasetInfo, cfg: Config) -> dict[str, Any]:
    """Strides, largest-connected-component and windows per forward of the run (``data.options``)."""
    return {
        "strides": list(info.extra.get("strides", cfg.data.options.get("strides", (16, 16, 4)))),
        "lcc": bool(info.extra.get("lcc", cfg.data.options.get("lcc", False))),
        "sw_batch_size": int(cfg.data.options.get("sw_batch_size", 4)),
    }


def predict_volumes(
    state: dict, cfg: Config, info: DatasetInfo, input_dir: str | Path, output_dir: str | Path,
    device: str = "auto", task: int | None = None, overwrite: bool = False,
) -> list[Path]:
    """Segment every NIfTI volume of ``input_dir`` for ``task``; write uint8 masks to ``output_dir``
    (no input and, without ``overwrite``, no existing file replaced: :mod:`medsemi.workflows.output_plan`)."""
    from medsemi.device import resolve_device
    from medsemi.evaluation.volumes import predict_volume
    from medsemi.nets.build import build_model

    task_id = resolve_task(info, task)
    files = list_nifti(input_dir)  # a missing or empty folder is reported before the model is built
    plan_outputs(files, input_dir, output_dir, _target_stem, ".nii.gz", overwrite)  # and unsafe outputs too
    dev = resolve_device(device)
    model = build_model(cfg.model, info).to(dev)
    model.load_state_dict(state["model"])
    model.eval()
    recipe = info.extra.get("preprocessing", {}).get(str(task_id))
    options = sliding_options(info, cfg)
    return segment_volumes(lambda image: predict_volume(model, image, task_id, cfg, options, dev), recipe,
                           input_dir, output_dir, overwrite)


def _target_stem(path: Path) -> str:
    return _stem(path) or path.stem


def segment_volumes(predict_mask: Callable[[np.ndarray], np.ndarray], recipe: dict[str, Any] | None,
                    input_dir: str | Path, output_dir: str | Path, overwrite: bool = False) -> list[Path]:
    """Every NIfTI of ``input_dir``: recipe -> ``predict_mask`` -> back to the input grid -> ``<stem>.nii.gz``
    (``overwrite``: see :func:`predict_volumes`)."""
    import nibabel as nib

    from medsemi.data.volumes.nifti import load_nifti
    from medsemi.evaluation.sliding3d import save_prediction_nifti

    files = list_nifti(input_dir)
    targets = plan_outputs(files, input_dir, output_dir, _target_stem, ".nii.gz", overwrite)
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    written = []
    with torch.no_grad():
        for path, target in zip(files, targets):
            vol = load_nifti(path)
            image = preprocess(vol.data, vol.spacing, recipe, source=str(path))
            mask = back_to_shape(predict_mask(image), vol.data.shape)
            written.append(save_prediction_nifti(mask, nib.load(str(path)), target))
    return written
