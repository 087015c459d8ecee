"""Dataset objects shared by every reader: samples, splits, in-memory arrays."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import Dataset

from medsemi.data.contract import DatasetInfo

Sample = dict[str, Any]
"""One sample: ``image`` (C,H,W float in [-1,1]), ``label`` (H,W int64 or K,H,W float; absent for
unlabelled data that has none), ``domain`` (int, 0-based), ``name`` (str)."""


class TensorDataset2D(Dataset):
    """Samples held in memory as tensors (used by the synthetic data and by cached readers)."""

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor | None,
        domains: Sequence[int] | torch.Tensor,
        names: Sequence[str],
    ) -> None:
        if labels is not None and len(labels) != len(images):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        if len(names) != len(images) or len(domains) != len(images):
            raise ValueError("images, domains and names must have the same length")
        self.images = images
        self.labels = labels
        self.domains = torch.as_tensor(domains, dtype=torch.long)
        self.names = list(names)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> Sample:
        sample: Sample = {"image": self.images[i], "domain": int(self.domains[i]), "name": self.names[i]}
        if self.labels is not None:
            sample["label"] = self.labels[i]
        return sample

    def subset(self, indices: Sequence[int]) -> TensorDataset2D:
        idx = torch.as_tensor(list(indices), dtype=torch.long)
        labels = None if self.labels is None else self.labels[idx]
        return TensorDataset2D(self.images[idx], labels, self.domains[idx], [self.names[i] for i in idx])


@dataclass
class Splits:
    """The splits of one experiment, as objects.

    ``labelled``: images with labels used for supervision. ``unlabelled``: images whose
    labels the methods never see (they may still carry them, for optional diagnostics).
    ``test`` and ``validation``: one dataset per domain name (validation optional).
    """

    info: DatasetInfo
    labelled: Dataset
    unlabelled: Dataset
    test: dict[str, Dataset]
    validation: dict[str, Dataset] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        return {
            "labelled": len(self.labelled),
            "unlabelled": len(self.unlabelled),
            "test": {k: len(v) for k, v in self.test.items()},
            "validation": {k: len(v) for k, v in self.validation.items()},
        }
