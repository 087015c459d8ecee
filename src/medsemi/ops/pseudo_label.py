"""Teacher pseudo-labels with confidence masks, and the SymGD fusion.

Spec: ``shared/spec/ust-run.md`` section 3.2 (pseudo-labels) and section 4.1 ("Symmetric Guidance").
Works for 2D ``(B, C, H, W)`` and 3D ``(B, C, D, H, W)`` alike.
"""

from __future__ import annotations

import torch

from medsemi.data.contract import LabelSpec


def pseudo_label(logits: torch.Tensor, label_spec: LabelSpec, threshold: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Hard label and confidence mask from teacher logits (spec 3.2).

    Exclusive: ``p = softmax``; label = argmax, int64 ``(B, *spatial)``; mask = ``max p > τ`` (strict),
    float32 ``(B, *spatial)``.
    Multi-label: ``p = sigmoid``; label = ``p >= 0.5``; mask = ``p >= τ or p <= 1 - τ``, both float32
    ``(B, K, *spatial)``.
    """
    if logits.dim() < 3 or logits.shape[1] != label_spec.num_outputs:
        raise ValueError(f"medsemi.ops.pseudo_label: logits {tuple(logits.shape)} do not match the label "
                         f"spec ({label_spec.num_outputs} output channels expected on axis 1)")
    logits = logits.detach()
    logits = logits if logits.dtype == torch.float64 else logits.float()  # float64 kept (reference tests)
    if label_spec.multilabel:
        p = torch.sigmoid(logits)
        label = (p >= 0.5).to(torch.float32)
        mask = ((p >= threshold) | (p <= 1.0 - threshold)).to(torch.float32)
        return label, mask
    conf, label = torch.softmax(logits, dim=1).max(dim=1)
    return label, (conf > threshold).to(torch.float32)


def symgd_fuse(y0: torch.Tensor, k0: torch.Tensor, y_ul: torch.Tensor, k_ul: torch.Tensor,
               y_lu: torch.Tensor, k_lu: torch.Tensor, box: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """SymGD fusion (spec 4.1): ``Y_f = Y_ul`` outside the box, ``Y_lu`` inside; ``K_f`` likewise;
    ``K_s = K_f AND K0 AND (Y_f == Y0)`` (per channel for multi-label).

    ``box``: ``(B, *spatial)``, non-zero inside. Labels / masks: exclusive ``(B, *spatial)`` or
    multi-label ``(B, K, *spatial)`` (the box is broadcast over ``K``). Returns ``(Y_f, K_s)``; ``K_s`` has
    the dtype of ``k0``.
    """
    shapes = {t.shape for t in (y0, k0, y_ul, k_ul, y_lu, k_lu)}
    if len(shapes) != 1:
        raise ValueError("medsemi.ops.pseudo_label: symgd_fuse needs labels and masks of one shape, got "
                         f"{sorted(tuple(s) for s in shapes)}")
    inside = box != 0
    if inside.shape == y0.shape:  # exclusive labels (B, *spatial)
        pass
    elif inside.dim() == y0.dim() - 1 and inside.shape == (y0.shape[0], *y0.shape[2:]):  # multi-label
        inside = inside.unsqueeze(1)
    else:
        raise ValueError(f"medsemi.ops.pseudo_label: box {tuple(box.shape)} does not match labels "
                         f"{tuple(y0.shape)}")
    y_f = torch.where(inside, y_lu, y_ul)
    k_f = torch.where(inside, k_lu, k_ul)
    k_s = (k_f != 0) & (k0 != 0) & (y_f == y0)
    return y_f, k_s.to(k0.dtype)


__all__ = ["pseudo_label", "symgd_fuse"]
