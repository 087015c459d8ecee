"""Batch sources: datasets cached on the training device and sampled there.

The original scripts load and augment each image in CPU loader workers (and restart them
every few iterations). Here a split is read once into device tensors, batches are drawn
by index with a device generator (reshuffled every pass, ``drop_last`` semantics as a
``DataLoader(shuffle=True, drop_last=True)``), and augmentation runs batched on the device
(``data/augment.py``). No worker, no host copy inside the loop.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from medsemi.data.augment import BatchAugment


def _collate(samples: list[dict]) -> dict:
    out: dict[str, Any] = {"image": torch.stack([torch.as_tensor(s["image"]) for s in samples])}
    if all("label" in s for s in samples):
        out["label"] = torch.stack([torch.as_tensor(s["label"]) for s in samples])
    out["domain"] = torch.tensor([int(s["domain"]) for s in samples], dtype=torch.long)
    out["name"] = [s["name"] for s in samples]
    return out


def cache_dataset(dataset: Dataset, device: torch.device, with_label: bool = True, workers: int | None = None) -> dict:
    """Read a whole dataset once into tensors on ``device`` (images, labels, domains, names).

    Files are read by ``workers`` loader processes (default: up to 4, one per core) once, at start-up.
    """
    if workers is None:
        workers = min(4, os.cpu_count() or 1) if len(dataset) > 64 else 0
    if len(dataset) == 0:
        raise ValueError("cannot cache an empty dataset")
    if hasattr(dataset, "images") and hasattr(dataset, "domains"):  # already in memory
        out = {"image": dataset.images, "domain": dataset.domains, "name": list(dataset.names)}
        if with_label and getattr(dataset, "labels", None) is not None:
            out["label"] = dataset.labels
    else:
        loader = DataLoader(dataset, batch_size=16, num_workers=workers, collate_fn=_collate)
        parts = list(loader)
        out = {
            "image": torch.cat([p["image"] for p in parts]),
            "domain": torch.cat([p["domain"] for p in parts]),
            "name": [n for p in parts for n in p["name"]],
        }
        if with_label and all("label" in p for p in parts):
            out["label"] = torch.cat([p["label"] for p in parts])
    return {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in out.items()}


class PoolSource:
    """Infinite, reshuffled, augmented batches from a cached split."""

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        device: torch.device,
        seed: int,
        augment: BatchAugment | None = None,
        strong: bool = False,
        with_label: bool = True,
        workers: int | None = None,
    ) -> None:
        self.data = cache_dataset(dataset, device, with_label=with_label, workers=workers)
        self.size = len(self.data["image"])
        if self.size < batch_size:
            raise ValueError(
                f"a split has {self.size} images, fewer than the batch size {batch_size}; "
                "lower train.batch_size or add data"
            )
        self.batch_size = batch_size
        self.device = device
        self.augment = augment
        self.strong = strong
        self.with_label = with_label and "label" in self.data
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.perm = torch.randperm(self.size, generator=self.generator, device=device)
        self.position = 0

    def next_indices(self) -> torch.Tensor:
        if self.position + self.batch_size > self.size:
            self.perm = torch.randperm(self.size, generator=self.generator, device=self.device)
            self.position = 0
        idx = self.perm[self.position : self.position + self.batch_size]
        self.position += self.batch_size
        return idx

    def next(self) -> dict[str, torch.Tensor]:
        idx = self.next_indices()
        image = self.data["image"].index_select(0, idx)
        label = self.data["label"].index_select(0, idx) if self.with_label else None
        if self.augment is not None:
            image, label = self.augment.weak(image, label, self.generator)
        batch = {"image": image, "domain": self.data["domain"].index_select(0, idx), "index": idx}
        if label is not None:
            batch["label"] = label
        if self.strong:
            batch["strong"] = self.augment.strong(image, self.generator) if self.augment else image.clone()
        return batch

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "perm": self.perm, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.perm = state["perm"].to(self.device)
        self.position = int(state["position"])
