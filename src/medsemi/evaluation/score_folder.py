"""Score a folder of predicted masks against a folder of ground-truth masks (the field's ``evaluate_folder``).

Files are matched by their path relative to the folder, without the suffix: ``gt/A/x.png`` is scored
against ``pred/A/x.png`` (or ``pred/A/x.nii.gz`` etc.). Supported: PNG (2D, via PIL) and
``.nii``/``.nii.gz`` (2D or 3D, via nibabel). Masks are decoded with a :class:`MaskCodec`
(``data/codecs.py``); 3D volumes are decoded slice by slice along the last axis.

The domain of a case is its sub-folder relative to the ground-truth folder (``"all"`` for files at
the top level), so ``gt/{domain}/*.png`` gives per-domain means and the macro mean over domains
(spec ust-run.md 1.3). Metrics and empty-mask rules: ``medsemi.metrics``.

Spacing: ``hd95``/``asd`` are always in pixel/voxel units (as the papers report). When a spacing
is known — the ``spacing`` argument, else the ground-truth NIfTI header — ``hd95_mm``/``asd_mm``
are added (versemi.md 4.3: the mm numbers are a separate, clearly labelled output).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medsemi.data.codecs import MaskCodec
from medsemi.metrics import (
    DEFAULT_METRICS,
    DEFAULT_POLICY,
    MetricPolicy,
    aggregate,
    case_metrics,
    format_table,
)

__all__ = ["MASK_SUFFIXES", "ScoreError", "format_table", "read_mask", "score_folders"]

MASK_SUFFIXES: tuple[str, ...] = (".nii.gz", ".nii", ".png")
_RGB_LIKE_MODES = ("RGB", "RGBA", "LA", "CMYK", "YCbCr", "1")


class ScoreError(ValueError):
    """A problem with one of the mask files being scored; the message names the file."""


def _split_suffix(path: Path) -> tuple[str, str] | None:
    name = path.name.lower()
    for suffix in MASK_SUFFIXES:
        if name.endswith(suffix) and len(name) > len(suffix):
            return path.name[: -len(suffix)], suffix
    return None


def _index_masks(folder: Path) -> dict[str, Path]:
    """``{relative path without suffix: file}`` of every mask file under ``folder``."""
    found: dict[str, Path] = {}
    for path in sorted(folder.rglob("*")):
        split = _split_suffix(path)
        if split is None or not path.is_file():
            continue
        key = (path.parent.relative_to(folder) / split[0]).as_posix()
        if key in found:
            raise ScoreError(f"{path}: two mask files for case {key!r} ({found[key].name} and {path.name})")
        found[key] = path
    return found


def read_mask(path: Path, codec: MaskCodec) -> tuple[np.ndarray, tuple[float, ...] | None]:
    """Raw mask array and the header spacing (NIfTI only; None for PNG)."""
    path = Path(path)
    suffix = _split_suffix(path)
    try:
        if suffix is not None and suffix[1] == ".png":
            from PIL import Image

            with Image.open(path) as im:
                im.load()
                if codec.rgb:
                    im = im.convert("RGB")
                elif im.mode in _RGB_LIKE_MODES:
                    im = im.convert("L")
                return np.asarray(im), None
        import nibabel as nib

        img = nib.load(str(path))
        arr = np.asanyarray(img.dataobj)
        zooms = tuple(float(z) for z in img.header.get_zooms()[: arr.ndim])
    except Exception as exc:  # noqa: BLE001 - any reader failure is reported with the file name
        raise ScoreError(f"{path}: cannot read mask file ({type(exc).__name__}: {exc})") from exc
    if arr.ndim > 3:
        arr = arr.reshape(arr.shape[:3]) if all(s == 1 for s in arr.shape[3:]) else arr
    if arr.ndim not in (2, 3):
        raise ScoreError(f"{path}: expected a 2D or 3D mask volume, got shape {arr.shape}")
    if np.issubdtype(arr.dtype, np.floating):
        if not np.all(np.isfinite(arr)) or not np.array_equal(arr, np.round(arr)):
            raise ScoreError(f"{path}: mask volume holds non-integer values")
        arr = arr.astype(np.int64)
    spacing = zooms if zooms and all(z > 0 for z in zooms) else None
    return arr, spacing


def _check_values(arr: np.ndarray, codec: MaskCodec, path: Path) -> None:
    if codec.allowed_values is None:
        return
    bad = np.setdiff1d(np.unique(arr), np.asarray(codec.allowed_values))
    if bad.size:
        shown = ", ".join(str(v) for v in bad[:10]) + (" ..." if bad.size > 10 else "")
        raise ScoreError(
            f"{path}: unexpected mask values {shown}; the {codec.name!r} codec allows {codec.allowed_values}"
        )


def _binary_stack(arr: np.ndarray, codec: MaskCodec, path: Path, volume: bool) -> np.ndarray:
    """Decode a raw mask into per-class binary masks ``(F, *spatial)`` (F = foreground classes)."""
    spec = codec.label_spec
    try:
        if volume:
            label = np.stack([codec.decode(arr[..., k]) for k in range(arr.shape[-1])], axis=-1)
        else:
            label = codec.decode(arr)
    except Exception as exc:  # noqa: BLE001
        raise ScoreError(f"{path}: cannot decode mask with the {codec.name!r} codec ({exc})") from exc
    if spec.multilabel:
        return np.asarray(label) > 0.5
    return np.stack([label == i for i in spec.foreground_indices])


def _jsonable(obj: Any) -> Any:
    """NaN -> null (strict JSON), numpy scalars -> Python numbers."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        return None if math.isnan(float(obj)) else float(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def score_folders(
    pred_dir: str | Path,
    gt_dir: str | Path,
    codec: MaskCodec,
    out_dir: str | Path | None = None,
    spacing: Sequence[float] | None = None,
    policy: MetricPolicy = DEFAULT_POLICY,
    metrics: Sequence[str] = DEFAULT_METRICS,
    use_header_spacing: bool = True,
) -> dict:
    """Score every ground-truth mask under ``gt_dir`` against the same-named prediction.

    Returns ``{"cases": [records], "aggregate": aggregate(records), "policy", "codec", "gt_dir",
    "pred_dir", "unmatched_predictions"}`` where a record is ``{"domain", "case", "file", "spacing",
    "metrics": {class: {metric: value}}}``. With ``out_dir``, writes ``scores.json`` (everything, NaN
    as null) and ``scores.md`` (Markdown table). Raises :class:`ScoreError` naming the file for a
    missing prediction, a shape mismatch, unexpected mask values or an unreadable file.
    """
    pred_dir, gt_dir = Path(pred_dir), Path(gt_dir)
    for folder, what in ((gt_dir, "ground-truth"), (pred_dir, "prediction")):
        if not folder.is_dir():
            raise ScoreError(f"{folder}: {what} folder does not exist")
    gts, preds = _index_masks(gt_dir), _index_masks(pred_dir)
    if not gts:
        raise ScoreError(f"{gt_dir}: no mask files ({', '.join(MASK_SUFFIXES)}) found")
    missing = [k for k in gts if k not in preds]
    if missing:
        raise ScoreError(
            f"{gts[missing[0]]}: no prediction for this ground-truth case (looked for "
            f"{pred_dir / missing[0]}{{{','.join(MASK_SUFFIXES)}}}); {len(missing)} case(s) missing"
        )
    class_names = codec.label_spec.foreground_names
    records = []
    for key, gt_path in gts.items():
        pred_path = preds[key]
        gt_arr, gt_spacing = read_mask(gt_path, codec)
        pred_arr, _ = read_mask(pred_path, codec)
        if pred_arr.shape != gt_arr.shape:
            raise ScoreError(
                f"{pred_path}: prediction shape {pred_arr.shape} differs from ground truth {gt_path} "
                f"shape {gt_arr.shape}"
            )
        _check_values(gt_arr, codec, gt_path)
        _check_values(pred_arr, codec, pred_path)
        volume = gt_arr.ndim == 3 and not codec.rgb
        if codec.rgb and gt_arr.ndim != 3:
            raise ScoreError(f"{gt_path}: the {codec.name!r} codec needs RGB masks, got shape {gt_arr.shape}")
        gt_bin = _binary_stack(gt_arr, codec, gt_path, volume)
        pred_bin = _binary_stack(pred_arr, codec, pred_path, volume)
        case_spacing = (
            tuple(float(s) for s in spacing)
            if spacing is not None
            else (gt_spacing if use_header_spacing else None)
        )
        if case_spacing is not None and len(case_spacing) != gt_bin.ndim - 1:
            raise ScoreError(f"{gt_path}: spacing {case_spacing} does not match a {gt_bin.ndim - 1}D mask")
        parent = Path(key).parent.as_posix()
        records.append(
            {
                "domain": "all" if parent == "." else parent,
                "case": Path(key).name,
                "file": gt_path.relative_to(gt_dir).as_posix(),
                "spacing": list(case_spacing) if case_spacing is not None else None,
                "metrics": case_metrics(pred_bin, gt_bin, class_names, case_spacing, policy, metrics),
            }
        )
    result = {
        "gt_dir": str(gt_dir),
        "pred_dir": str(pred_dir),
        "codec": codec.name,
        "policy": dataclasses.asdict(policy),
        "units": "hd95/asd in pixels (voxels); hd95_mm/asd_mm in the spacing's units where known",
        "cases": records,
        "aggregate": aggregate(records),
        "unmatched_predictions": sorted(str(preds[k]) for k in preds if k not in gts),
    }
    if out_dir is not None:
        write_scores(result, out_dir)
    return result


def write_scores(result: dict, out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``scores.json`` and ``scores.md`` for a :func:`score_folders` result."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / "scores.json", out / "scores.md"
    json_path.write_text(json.dumps(_jsonable(result), indent=1, allow_nan=False) + "\n")
    agg = result["aggregate"]
    policy = ", ".join(f"{k}={v}" for k, v in result["policy"].items())
    lines = [
        "# Scores",
        "",
        f"- ground truth: `{result['gt_dir']}`",
        f"- predictions: `{result['pred_dir']}`",
        f"- codec: `{result['codec']}`; cases: {len(result['cases'])}",
        f"- empty-mask policy: {policy}",
        f"- units: {result['units']}",
    ]
    if result["unmatched_predictions"]:
        lines.append(f"- predictions without ground truth (ignored): {len(result['unmatched_predictions'])}")
    lines += ["", format_table(agg)]
    md_path.write_text("\n".join(lines))
    return json_path, md_path
