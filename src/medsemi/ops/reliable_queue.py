"""UST-RUN reliable-sample queue with its adaptive threshold, and the unreliable-slot pick.

Spec: ``shared/spec/ust-run.md`` section 4.3 steps 10-11 (UST ``train.py`` queue update) and section 6
items 9 and 19 (no host round trips; the queue, ``θ`` and their bookkeeping live in the checkpoint).

The queue is a fixed-size set of device buffers; ``count`` says how many leading slots are valid (slot 0
is the front = newest). ``update`` does the spec's rules without any host synchronisation: the new
ordering is a sort of keys (reliable incoming samples in batch order first, then the old entries in their
order), and the buffers are refilled with one gather.

Rules (spec 4.3 step 11), ``h`` the batch hardness, ``θ`` the threshold, ``N`` the capacity:

- reliable = ``h < θ`` (strict); ``k`` = their number;
- ``k > 0``: reliable samples go to the front in batch order, followed by the first old entries, keeping
  ``N`` entries in all (the oldest are dropped); then ``θ <- min(θ, max h stored)``. With an empty queue
  this is "``Q`` <- the reliable samples";
- ``k = 0`` and ``Q`` non-empty: ``θ <- min(θ * growth, cap)``;
- ``k = 0`` and ``Q`` empty: nothing changes.

Deviation, unreachable with the original sizes (batch 4 <= N = 10): when ``k > N`` the original keeps
more than ``N`` entries (its ``old[:N-k]`` slice with a negative bound, or all ``k`` on an empty queue);
here the queue holds the first ``N`` reliable samples, and ``θ`` uses the stored ones.
"""

from __future__ import annotations

import torch
from torch import nn

from medsemi.data.contract import LabelSpec


