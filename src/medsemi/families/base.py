"""What the engine asks of a dataset family (2D images, 3D volumes): batch sources and an evaluator.

A *family* is the whole of one kind of dataset as training sees it: its self-description
(:class:`~medsemi.data.contract.DatasetInfo`), its splits, the endless batch sources the training loop
draws from, and the evaluation that scores networks on its test (and validation) data. The engine and the
workflows talk to this interface only; which family a config gets is decided in one place,
:func:`medsemi.families.select.build_family`, from ``data.format``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from medsemi.config import Config
from medsemi.data.contract import DatasetInfo


class DataError(ValueError):
    """The data on disk cannot be used; the message names the files and the problems."""


class BatchSource(Protocol):
    """An endless stream of batches on the training device, resumable exactly."""

    def next(self) -> dict[str, torch.Tensor]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class DatasetFamily(Protocol):
    """The engine's view of a dataset (see the module docstring)."""

    info: DatasetInfo

    def summary(self) -> dict[str, Any]:
        """Split sizes and sources, written to ``splits.json`` and the report."""
        ...

    def make_sources(
        self, cfg: Config, device: torch.device, seed: int, uses_unlabelled: bool, rank: int = 0, world_size: int = 1
    ) -> tuple[BatchSource, BatchSource | None]:
        """The labelled source and, when the method uses unlabelled data, the unlabelled one."""
        ...

    def evaluate(
        self, networks: dict[str, nn.Module], cfg: Config, device: torch.device, surface: bool = False,
        amp: str = "off", validation: bool = True,
    ) -> dict[str, dict[str, dict]]:
        """``{"test": {role: aggregate}, "val": {...}}`` for each network (``val`` when the family has one);
        each aggregate's ``mean_dice`` is the model-selection score."""
        ...

    def write_overlays(self, model: nn.Module, cfg: Config, device: torch.device, out_dir: Path) -> list[Path]:
        """Prediction overlay pictures for the report (none for families without 2D images)."""
        ...
