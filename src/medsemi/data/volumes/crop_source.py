"""The endless crop-batch stream of a 3D volume bank (spec versemi.md 1.6), resumable exactly."""

from __future__ import annotations

from typing import Any

import torch

from medsemi.data.volumes.sampling import CropSampler


class CropSource:
    """Endless stream of crop batches for the engine: ``next()``, ``state_dict()``, ``load_state_dict()``.

    Wraps a :class:`~medsemi.data.volumes.sampling.CropSampler` (epoch order from ``(seed, epoch)``, crops by
    one gather). Random crop starts come from one device generator whose state is checkpointed, so a
    resumed run draws the very same crops (``tests/test_versemi_method.py``). Epochs follow each other
    without a break: labelled and unlabelled streams each cycle their own epochs (the original ends a
    stage-2 epoch at the shorter loader and restarts both; that only changes which batches meet).
    """

    def __init__(self, sampler: CropSampler) -> None:
        if len(sampler) < 1:
            raise ValueError(
                f"{sampler.bank.names[:3]}...: {sampler.num_items} crops per epoch cannot fill one batch of "
                f"{sampler.batch_size} (drop_last); lower the batch size or add cases"
            )
        self.sampler = sampler
        self.bank = sampler.bank
        self.position = 0
        self.generator: torch.Generator | None = None
        if sampler.mode == "random":
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
        if self.generator is not None:
            starts = self.bank.random_starts(index, self.generator)
        else:
            starts = self.bank.centre_starts[index]
        image, label = self.bank.crop(index, starts)
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
