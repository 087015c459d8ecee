"""The data contract: how a dataset describes itself, and the tensor conventions.

Tensor conventions used everywhere in medsemi (2D; 3D adds a depth axis):

- image: float32 ``(B, C, H, W)``, intensities in ``[-1, 1]``.
- label ("target"): exclusive kind -> int64 ``(B, H, W)`` class indices, 0 = background;
  multi-label kind -> float32 ``(B, K, H, W)`` in {0, 1}, one channel per class.
- pixel weight / confidence mask: exclusive -> float32 ``(B, H, W)``;
  multi-label -> float32 ``(B, K, H, W)`` (one weight per channel).
- domain: int64 ``(B,)``, 0-based index into ``DatasetInfo.domains``.

Methods read a ``LabelSpec`` and never a dataset's name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

LabelKind = Literal["exclusive", "multilabel"]


@dataclass(frozen=True)
class LabelSpec:
    """What a network output means.

    ``exclusive``: softmax over ``len(class_names)`` outputs, index 0 is background.
    ``multilabel``: one independent sigmoid per class (e.g. fundus cup and disc, where
    the disc contains the cup); there is no background channel.
    """

    kind: LabelKind
    class_names: tuple[str, ...]

    def __post_init__(self) -> None:
        if self.kind not in ("exclusive", "multilabel"):
            raise ValueError(f"label kind must be 'exclusive' or 'multilabel', got {self.kind!r}")
        if self.kind == "exclusive" and len(self.class_names) < 2:
            raise ValueError("an exclusive label spec needs background plus at least one class")
        if self.kind == "multilabel" and len(self.class_names) < 1:
            raise ValueError("a multi-label spec needs at least one class")

    @property
    def num_outputs(self) -> int:
        """Number of network output channels."""
        return len(self.class_names)

    @property
    def multilabel(self) -> bool:
        return self.kind == "multilabel"

    @property
    def foreground_indices(self) -> tuple[int, ...]:
        """Output indices that are scored (background excluded for exclusive labels)."""
        start = 0 if self.multilabel else 1
        return tuple(range(start, self.num_outputs))

    @property
    def foreground_names(self) -> tuple[str, ...]:
        return tuple(self.class_names[i] for i in self.foreground_indices)

    def predict(self, logits: torch.Tensor) -> torch.Tensor:
        """Hard label from logits: argmax (exclusive) or sigmoid >= 0.5 (multi-label)."""
        if self.multilabel:
            return (logits >= 0).to(torch.float32)
        return logits.argmax(dim=1)

    def to_binary(self, label: torch.Tensor) -> torch.Tensor:
        """Per-class binary masks ``(B, F, *spatial)`` bool, F = foreground classes."""
        if self.multilabel:
            return label.bool()
        classes = torch.tensor(self.foreground_indices, device=label.device)
        shape = (1, -1) + (1,) * (label.dim() - 1)
        return label.unsqueeze(1) == classes.view(shape)

    def foreground(self, label: torch.Tensor) -> torch.Tensor:
        """Union of all foreground classes, bool ``(B, *spatial)``."""
        if self.multilabel:
            return label.bool().any(dim=1)
        return label > 0

    def background_label(self, like: torch.Tensor) -> torch.Tensor:
        """A label of the right kind, all background, shaped like an image batch ``like``."""
        b, spatial = like.shape[0], like.shape[2:]
        if self.multilabel:
            return torch.zeros((b, self.num_outputs, *spatial), device=like.device)
        return torch.zeros((b, *spatial), dtype=torch.long, device=like.device)


@dataclass(frozen=True)
class DatasetInfo:
    """A dataset describes itself: channels, labels, domains, patch size."""

    name: str
    in_channels: int
    label_spec: LabelSpec
    domains: tuple[str, ...]
    patch_size: tuple[int, ...]
    spacing: tuple[float, ...] | None = None
    extra: dict = field(default_factory=dict)

    @property
    def num_domains(self) -> int:
        return len(self.domains)
