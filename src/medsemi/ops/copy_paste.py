"""Copy-paste with a box mask: ``a ⊕_M b = a*(1-M) + b*M`` (spec ``shared/spec/ust-run.md``, notation
and section 4.1 "Unified Copy-Paste").

``M`` is a per-sample spatial mask ``(B, *spatial)`` (1 inside the box). It is broadcast over the channel
axis of images ``(B, C, *spatial)``, multi-label labels / weights ``(B, K, *spatial)``, and applied
directly to exclusive labels ``(B, *spatial)`` (int64, via ``torch.where``) and weights ``(B, *spatial)``.
"""

from __future__ import annotations

import torch


def paste(outside: torch.Tensor, inside: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``inside`` where ``mask`` is set, ``outside`` elsewhere.

    Floating tensors: ``outside*(1-M) + inside*M`` (exact for a binary ``M``; a soft ``M`` blends).
    Integer / bool tensors: ``torch.where(M != 0, inside, outside)``.
    """
    if outside.shape != inside.shape:
        raise ValueError(f"medsemi.ops.copy_paste: outside {tuple(outside.shape)} and inside "
                         f"{tuple(inside.shape)} must have the same shape")
    if mask.dim() == outside.dim() - 1:
        if mask.shape[0] != outside.shape[0] or mask.shape[1:] != outside.shape[2:]:
            raise ValueError(f"medsemi.ops.copy_paste: mask {tuple(mask.shape)} does not match "
                             f"tensor {tuple(outside.shape)} (expected (B, *spatial))")
        mask = mask.unsqueeze(1)
    elif mask.dim() == outside.dim():
        if mask.shape != outside.shape and not (mask.shape[0] == outside.shape[0] and mask.shape[1] == 1
                                                and mask.shape[2:] == outside.shape[2:]):
            raise ValueError(f"medsemi.ops.copy_paste: mask {tuple(mask.shape)} does not match "
                             f"tensor {tuple(outside.shape)}")
    else:
        raise ValueError(f"medsemi.ops.copy_paste: mask {tuple(mask.shape)} does not match "
                         f"tensor {tuple(outside.shape)}")
    if outside.is_floating_point() and inside.is_floating_point():
        m = mask.to(outside.dtype)
        return outside * (1 - m) + inside * m
    return torch.where(mask != 0, inside, outside)


__all__ = ["paste"]
