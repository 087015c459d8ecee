"""Segmentation losses with per-pixel weights: CE/BCE term + Dice term (spec ust-run.md 3.3, 6 items 4-6).

Shapes follow ``data/contract.py`` (2D shown; 3D adds a depth axis, everything here is generic over the
number of spatial dims):

- exclusive: ``logits (B, C, *S)``, ``target (B, *S)`` int64 class indices, ``weight (B, *S)``
  (``(B, 1, *S)`` is also accepted);
- multilabel: ``logits (B, K, *S)``, ``target (B, K, *S)`` in {0, 1}, ``weight (B, K, *S)``
  (``(B, 1, *S)`` or ``(B, *S)`` is broadcast over the K channels).

``weight=None`` means all ones (the supervised term). All arithmetic is done in float32 with autocast
disabled (float64 logits stay float64, so reference tests can compare in double precision); nothing here
synchronises with the host (shape checks only).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from medsemi.data.contract import LabelSpec

DICE_EPS = 1e-10
"""Smoothing term of the Dice loss (spec 3.3: UST ``smooth = 1e-10``)."""

Normalize = Literal["all", "weight"]

_WHERE = "losses.py"


def _check_spec(label_spec: LabelSpec | None) -> LabelSpec:
    if not isinstance(label_spec, LabelSpec):
        raise TypeError(f"{_WHERE}: label_spec must be a medsemi.data.contract.LabelSpec, got {label_spec!r}")
    return label_spec


def _work_dtype(logits: torch.Tensor) -> torch.dtype:
    """float32, or float64 when the logits are float64 (half precisions are promoted)."""
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def _prepare(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None,
             label_spec: LabelSpec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Validate shapes and return float32 ``(logits, target, weight)``.

    Exclusive: target stays int64 ``(B, *S)``, weight ``(B, *S)``.
    Multilabel: target float32 ``(B, K, *S)``, weight float32 ``(B, K, *S)`` (expanded, not copied).
    """
    if logits.dim() < 3:
        raise ValueError(f"{_WHERE}: logits must be (B, C, *spatial), got shape {tuple(logits.shape)}")
    if logits.shape[1] != label_spec.num_outputs:
        raise ValueError(f"{_WHERE}: logits have {logits.shape[1]} channels but the label spec "
                         f"{label_spec.class_names} needs {label_spec.num_outputs}")
    b, spatial = logits.shape[0], tuple(logits.shape[2:])
    dt = _work_dtype(logits)
    z = logits.to(dt)
    if label_spec.multilabel:
        if tuple(target.shape) != tuple(logits.shape):
            raise ValueError(f"{_WHERE}: multilabel target must have the logits' shape {tuple(logits.shape)}, "
                             f"got {tuple(target.shape)}")
        y = target.to(dt)
        if weight is None:
            w = torch.ones_like(z)
        else:
            w = weight.to(dt)
            if tuple(w.shape) == (b, *spatial):
                w = w.unsqueeze(1)
            if w.dim() != z.dim() or w.shape[0] != b or tuple(w.shape[2:]) != spatial \
                    or w.shape[1] not in (1, z.shape[1]):
                raise ValueError(f"{_WHERE}: multilabel weight must be (B, K, *spatial) = {tuple(z.shape)} "
                                 f"(or (B, 1, *spatial)), got {tuple(weight.shape)}")
            w = w.expand_as(z)
        return z, y, w
    if target.dtype.is_floating_point or target.dtype == torch.bool or target.is_complex():
        raise TypeError(f"{_WHERE}: exclusive target must hold integer class indices, got {target.dtype}")
    if tuple(target.shape) == (b, 1, *spatial):
        target = target.squeeze(1)
    if tuple(target.shape) != (b, *spatial):
        raise ValueError(f"{_WHERE}: exclusive target must be (B, *spatial) = {(b, *spatial)}, "
                         f"got {tuple(target.shape)}")
    y = target.long()
    if weight is None:
        w = torch.ones((b, *spatial), dtype=dt, device=logits.device)
    else:
        w = weight.to(dt)
        if tuple(w.shape) == (b, 1, *spatial):
            w = w.squeeze(1)
        if tuple(w.shape) != (b, *spatial):
            raise ValueError(f"{_WHERE}: exclusive weight must be (B, *spatial) = {(b, *spatial)}, "
                             f"got {tuple(weight.shape)}")
    return z, y, w


