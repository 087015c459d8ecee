"""Smoothed per-image Dice and the UST-RUN student/teacher hardness, batched on the device.

Spec: ``shared/spec/ust-run.md`` section 3.4 item 1 (smoothed Dice), 4.3 step 8 (hardness) and
section 6 item 3 (empty-empty rule and the "ignore absent classes" alternative).
"""

from __future__ import annotations

from typing import Literal

import torch

from medsemi.data.contract import LabelSpec

EmptyRule = Literal["ust", "midss"]


def smoothed_dice(pred_bin: torch.Tensor, gt_bin: torch.Tensor, empty_rule: EmptyRule = "ust"
                  ) -> torch.Tensor:
    """Per image and class ``(2|P∩G| + 1) / (|P| + |G| + 1.001)`` -> float64 ``(B, F)``.

    ``pred_bin``, ``gt_bin``: ``(B, F, *spatial)`` binary (bool or 0/1). ``empty_rule="ust"``: a class empty
    in both gives 0 (UST ``utils/metrics.py``); ``"midss"``: the formula as is (1/1.001). Pixel counts are
    exact integers; the ratio is taken in float64 like the original NumPy code.
    """
    if pred_bin.shape != gt_bin.shape or pred_bin.dim() < 3:
        raise ValueError(f"medsemi.ops.hardness: prediction {tuple(pred_bin.shape)} and ground truth "
                         f"{tuple(gt_bin.shape)} must both be (B, F, *spatial)")
    if empty_rule not in ("ust", "midss"):
        raise ValueError(f"medsemi.ops.hardness: empty_rule must be 'ust' or 'midss', got {empty_rule!r}")
    p = pred_bin.bool().flatten(2)
    g = gt_bin.bool().flatten(2)
    inter = (p & g).sum(dim=2).to(torch.float64)
    total = (p.sum(dim=2) + g.sum(dim=2)).to(torch.float64)
    dice = (2.0 * inter + 1.0) / (total + 1.001)
    if empty_rule == "ust":
        dice = torch.where(total == 0, torch.zeros_like(dice), dice)
    return dice


def hardness(student_label: torch.Tensor, teacher_label: torch.Tensor, label_spec: LabelSpec,
             empty_rule: EmptyRule = "ust", ignore_absent_in_both: bool = False) -> torch.Tensor:
    """UST-RUN hardness (spec 4.3 step 8): ``1 - mean over foreground classes of smoothed_dice``.

    Labels follow the contract (exclusive int64 ``(B, *spatial)``, multi-label ``(B, K, *spatial)``).
    ``ignore_absent_in_both=True`` (spec 6 item 3's alternative, not the original) drops from the mean
    the classes that are empty in both labels; a sample where every class is empty in both then gets
    hardness 0 (the two networks agree completely). Returns float64 ``(B,)``.
    """
    s = label_spec.to_binary(student_label)
    t = label_spec.to_binary(teacher_label)
    dice = smoothed_dice(s, t, empty_rule)
    if not ignore_absent_in_both:
        return 1.0 - dice.mean(dim=1)
    present = (s.flatten(2).any(dim=2) | t.flatten(2).any(dim=2)).to(torch.float64)
    n = present.sum(dim=1)
    mean = (dice * present).sum(dim=1) / n.clamp(min=1.0)
    return torch.where(n > 0, 1.0 - mean, torch.zeros_like(mean))


__all__ = ["smoothed_dice", "hardness", "EmptyRule"]
