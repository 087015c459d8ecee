"""The endless crop-batch stream of a 3D volume bank (spec versemi.md 1.6), resumable exactly."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from medsemi.data.volumes.augment3d import AUGMENTS, rot_flip
from medsemi.data.volumes.sampling import CropSampler


class CropSource:
    """Endless stream of crop batches for the engine: ``next()``, ``state_dict()``, ``load_state_dict()``.

    Wraps a :class:`~medsemi.data.volumes.sampling.CropSampler` (epoch order from ``(seed, epoch)``, crops by
    one gather). Random crop starts come from one device generator whose state is checkpointed, so a
    resumed run draws the very same crops (``tests/test_versemi_method.py``). Epochs follow each other
    without a break: labelled and unlabelled streams each cycle their own epochs (the original ends a
    stage-2 epoch at the shorter loader and restarts both; that only changes which batches meet).
    ``augment="rot_flip"``: each crop is rotated and flipped as UA-MT's ``RandomRotFlip``
    (:mod:`~medsemi.data.volumes.augment3d`), with draws from the same checkpointed generator.
    """

    def __init__(self, sampler: CropSampler, augment: str = "none") -> None:
        if augment not in AUGMENTS:
            raise ValueError(f"data.options.augment must be one of {AUGMENTS}, got {augment!r}")
        if len(sampler) < 1:
            raise ValueError(
                f"{sampler.bank.names[:3]}...: {sampler.num_items} crops per epoch cannot fill one batch of "
                f"{sampler.batch_size} (drop_last); lower the batch size or add cases"
            )
        self.sampler = sampler
        self.bank = sampler.bank
        self.position = 0
        self.augment = augment
        self.generator: torch.Generator | None = None
        if sampler.mode == "random" or augment != "none":
            self.generator = torch.Generator(device=self.bank.device)
            self.generator.manual_seed(sampler.seed * 1_000_003 + sampler.rank)
        self._order = self._epoch_order()

    def _epoch_order(self) -> torch.Tensor:
        return self.sampler.epoch_order().to(self.bank.device)

    def next(self) -> dict[str, torch.Tensor]:
        if self.position >= len(self.sampler):
            self.sampler.set_epoch(self.sampler.epoch + 1)
            self._order = self._epoch_order()
            self.position = 0
        bs = self.sampler.batch_size
        index = self._order[self.position * bs : (self.position + 1) * bs]
        self.position += 1
        if self.sampler.mode == "random":
            starts = self.bank.random_starts(index, self.generator)
        else:
            starts = self.bank.centre_starts[index]
        image, label = self.bank.crop(index, starts)
        if self.augment == "rot_flip":
            image, label = rot_flip(image, label, self.generator)
        task = self.bank.task_ids[index]
        batch = {"image": image, "task": task, "domain": task - 1, "index": index, "start": starts}
        if self.sampler.with_label and label is not None:
            batch["label"] = label
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.sampler.epoch,
            "position": self.position,
            "generator": self.generator.get_state() if self.generator is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.set_epoch(int(state["epoch"]))
        self._order = self._epoch_order()
        self.position = int(state["position"])
        if self.generator is not None and state.get("generator") is not None:
            self.generator.set_state(state["generator"].cpu())

    def __len__(self) -> int:
        """Iterations per epoch of this stream (spec 1.8)."""
        return len(self.sampler)


class LazyCropSource:
    """A :class:`CropSource` built on its first ``next()``: the unlabelled crop bank of a two-stage run
    is neither gathered (no device memory) nor drawn from during stage 1, which never reads it. Until
    then its state is the untouched stream's (epoch 0, position 0), so checkpoints resume exactly."""

    def __init__(self, build: Callable[[], CropSource]) -> None:
        self._build = build
        self.source: CropSource | None = None
        self._pending: dict[str, Any] | None = None

    def _get(self) -> CropSource:
        if self.source is None:
            self.source = self._build()
            if self._pending is not None:
                self.source.load_state_dict(self._pending)
        return self.source

    def next(self) -> dict[str, torch.Tensor]:
        return self._get().next()

    def state_dict(self) -> dict[str, Any]:
        if self.source is None:
            return self._pending if self._pending is not None else {"epoch": 0, "position": 0, "generator": None}
        return self.source.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.source is None and int(state["epoch"]) == 0 and int(state["position"]) == 0:
            self._pending = state  # still untouched: stay unbuilt
            return
        self._get().load_state_dict(state)

    def __bool__(self) -> bool:  # a source is truthy without being built (``if source:`` must not build it)
        return True

    def __len__(self) -> int:
        return len(self._get())