def one_hot(target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Float32 one-hot ``(B, C, *S)`` of an int target ``(B, *S)``; out-of-range values give all zeros.

    Built by comparison rather than ``F.one_hot`` (which checks the range on the host).
    """
    classes = torch.arange(num_classes, device=target.device).view((1, -1) + (1,) * (target.dim() - 1))
    return (target.unsqueeze(1) == classes).float()


def weighted_ce(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None,
                label_spec: LabelSpec | None = None, normalize: Normalize = "all") -> torch.Tensor:
    """Per-pixel weighted CE (exclusive) or BCE-with-logits (multilabel), scalar float32 (spec 3.3).

    ``normalize="all"`` (parity, spec 6 item 6): divide the weighted sum by the number of elements,
    B*prod(S) for exclusive and B*K*prod(S) for multilabel, not by the sum of weights.
    ``normalize="weight"``: divide by the sum of the weights instead (0 if all weights are 0).
    """
    spec = _check_spec(label_spec)
    if normalize not in ("all", "weight"):
        raise ValueError(f"{_WHERE}: normalize must be 'all' or 'weight', got {normalize!r}")
    with torch.autocast(device_type=logits.device.type, enabled=False):
        z, y, w = _prepare(logits, target, weight, spec)
        if spec.multilabel:
            per = F.binary_cross_entropy_with_logits(z, y, reduction="none")
        else:
            per = F.cross_entropy(z, y, reduction="none")
        num = (per * w).sum()
        if normalize == "all":
            return num / per.numel()
        return num / w.sum().clamp_min(torch.finfo(torch.float32).tiny)


def weighted_dice(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None,
                  label_spec: LabelSpec | None = None, mask_background: bool = False,
                  skip_background: bool = False) -> torch.Tensor:
    """Weighted Dice loss, scalar float32 (spec 3.3, UST ``DiceLossWithMask``; spec 6 items 4-5).

    Exclusive: ``p = softmax(z)``, ``y`` = one-hot over all C classes (background included); per class
    ``D_c = 1 - (2 sum p_c y_c m_c + eps) / (sum p_c^2 m_c + sum y_c^2 m_c + eps)``, eps = 1e-10, sums over
    the whole batch and all pixels (a batch Dice); the loss is the mean of ``D_c`` over the C classes.
    Parity quirk (default): ``m_0`` is all ones, i.e. the weight is ignored for the background class;
    ``mask_background=True`` applies the weight to class 0 too. The weight is used as given (the original
    tests ``m * c == c``, which equals ``m`` for a 0/1 mask).

    Multilabel: ``p = sigmoid(z)``; one single Dice over the whole ``(B, K, *S)`` tensor (all channels
    pooled) with the per-channel weight. ``mask_background`` has no effect (there is no background channel).

    ``skip_background`` (exclusive only): the mean of ``D_c`` over the foreground classes 1..C-1, as the 3D
    lineage's ``dice_loss(softmax[:, 1], label == 1)`` (UA-MT) for two classes.
    """
    spec = _check_spec(label_spec)
    with torch.autocast(device_type=logits.device.type, enabled=False):
        z, y, w = _prepare(logits, target, weight, spec)
        if spec.multilabel:
            p = torch.sigmoid(z)
            inter = (p * y * w).sum()
            den = (p * p * w).sum() + (y * y * w).sum()
            return 1.0 - (2.0 * inter + DICE_EPS) / (den + DICE_EPS)
        c = z.shape[1]
        p = torch.softmax(z, dim=1)
        yh = one_hot(y, c)
        wc = w.unsqueeze(1)
        if mask_background:
            wc = wc.expand_as(p)
        else:
            wc = torch.cat([torch.ones_like(wc), wc.expand(-1, c - 1, *wc.shape[2:])], dim=1)
        dims = (0,) + tuple(range(2, p.dim()))
        inter = (p * yh * wc).sum(dim=dims)
        den = (p * p * wc).sum(dim=dims) + (yh * yh * wc).sum(dim=dims)
        per_class = 1.0 - (2.0 * inter + DICE_EPS) / (den + DICE_EPS)
        return per_class[1:].mean() if skip_background and c > 1 else per_class.mean()


def seg_loss(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None,
             label_spec: LabelSpec | None = None, *, normalize: Normalize = "all",
             mask_background: bool = False, skip_background: bool = False
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Segmentation loss ``(total, ce, dice)`` with ``total = ce + dice`` (spec 3.3).

    ``normalize`` goes to :func:`weighted_ce`, ``mask_background`` and ``skip_background`` to
    :func:`weighted_dice`.
    """
    ce = weighted_ce(logits, target, weight, label_spec, normalize=normalize)
    dice = weighted_dice(logits, target, weight, label_spec, mask_background=mask_background,
                         skip_background=skip_background)
    return ce + dice, ce, dice
