"""Mask encodings on disk <-> labels in the tensor convention of ``contract.py``.

Each published dataset stores its masks differently (spec ust-run.md 2.1-2.4). A codec
decodes an 8-bit mask array into a label and encodes a predicted label back, so that
``medsemi predict`` writes masks in the dataset's own encoding and ``medsemi score``
reads them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from medsemi.data.contract import LabelSpec


@dataclass(frozen=True)
class MaskCodec:
    """Decode (H, W[, 3]) uint8 -> label array; encode label array -> uint8 mask."""

    name: str
    label_spec: LabelSpec
    decode: Callable[[np.ndarray], np.ndarray]
    encode: Callable[[np.ndarray], np.ndarray]
    allowed_values: tuple[int, ...] | None  # raw grey values a valid mask may hold (None: any)
    rgb: bool = False


def _grey(mask: np.ndarray) -> np.ndarray:
    return mask if mask.ndim == 2 else mask[..., 0]


def _fundus_decode(mask: np.ndarray) -> np.ndarray:
    """0 = cup, 128 = disc rim, 255 = background; disc channel includes the cup (spec 2.1)."""
    grey = _grey(mask)
    return np.stack([grey == 0, grey <= 128]).astype(np.float32)


def _fundus_encode(label: np.ndarray) -> np.ndarray:
    out = np.full(label.shape[1:], 255, np.uint8)
    out[label[1] > 0] = 128
    out[label[0] > 0] = 0
    return out


def _zero_is_foreground_decode(mask: np.ndarray) -> np.ndarray:
    """Prostate: 0 = prostate, 255 = background (spec 2.2)."""
    return (_grey(mask) == 0).astype(np.int64)


def _zero_is_foreground_encode(label: np.ndarray) -> np.ndarray:
    return np.where(label > 0, 0, 255).astype(np.uint8)


def _white_is_foreground_decode(mask: np.ndarray) -> np.ndarray:
    """BUSI: 255 = lesion, anything else background (spec 2.4)."""
    return (_grey(mask) == 255).astype(np.int64)


def _white_is_foreground_encode(label: np.ndarray) -> np.ndarray:
    return np.where(label > 0, 255, 0).astype(np.uint8)


def _mnms_decode(mask: np.ndarray) -> np.ndarray:
    """RGB: class 1 where R==255, then 2 where G==255, then 3 where B==255 (later wins; spec 2.3)."""
    if mask.ndim != 3 or mask.shape[-1] < 3:
        raise ValueError(f"M&Ms masks are RGB, got an array of shape {mask.shape}")
    out = np.zeros(mask.shape[:2], np.int64)
    for cls in (1, 2, 3):
        out[mask[..., cls - 1] == 255] = cls
    return out


def _mnms_encode(label: np.ndarray) -> np.ndarray:
    out = np.zeros((*label.shape, 3), np.uint8)
    for cls in (1, 2, 3):
        out[..., cls - 1][label == cls] = 255
    return out


def _index_decode(mask: np.ndarray) -> np.ndarray:
    return _grey(mask).astype(np.int64)


def _index_encode(label: np.ndarray) -> np.ndarray:
    return label.astype(np.uint8)


FUNDUS = MaskCodec(
    "fundus", LabelSpec("multilabel", ("cup", "disc")), _fundus_decode, _fundus_encode, (0, 128, 255)
)
PROSTATE = MaskCodec(
    "prostate",
    LabelSpec("exclusive", ("background", "prostate")),
    _zero_is_foreground_decode,
    _zero_is_foreground_encode,
    (0, 255),
)
BUSI = MaskCodec(
    "busi",
    LabelSpec("exclusive", ("background", "lesion")),
    _white_is_foreground_decode,
    _white_is_foreground_encode,
    (0, 255),
)
MNMS = MaskCodec(
    "mnms", LabelSpec("exclusive", ("background", "lv", "myo", "rv")), _mnms_decode, _mnms_encode, None, True
)


def index_codec(label_spec: LabelSpec) -> MaskCodec:
    """Class index per pixel (0 = background), the nnU-Net convention for exclusive labels."""
    if label_spec.multilabel:
        raise ValueError("index masks need an exclusive label spec")
    return MaskCodec(
        "index", label_spec, _index_decode, _index_encode, tuple(range(label_spec.num_outputs))
    )


CODECS: dict[str, MaskCodec] = {c.name: c for c in (FUNDUS, PROSTATE, BUSI, MNMS)}