class ReliableQueue(nn.Module):
    """Fixed-capacity queue of reliable unlabelled samples (weak image, teacher label, teacher mask,
    hardness at insertion) and the adaptive threshold ``θ``. Everything is a buffer, so it travels with
    ``.to(device)`` and ``state_dict()``.
    """

    def __init__(self, image_shape: tuple[int, ...], label_shape: tuple[int, ...],
                 mask_shape: tuple[int, ...], label_dtype: torch.dtype = torch.long, capacity: int = 10,
                 theta_init: float = 0.1, growth: float = 1.0005, cap: float = 0.1) -> None:
        super().__init__()
        if capacity < 1:
            raise ValueError(f"medsemi.ops.reliable_queue: capacity must be >= 1, got {capacity}")
        self.capacity = int(capacity)
        self.image_shape = tuple(image_shape)
        self.label_shape = tuple(label_shape)
        self.mask_shape = tuple(mask_shape)
        self.theta_init = float(theta_init)
        self.growth = float(growth)
        self.cap = float(cap)
        n = self.capacity
        self.register_buffer("images", torch.zeros((n, *self.image_shape)))
        self.register_buffer("labels", torch.zeros((n, *self.label_shape), dtype=label_dtype))
        self.register_buffer("masks", torch.zeros((n, *self.mask_shape)))
        self.register_buffer("hardness", torch.zeros(n, dtype=torch.float64))
        self.register_buffer("inserted_at", torch.zeros(n, dtype=torch.long))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))
        self.register_buffer("theta", torch.tensor(self.theta_init, dtype=torch.float64))
        self.register_buffer("step", torch.zeros((), dtype=torch.long))

    @classmethod
    def for_label_spec(cls, label_spec: LabelSpec, in_channels: int, spatial: tuple[int, ...],
                       **kwargs: float | int) -> ReliableQueue:
        """Queue shaped for the data contract: exclusive labels int64 ``spatial`` with masks ``spatial``;
        multi-label labels and masks float32 ``(K, *spatial)``."""
        spatial = tuple(spatial)
        if label_spec.multilabel:
            shape = (label_spec.num_outputs, *spatial)
            return cls((in_channels, *spatial), shape, shape, torch.float32, **kwargs)
        return cls((in_channels, *spatial), spatial, spatial, torch.long, **kwargs)

    def _check(self, name: str, tensor: torch.Tensor, shape: tuple[int, ...], batch: int) -> None:
        if tensor.dim() != len(shape) + 1 or tuple(tensor.shape[1:]) != shape or tensor.shape[0] != batch:
            raise ValueError(f"medsemi.ops.reliable_queue: {name} has shape {tuple(tensor.shape)}, "
                             f"expected ({batch}, {', '.join(map(str, shape))})")

    @torch.no_grad()
    def update(self, images: torch.Tensor, labels: torch.Tensor, masks: torch.Tensor,
               hardness: torch.Tensor) -> torch.Tensor:
        """Insert the reliable samples of a batch and update ``θ`` (spec 4.3 step 11).

        Returns the bool ``(B,)`` reliable flags (``h < θ`` with the threshold before the update).
        """
        if hardness.dim() != 1:
            raise ValueError("medsemi.ops.reliable_queue: hardness must be (B,), "
                             f"got {tuple(hardness.shape)}")
        b, n = hardness.shape[0], self.capacity
        self._check("images", images, self.image_shape, b)
        self._check("labels", labels, self.label_shape, b)
        self._check("masks", masks, self.mask_shape, b)
        dev = self.theta.device
        h = hardness.detach().to(device=dev, dtype=torch.float64)
        reliable = h < self.theta
        k = reliable.sum()
        sentinel = b + n
        keys_new = torch.where(reliable, torch.arange(b, device=dev), sentinel)
        slots = torch.arange(n, device=dev)
        keys_old = torch.where(slots < self.count, b + slots, sentinel)
        order = torch.argsort(torch.cat([keys_new, keys_old]), stable=True)[:n]

        def take(new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
            return torch.cat([new.detach().to(device=dev, dtype=old.dtype), old]).index_select(0, order)

        new_h = take(h, self.hardness)
        self.images.copy_(take(images, self.images))
        self.labels.copy_(take(labels, self.labels))
        self.masks.copy_(take(masks, self.masks))
        self.inserted_at.copy_(take(self.step.expand(b), self.inserted_at))
        self.hardness.copy_(new_h)
        had_entries = self.count > 0
        new_count = torch.clamp(self.count + k, max=n)
        max_h = torch.where(slots < new_count, new_h, torch.full_like(new_h, -torch.inf)).max()
        relaxed = torch.clamp(self.theta * self.growth, max=self.cap)
        theta = torch.where(k > 0, torch.minimum(self.theta, max_h),
                            torch.where(had_entries, relaxed, self.theta))
        self.theta.copy_(theta)
        self.count.copy_(new_count)
        self.step.add_(1)
        return reliable

    def gather(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(images, labels, masks)`` of the given slots (int64 ``(n,)``, each in ``[0, count)``)."""
        indices = indices.to(self.images.device)
        return (self.images.index_select(0, indices), self.labels.index_select(0, indices),
                self.masks.index_select(0, indices))

    def draw_indices(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` slots uniform with replacement over ``[0, count)`` (all 0 while the queue is empty)."""
        dev = self.images.device
        if generator is None:
            u = torch.rand(n, device=dev, dtype=torch.float64)
        else:
            u = torch.rand(n, generator=generator, device=generator.device, dtype=torch.float64).to(dev)
        size = self.count.clamp(min=1).to(torch.float64)
        return torch.minimum(torch.floor(u * size), size - 1).long()

    def ages(self) -> torch.Tensor:
        """Updates since insertion per slot, int64 ``(N,)``; -1 for empty slots."""
        slots = torch.arange(self.capacity, device=self.step.device)
        return torch.where(slots < self.count, self.step - self.inserted_at, -1)

    @torch.no_grad()
    def clear(self) -> None:
        """Empty the queue and reset ``θ`` to its initial value."""
        self.count.zero_()
        self.theta.fill_(self.theta_init)

    def extra_repr(self) -> str:
        return (f"capacity={self.capacity}, image_shape={self.image_shape}, growth={self.growth}, "
                f"cap={self.cap}")


def pick_hardest(hardness: torch.Tensor) -> torch.Tensor:
    """Index of the largest hardness, the first one on ties (spec 4.3 step 10), int64 0-dim tensor.

    NaN never wins (the original's ``h > max_v`` scan skips it); all-NaN gives 0.
    """
    if hardness.dim() != 1 or hardness.shape[0] == 0:
        raise ValueError(f"medsemi.ops.reliable_queue: hardness must be a non-empty (B,), "
                         f"got {tuple(hardness.shape)}")
    h = torch.nan_to_num(hardness.to(torch.float64), nan=-torch.inf)
    idx = torch.arange(h.shape[0], device=h.device)
    return torch.where(h == h.max(), idx, h.shape[0]).min()


__all__ = ["ReliableQueue", "pick_hardest"]
