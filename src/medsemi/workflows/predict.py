"""``medsemi predict``: segment new images with a saved checkpoint, writing masks in the
dataset's own encoding (PNG, same file names, original image size)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from medsemi.config import config_from_dict
from medsemi.data.codecs import CODECS, MaskCodec, index_codec
from medsemi.data.contract import DatasetInfo, LabelSpec
from medsemi.workflows.safe_load import load_model_checkpoint

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


def load_image(path: Path, channels: int, size: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Read an image as the readers do: RGB or grey, resized to the patch size, ``v/127.5 - 1``."""
    try:
        img = Image.open(path)
        img = img.convert("RGB" if channels == 3 else "L")
    except Exception as err:  # noqa: BLE001 - re-raised with the file name
        raise ValueError(f"{path}: cannot read image ({err})") from err
    original = img.size
    if img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.LANCZOS if channels == 3 else Image.Resampling.BILINEAR)
    arr = np.asarray(img, dtype=np.float32)
    arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    return torch.from_numpy(arr / 127.5 - 1.0), original


def predict_folder(checkpoint: str | Path, input_dir: str | Path, output_dir: str | Path,
                   device: str = "auto", task: int | None = None) -> list[Path]:
    from medsemi.device import resolve_device
    from medsemi.nets.build import build_model

    state = load_model_checkpoint(checkpoint)
    cfg = config_from_dict(state["config"])
    info = info_from_checkpoint(state)
    if len(info.patch_size) == 3:
        from medsemi.workflows.predict3d import predict_volumes

        return predict_volumes(state, cfg, info, input_dir, output_dir, device, task)
    dev = resolve_device(device)
    model = build_model(cfg.model, info).to(dev)
    model.load_state_dict(state["model"])
    model.eval()
    return segment_images(model, dev, info.label_spec, codec_for(info), info.in_channels, info.patch_size[-1],
                          input_dir, output_dir)


def segment_images(net: Callable[[torch.Tensor], torch.Tensor], dev: torch.device, label_spec: LabelSpec,
                   codec: MaskCodec, channels: int, size: int, input_dir: str | Path,
                   output_dir: str | Path) -> list[Path]:
    """Every image of ``input_dir`` -> ``net`` -> logits resized to the image -> mask PNG in ``codec``."""
    files = sorted(p for p in Path(input_dir).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"{input_dir}: no images ({', '.join(IMAGE_SUFFIXES)})")
    out_dir = Path(output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    with torch.no_grad():
        for path in files:
            image, (w, h) = load_image(path, channels, size)
            logits = net(image[None].to(dev)).float()
            logits = torch.nn.functional.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)
            label = label_spec.predict(logits)[0].cpu().numpy()
            target = out_dir / (path.stem + ".png")
            Image.fromarray(codec.encode(label)).save(target)
            written.append(target)
    return written
