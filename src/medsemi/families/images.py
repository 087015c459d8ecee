"""The 2D image family: in-memory splits, device-side pools, per-domain evaluation (spec ust-run.md 1.3).

Every 2D ``data.format`` (the four datasets' folder formats, the generic format and the embedded
synthetic data) becomes an :class:`ImageFamily`: the :class:`~medsemi.data.datasets.Splits` the readers
build, plus the two things the engine needs from it — batch sources (each split cached once on the
device and sampled and augmented there, :mod:`medsemi.data.sources`) and the evaluation of networks on
the cached test and validation splits (:mod:`medsemi.evaluation.evaluate`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medsemi.config import Config
from medsemi.data.augment import BatchAugment
from medsemi.data.datasets import Splits
from medsemi.data.sources import PoolSource, cache_dataset
from medsemi.evaluation.adabn import images_by_domain
from medsemi.evaluation.evaluate import evaluate_networks
from medsemi.evaluation.report import write_overlays
from medsemi.metrics import policy_from_eval


@dataclass
class ImageFamily(Splits):
    """2D splits with their batch sources and evaluation (see the module docstring)."""

    _device_cache: dict[Any, dict] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def of(cls, splits: Splits) -> ImageFamily:
        """The family of already-built splits (returned as is when it is one)."""
        if isinstance(splits, ImageFamily):
            return splits
        return cls(**{f.name: getattr(splits, f.name) for f in fields(Splits)})

    # -- batch sources ---------------------------------------------------------------------------
    def make_sources(
        self, cfg: Config, device: torch.device, seed: int, uses_unlabelled: bool, rank: int = 0, world_size: int = 1
    ) -> tuple[PoolSource, PoolSource | None]:
        """Labelled pool (weak augmentation) and, when the method uses it, the unlabelled pool (weak and
        strong views, no labels). ``seed`` already differs per rank."""
        augment = BatchAugment(cfg.augment, self.info.label_spec)
        tr = cfg.train
        labelled = PoolSource(self.labelled, tr.batch_size, device, seed + 2, augment)
        if not uses_unlabelled:
            return labelled, None
        unlabelled = PoolSource(
            self.unlabelled, tr.unlabelled_batch_size, device, seed + 3, augment, strong=True, with_label=False
        )
        self._device_cache[("unlabelled", str(device))] = unlabelled.data  # reused by BN adaptation
        return labelled, unlabelled

    # -- evaluation ------------------------------------------------------------------------------
    def cached(self, split: str, device: torch.device) -> dict[str, dict]:
        """``test`` or ``validation`` as device tensors per domain, cached on first use."""
        key = (split, str(device))
        if key not in self._device_cache:
            sets = self.test if split == "test" else self.validation
            self._device_cache[key] = {d: cache_dataset(ds, device) for d, ds in sets.items()}
        return self._device_cache[key]

    def adapt_images(self, cfg: Config, device: torch.device) -> dict[str, torch.Tensor] | None:
        """Unlabelled training images per domain for AdaBN evaluation (``eval.bn_adaptation``), else None."""
        if not cfg.eval.bn_adaptation:
            return None
        key = ("unlabelled", str(device))
        if key not in self._device_cache:
            self._device_cache[key] = cache_dataset(self.unlabelled, device, with_label=False)
        return images_by_domain(self._device_cache[key], self.info.domains)

    def evaluate(
        self, networks: dict[str, nn.Module], cfg: Config, device: torch.device, surface: bool = False,
        amp: str = "off", validation: bool = True,
    ) -> dict[str, dict[str, dict]]:
        """Per-domain metrics of every network on the test split; the ``student`` network also on the
        validation split when there is one and ``validation`` is asked for."""
        kw: dict[str, Any] = dict(
            label_spec=self.info.label_spec, policy=policy_from_eval(cfg.eval), batch_size=cfg.eval.batch_size,
            surface=surface, amp=amp, selection_metric=cfg.eval.selection_metric,
            adapt_images=self.adapt_images(cfg, device),
        )
        result = {"test": evaluate_networks(networks, self.cached("test", device), **kw)}
        if validation and self.validation and "student" in networks:
            result["val"] = evaluate_networks({"student": networks["student"]}, self.cached("validation", device), **kw)
        return result

    def write_overlays(self, model: nn.Module, cfg: Config, device: torch.device, out_dir: Path) -> list[Path]:
        return write_overlays(model, self.cached("test", device), self.info.label_spec, out_dir, cfg.eval.overlays)
