"""``medsemi predict``: segment new images with a saved checkpoint, writing masks in the
dataset's own encoding (PNG, same file names, original image size).

Images are read at their real depth and normalised as the training data's reader did (issue 11, item 2):
8-bit images ``v / 127.5 - 1``; a generic-format model (``normalization`` in its checkpoint) with its
own rule (``uint8``: the same formula on the real values, ``minmax``: per image to [-1, 1]); a 16-bit or
float grey image for a model of the named formats, whose readers take 8-bit images only, is used when its
values lie in 0..255 and refused otherwise (clipping it would change what the network sees). 16-bit RGB
PNGs are reduced to 8 bits by Pillow in both the readers and here. Nothing is written over an input or an
existing file without ``overwrite`` (:mod:`medsemi.workflows.output_plan`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from medsemi.checkpoints import load_model_checkpoint
from medsemi.config import config_from_dict
from medsemi.data.codecs import CODECS, MaskCodec, index_codec
from medsemi.data.contract import DatasetInfo, LabelSpec
from medsemi.workflows.output_plan import plan_outputs

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def info_from_checkpoint(state: dict) -> DatasetInfo:
    raw = state["info"]
    spec = LabelSpec(raw["label_kind"], tuple(raw["class_names"]))
    return DatasetInfo(raw["name"], raw["in_channels"], spec, tuple(raw["domains"]), tuple(raw["patch_size"]),
                       extra=raw.get("extra", {}))


def codec_for(info: DatasetInfo) -> MaskCodec:
    """The mask encoding of the training data (synthetic data uses the Fundus / ProstateSlice encodings)."""
    name = info.extra.get("codec") or info.name
    if name in CODECS:
        return CODECS[name]
    if info.label_spec.multilabel:
        return CODECS["fundus"]
    if info.label_spec.num_outputs == 2 and name == "synthetic":
        return CODECS["prostate"]
    return index_codec(info.label_spec)


DEEP_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")  # 16-bit, 32-bit integer and float grey images
RESAMPLE = {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
            "bicubic": Image.Resampling.BICUBIC, "lanczos": Image.Resampling.LANCZOS}


def _deep_grey(img: Image.Image, path: Path, channels: int, normalization: str | None) -> np.ndarray:
    """A 16-bit / float grey image at its real values, checked against what the model was trained on."""
    arr = np.asarray(img, dtype=np.float32)
    depth = "float" if img.mode == "F" else ("32-bit" if img.mode == "I" else "16-bit")
    if channels != 1:
        raise ValueError(f"{path}: a single-channel {depth} image, but the model takes {channels}-channel images")
    if not np.isfinite(arr).all():
        raise ValueError(f"{path}: the {depth} image holds NaN or infinite values")
    if normalization is None and (arr.min() < 0 or arr.max() > 255):
        raise ValueError(
            f"{path}: a {depth} image with values {arr.min():g}..{arr.max():g}, but the model was trained on "
            "8-bit images (0..255, v / 127.5 - 1) and clipping would change what it sees; convert the image to "
            "8-bit the way the training images were made"
        )
    return arr


def load_image(path: Path, channels: int, size: int, normalization: str | None = None,
               resample: str | None = None) -> tuple[torch.Tensor, tuple[int, int]]:
    """Read an image as the training reader did (see the module docstring), resized to the patch size.
    ``normalization``: the generic format's rule (``uint8`` / ``minmax``), None for the 8-bit formats."""
    try:
        img = Image.open(path)
        img.load()
    except Exception as err:  # noqa: BLE001 - re-raised with the file name
        raise ValueError(f"{path}: cannot read image ({err})") from err
    original = img.size
    method = RESAMPLE[resample or ("lanczos" if channels == 3 else "bilinear")]
    if img.mode in DEEP_MODES:
        arr = _deep_grey(img, path, channels, normalization)
        if img.size != (size, size):
            arr = np.asarray(Image.fromarray(arr, "F").resize((size, size), method), dtype=np.float32)
        arr = arr[None]
    else:
        img = img.convert("RGB" if channels == 3 else "L")
        if img.size != (size, size):
            img = img.resize((size, size), method)
        arr = np.asarray(img, dtype=np.float32)
        arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    if normalization == "minmax":
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) / np.float32(hi - lo) * 2 - 1 if hi > lo else np.zeros_like(arr)
        return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32)), original
    return torch.from_numpy(np.ascontiguousarray(arr / 127.5 - 1.0, dtype=np.float32)), original


def predict_folder(checkpoint: str | Path, input_dir: str | Path, output_dir: str | Path,
                   device: str = "auto", task: int | None = None, overwrite: bool = False) -> list[Path]:
    """Segment every image of ``input_dir`` into ``output_dir``; ``overwrite`` allows replacing existing
    masks (never an input image)."""
    from medsemi.device import resolve_device
    from medsemi.nets.build import build_model

    state = load_model_checkpoint(checkpoint)
    cfg = config_from_dict(state["config"])
    info = info_from_checkpoint(state)
    if len(info.patch_size) == 3:
        from medsemi.workflows.predict3d import predict_volumes

        return predict_volumes(state, cfg, info, input_dir, output_dir, device, task, overwrite=overwrite)
    dev = resolve_device(device)
    model = build_model(cfg.model, info).to(dev)
    model.load_state_dict(state["model"])
    model.eval()
    return segment_images(model, dev, info.label_spec, codec_for(info), info.in_channels, info.patch_size[-1],
                          input_dir, output_dir, normalization=info.extra.get("normalization"),
                          resample=info.extra.get("image_resample"), overwrite=overwrite)


def list_images(input_dir: str | Path) -> list[Path]:
    """The image files of ``input_dir`` (not hidden ones), sorted; an error for a missing or empty folder."""
    if not Path(input_dir).is_dir():
        raise FileNotFoundError(f"{input_dir}: input folder not found")
    files = sorted(p for p in Path(input_dir).iterdir()
                   if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))
    if not files:
        raise FileNotFoundError(f"{input_dir}: no images ({', '.join(IMAGE_SUFFIXES)})")
    return files


def segment_images(net: Callable[[torch.Tensor], torch.Tensor], dev: torch.device, label_spec: LabelSpec,
                   codec: MaskCodec, channels: int, size: int, input_dir: str | Path, output_dir: str | Path,
                   normalization: str | None = None, resample: str | None = None, overwrite: bool = False,
                   ) -> list[Path]:
    """Every image of ``input_dir`` -> ``net`` -> logits resized to the image -> mask PNG in ``codec``
    (``normalization``, ``resample``: see :func:`load_image`; ``overwrite``: see :func:`predict_folder`)."""
    files = list_images(input_dir)
    targets = plan_outputs(files, input_dir, output_dir, lambda p: p.stem, ".png", overwrite)
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    written = []
    with torch.no_grad():
        for path, target in zip(files, targets):
            image, (w, h) = load_image(path, channels, size, normalization, resample)
            logits = net(image[None].to(dev)).float()
            logits = torch.nn.functional.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)
            label = label_spec.predict(logits)[0].cpu().numpy()
            Image.fromarray(codec.encode(label)).save(target)
            written.append(target)
    return written
