"""``preprocessing.json`` of an export: how to turn an image file into the network's input and its
output into a mask, written so that a program without medsemi can follow it.

2D (the readers of ``data/``): RGB or grey, resized to the training patch with the dataset's filter (Lanczos
for RGB, bilinear for grey unless the dataset says otherwise), intensities ``v / 127.5 - 1`` or, for a generic
dataset with ``normalization: minmax``, per image to [-1, 1]; layout (N, C, H, W). 3D (VerSemi, spec
versemi.md 1.4 and 4.2): the volume's axes as nibabel returns them, the task's training recipe (resampling, HU
clip + min-max or z-score), a sliding window of the training crop with the run's strides, softmax
probabilities averaged, argmax (ties -> background), optional largest connected component.

The mask encoding is a lookup table computed by the dataset's own codec (``data/codecs.py``), so the
file reproduces exactly what ``medsemi predict`` writes: for exclusive labels ``lut[class index]``, for
multi-label outputs ``lut[sum_k label_k * 2**k]``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from medsemi.data.codecs import CODECS, MaskCodec, index_codec
from medsemi.data.contract import DatasetInfo, LabelSpec

FORMAT_VERSION = 1
INPUT_NAME = "image"
OUTPUT_NAME = "logits"
SIZE_MULTIPLE_2D = 16  # four 2x2 max-pools in the U-Net


def mask_lut(codec: MaskCodec) -> list:
    """The value the codec writes for every label: class index (exclusive) or bit code (multi-label)."""
    spec = codec.label_spec
    if spec.multilabel:
        k = spec.num_outputs
        codes = np.arange(2**k)
        label = ((codes[None, :] >> np.arange(k)[:, None]) & 1).astype(np.float32)[:, None, :]  # (K, 1, 2^K)
        return codec.encode(label)[0].tolist()
    return codec.encode(np.arange(spec.num_outputs)[None, :])[0].tolist()


def codec_from_spec(encoding: dict[str, Any], label_spec: LabelSpec) -> MaskCodec:
    """The codec a ``preprocessing.json`` names (the inverse of :func:`mask_encoding`)."""
    name = encoding["name"]
    return CODECS[name] if name in CODECS else index_codec(label_spec)


def mask_encoding(codec: MaskCodec) -> dict[str, Any]:
    described = {
        "fundus": "grey PNG: 255 background, 128 optic disc rim, 0 optic cup (the disc contains the cup)",
        "prostate": "grey PNG: 0 prostate, 255 background",
        "busi": "grey PNG: 255 lesion, 0 background",
        "mnms": "RGB PNG: red = class 1, green = class 2, blue = class 3, black background",
        "index": "grey PNG: pixel value = class index (0 background)",
    }
    index = ("sum_k label_k * 2**k over the output channels" if codec.label_spec.multilabel
             else "class index (argmax over the output channels)")
    return {"name": codec.name, "description": described.get(codec.name, codec.name), "rgb": codec.rgb,
            "lut_index": index, "lut": mask_lut(codec)}


def label_section(spec: LabelSpec) -> dict[str, Any]:
    if spec.multilabel:
        return {"kind": "multilabel", "class_names": list(spec.class_names), "activation": "sigmoid",
                "decision": "per channel: logit >= 0 (sigmoid >= 0.5); channels are independent"}
    return {"kind": "exclusive", "class_names": list(spec.class_names), "activation": "softmax",
            "decision": "argmax over channels; channel 0 is background"}


def spec_2d(info: DatasetInfo, codec: MaskCodec) -> dict[str, Any]:
    size = [int(s) for s in info.patch_size[-2:]]
    rgb = info.in_channels == 3
    resample = info.extra.get("image_resample") or ("lanczos" if rgb else "bilinear")
    if info.extra.get("normalization") == "minmax":
        intensity = {"normalization": "minmax", "formula": "(x - x.min()) / (x.max() - x.min()) * 2 - 1, per image",
                     "range": [-1.0, 1.0]}
    else:
        intensity = {"normalization": "uint8", "formula": "x / 127.5 - 1", "scale": 1 / 127.5, "offset": -1.0,
                     "range": [-1.0, 1.0]}
    return {
        "dims": 2,
        "input": {
            "name": INPUT_NAME, "layout": "NCHW", "dtype": "float32", "channels": info.in_channels,
            "colour": "RGB" if rgb else "L", "size": size,
            "resize": {"to": size, "filter": resample,
                       "note": "training resized every image to the patch size; do the same"},
            "dynamic_axes": ["batch", "height", "width"], "size_multiple": SIZE_MULTIPLE_2D,
            "intensity": intensity,
        },
        "output": {
            "name": OUTPUT_NAME, "layout": "NCHW", "channels": info.label_spec.num_outputs,
            "to_original_size": "bilinear interpolation of the logits (align_corners=False), then the decision",
        },
        "labels": label_section(info.label_spec),
        "mask_encoding": mask_encoding(codec),
    }


def _intensity_3d(recipe: dict[str, Any] | None) -> dict[str, Any]:
    if not recipe or not recipe.get("intensity"):
        return {"kind": "none", "formula": "x (the volume as stored)"}
    if recipe["intensity"] == "clip_minmax":
        lo, hi = recipe["hu_window"]
        return {"kind": "clip_minmax", "hu_window": [lo, hi],
                "formula": f"x = clip(x, {lo}, {hi}); x = (x - x.min()) / (x.max() - x.min())"}
    return {"kind": "zscore", "formula": "x = (x - x.mean()) / x.std()"}


def spec_3d(info: DatasetInfo, task: int, task_name: str, options: dict[str, Any]) -> dict[str, Any]:
    from medsemi.evaluation.sliding3d import overlap_for_stride

    window = [int(s) for s in info.patch_size]
    strides = [int(s) for s in options["strides"]]
    recipe = info.extra.get("preprocessing", {}).get(str(task))
    return {
        "dims": 3,
        "task": {"id": task, "name": task_name, "note": "the task prompt is part of this model"},
        "input": {
            "name": INPUT_NAME, "layout": "NCXYZ (axes as nibabel returns them)", "dtype": "float32",
            "channels": info.in_channels, "window": window, "dynamic_axes": ["batch"],
            "resample": {"target_spacing": (recipe or {}).get("target_spacing"),
                         "pancreas_z_quirk": bool((recipe or {}).get("pancreas_z_quirk", False)),
                         "order": 1, "note": "scipy.ndimage.zoom by spacing / target_spacing; none when null"},
            "intensity": _intensity_3d(recipe),
            "recipe": recipe,
        },
        "sliding_window": {
            "window": window, "strides": strides,
            "overlap": [round(1 - s / w, 6) for s, w in zip(strides, window)],
            "monai_overlap": [overlap_for_stride(w, s) for w, s in zip(window, strides)],
            "padding": "zero-pad each axis shorter than the window to the window, crop back afterwards",
            "starts": "min(stride * k, size - window) for k < ceil((size - window) / stride) + 1",
            "blending": "average of the softmax probabilities over the windows covering a voxel",
            "sw_batch_size": int(options["sw_batch_size"]),
            "largest_connected_component": bool(options["lcc"]),
        },
        "output": {"name": OUTPUT_NAME, "layout": "NCXYZ", "channels": 2,
                   "to_original_grid": "nearest-neighbour resampling of the mask back to the input shape"},
        "labels": label_section(info.label_spec),
        "mask_encoding": {"name": "nifti_binary", "description": "uint8 NIfTI, 1 = foreground, 0 = background, "
                          "with the input file's affine and header", "lut_index": "class index", "lut": [0, 1]},
    }
