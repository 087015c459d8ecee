"""Sliding-window evaluation of one 3D volume (spec versemi.md 4.2, 4.4), built on MONAI.

Original (``test_util.py``): zero-pad axes smaller than the window to exactly the window (floor/ceil
split), crop back afterwards; window 96^3; stride 16 on axes 0 and 1, 4 on axis 2; window starts
``min(stride * k, size - window)`` for ``k < ceil((size - window) / stride) + 1``; softmax
**probabilities** summed and divided by the count; label = argmax (ties -> background).

MONAI's ``sliding_window_inference`` pads and scans the same way but derives the step as
``int(window * (1 - overlap))``; passing the nominal overlap ``1 - stride / window`` gives 15 and 3 in
floating point. :func:`overlap_for_stride` returns an overlap that yields exactly ``stride``
(``window * (1 - overlap) = stride + 0.5``). ``blending='gaussian'`` is an option (MONAI's Gaussian
importance map); the default ``'constant'`` reproduces the original's plain average.

Largest connected component (spec 4.4): off by default; 26-connectivity (as ``skimage.measure.label``
used by BCP's helper).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from medsemi.data.volumes.nifti import write_nifti_like

Predictor = Callable[[torch.Tensor], torch.Tensor]


def window_starts(size: int, window: int = 96, stride: int = 16) -> list[int]:
    """Window starts on one axis after padding to at least ``window`` (spec 4.2)."""
    size = max(size, window)
    count = math.ceil((size - window) / stride) + 1
    return [min(stride * k, size - window) for k in range(count)]


def overlap_for_stride(window: int, stride: int) -> float:
    """A MONAI overlap giving scan interval ``int(window * (1 - overlap)) == stride`` exactly."""
    if not 1 <= stride <= window:
        raise ValueError(f"stride must be in [1, window={window}], got {stride}")
    if stride == window:
        return 0.0
    return (window - stride - 0.5) / window


def sliding_window_probs(
    image: torch.Tensor,
    predictor: Predictor,
    *,
    window: int | Sequence[int] = 96,
    strides: Sequence[int] = (16, 16, 4),
    blending: Literal["constant", "gaussian"] = "constant",
    outputs: Literal["logits", "probs"] = "logits",
    sw_batch_size: int = 4,
    sw_device: str | torch.device | None = None,
    device: str | torch.device | None = None,
) -> torch.Tensor:
    """Blended per-class probabilities ``(B, C, X, Y, Z)`` for ``image`` ``(B, 1, X, Y, Z)`` or ``(X, Y, Z)``.

    ``predictor`` maps windows ``(n, 1, *window)`` to ``(n, C, *window)`` logits (softmax applied here,
    or sigmoid when C == 1) or probabilities (``outputs='probs'``). Bind a task id with a closure.
    """
    from monai.inferers import sliding_window_inference

    if image.dim() == 3:
        image = image[None, None]
    if image.dim() != 5:
        raise ValueError(f"image must be (X, Y, Z) or (B, C, X, Y, Z), got shape {tuple(image.shape)}")
    win = (window,) * 3 if isinstance(window, int) else tuple(int(w) for w in window)
    overlap = [overlap_for_stride(w, s) for w, s in zip(win, strides)]

    def _probs(x: torch.Tensor) -> torch.Tensor:
        out = predictor(x)
        if outputs == "probs":
            return out
        return torch.sigmoid(out) if out.shape[1] == 1 else torch.softmax(out, dim=1)

    return sliding_window_inference(
        image, win, sw_batch_size, _probs, overlap=overlap, mode=blending, padding_mode="constant", cval=0.0,
        sw_device=sw_device, device=device,
    )


def probs_to_mask(probs: torch.Tensor) -> torch.Tensor:
    """Binary foreground ``(B, X, Y, Z)`` bool: argmax over 2 classes (ties -> background), or > 0.5."""
    if probs.shape[1] == 1:
        return probs[:, 0] > 0.5
    return probs.argmax(dim=1) == 1


def largest_connected_component(mask: np.ndarray | torch.Tensor, connectivity: int = 3) -> np.ndarray:
    """Keep the largest connected component of a 3D binary mask (``connectivity`` 1/2/3 = 6/18/26)."""
    from scipy import ndimage

    arr = mask.detach().cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
    arr = arr.astype(bool)
    structure = ndimage.generate_binary_structure(arr.ndim, connectivity)
    lab, n = ndimage.label(arr, structure=structure)
    if n <= 1:
        return arr
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    return lab == int(sizes.argmax())


def sliding_window_predict(
    image: torch.Tensor | np.ndarray,
    predictor: Predictor,
    *,
    window: int | Sequence[int] = 96,
    strides: Sequence[int] = (16, 16, 4),
    blending: Literal["constant", "gaussian"] = "constant",
    outputs: Literal["logits", "probs"] = "logits",
    lcc: bool = False,
    sw_batch_size: int = 4,
    device: str | torch.device | None = None,
) -> np.ndarray:
    """Binary prediction (uint8 ``(X, Y, Z)``) of one volume ``(X, Y, Z)`` (spec 4.2; LCC of 4.4 optional).

    ``device``: where windows are evaluated (the volume is moved there); the result is on the CPU.
    """
    x = torch.as_tensor(np.asarray(image) if isinstance(image, np.ndarray) else image, dtype=torch.float32)
    if x.dim() != 3:
        raise ValueError(f"expected one volume (X, Y, Z), got shape {tuple(x.shape)}")
    if device is not None:
        x = x.to(device)
    with torch.no_grad():
        probs = sliding_window_probs(x, predictor, window=window, strides=strides, blending=blending,
                                     outputs=outputs, sw_batch_size=sw_batch_size)
    mask = probs_to_mask(probs)[0].cpu().numpy()
    if lcc:
        mask = largest_connected_component(mask)
    return mask.astype(np.uint8)


def save_prediction_nifti(mask: np.ndarray, reference: str | Path | Any, out_path: str | Path) -> Path:
    """Write a prediction as NIfTI with the affine and header of the input image ``reference``."""
    return write_nifti_like(np.asarray(mask), reference, out_path, dtype=np.uint8)
