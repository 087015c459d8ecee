"""Crop augmentation of the single-task 3D lineage: random 90° rotation and flip, batched on the device.

UA-MT's ``RandomRotFlip`` (Yu et al., MICCAI 2019, ``dataloaders/la_heart.py``; SSL4MIS and BCP reuse it)
rotates a whole scan by ``k · 90°``, ``k`` uniform in 0..3, in the plane of its first two axes (the
in-plane axes; slices are the last), then flips it along one of those two axes, chosen uniformly (always
one flip), before the random crop. Here it acts on the crops: the crop is cubic, so rotating or flipping
it gives the crop of the rotated or flipped scan, and the distribution of crops is the same (up to the
crop start's excluded upper bound, which a flip moves to the lower end). VerSemi uses none (spec
versemi.md 1.6): ``data.options.augment`` is ``none`` by default.
"""

from __future__ import annotations

import torch

AUGMENTS = ("none", "rot_flip")


def rot_flip(image: torch.Tensor, label: torch.Tensor | None, generator: torch.Generator
             ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rotate each crop by its own ``k · 90°`` in the plane of the first two spatial axes, then flip one
    of those axes. ``image`` (B, C, X, Y, Z) with X == Y, ``label`` (B, X, Y, Z) or None; the draws come
    from ``generator``. All four rotations and both flips are computed for the batch and selected per
    sample (no per-sample Python loop, no host synchronisation)."""
    b = image.shape[0]
    if image.dim() != 5 or image.shape[2] != image.shape[3]:
        raise ValueError(f"data/volumes/augment3d.py: rot_flip needs crops (B, C, X, Y, Z) with X == Y, "
                         f"got {tuple(image.shape)}")
    k = torch.randint(4, (b,), generator=generator, device=generator.device).to(image.device)
    axis = torch.randint(2, (b,), generator=generator, device=generator.device).to(image.device)

    def apply(x: torch.Tensor, first: int) -> torch.Tensor:
        plane = (first, first + 1)
        shape = (b,) + (1,) * (x.dim() - 1)
        out = x
        for turns in (1, 2, 3):
            out = torch.where((k == turns).view(shape), torch.rot90(x, turns, plane), out)
        return torch.where((axis == 0).view(shape), out.flip(first), out.flip(first + 1))

    return apply(image, 2), (apply(label, 1) if label is not None else None)
