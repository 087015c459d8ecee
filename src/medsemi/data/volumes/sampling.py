"""VerSemi sampling and cropping (spec versemi.md 1.6, 1.8), batched on tensors.

The original reads one case per item in loader workers and crops it with NumPy. Here all volumes
are padded once (the spec's padding rule), flattened into one buffer held in memory (on the training
device if wanted), and a batch of crops is one gather with index arithmetic: no loader workers, no
per-sample Python loop, no host-device sync inside an epoch.

Semantics kept from ``dataset/pancreas.py`` (spec 1.6):

- Padding: if **any** axis is <= the patch size, every axis is zero-padded on both sides by
  ``max((patch - size) // 2 + 1, 0)`` voxels (axes larger than the patch get 0).
- Labelled: dataset length ``repeats * n`` (5 x), item ``i`` is case ``i mod n``; shuffled each epoch;
  batches with drop_last; each crop starts uniformly in ``[0, size - patch)`` per axis (upper bound
  excluded, as ``np.random.randint``).
- Unlabelled: each case once per epoch, shuffled, drop_last; always the centre crop, starting at
  ``round((size - patch) / 2)`` with Python's round-half-to-even.
- Labels: only the value 1 is foreground (done by :func:`medsemi.data.volumes.cases.binarize_label`).

Randomness: the order of an epoch comes from ``(seed, epoch)`` (the same on every rank, each rank takes
a strided share, as ``DistributedSampler``); crop starts come from a device generator seeded with
``(seed, epoch, rank)``. Call :meth:`CropSampler.set_epoch` before each epoch.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from medsemi.data.volumes.cases import Volume, read_cases

PatchSize = int | Sequence[int]


def _patch3(patch_size: PatchSize) -> tuple[int, int, int]:
    p = (patch_size,) * 3 if isinstance(patch_size, int) else tuple(int(s) for s in patch_size)
    if len(p) != 3 or min(p) < 1:
        raise ValueError(f"patch size must be a positive int or 3 ints, got {patch_size!r}")
    return p  # type: ignore[return-value]


def versemi_pad_amounts(shape: Sequence[int], patch_size: PatchSize = 96) -> tuple[int, int, int]:
    """Per-axis padding (each side) of spec 1.6: only when some axis is <= the patch size."""
    p = _patch3(patch_size)
    if not any(s <= q for s, q in zip(shape, p)):
        return (0, 0, 0)
    return tuple(max((q - s) // 2 + 1, 0) for s, q in zip(shape, p))  # type: ignore[return-value]


def centre_start(size: int, patch: int) -> int:
    """Centre-crop start ``round((size - patch) / 2)``, Python rounding as in the original."""
    return int(round((size - patch) / 2.0))


class VolumeBank:
    """All cases padded per spec 1.6 and flattened into one buffer; crops by index arithmetic.

    ``image_dtype`` may be float16/bfloat16 to halve memory (crops are returned as float32).
    """

    def __init__(
        self,
        volumes: Sequence[Volume],
        patch_size: PatchSize = 96,
        *,
        device: str | torch.device | None = None,
        with_labels: bool = True,
        image_dtype: torch.dtype = torch.float32,
    ) -> None:
        if not volumes:
            raise ValueError("VolumeBank needs at least one volume")
        self.patch = _patch3(patch_size)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.names = [v.name for v in volumes]
        self.with_labels = with_labels
        shapes, offsets, centres, images, labels = [], [], [], [], []
        total = 0
        for v in volumes:
            if v.image.ndim != 3:
                raise ValueError(f"{v.name}: image must be 3D, got shape {v.image.shape}")
            if with_labels:
                if v.label is None:
                    raise ValueError(f"{v.name}: no label (build the bank with with_labels=False)")
                if v.label.shape != v.image.shape:
                    raise ValueError(f"{v.name}: image shape {v.image.shape} != label shape {v.label.shape}")
            pad = versemi_pad_amounts(v.image.shape, self.patch)
            widths = [(a, a) for a in pad]
            img = np.pad(v.image.astype(np.float32, copy=False), widths) if any(pad) else v.image
            shape = img.shape
            if any(s < q for s, q in zip(shape, self.patch)):  # guard; unreachable with the spec's rule
                raise ValueError(f"{v.name}: padded shape {shape} smaller than patch {self.patch}")
            images.append(torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32)).reshape(-1))
            if with_labels:
                lab = np.pad(v.label, widths) if any(pad) else v.label
                labels.append(torch.from_numpy(np.ascontiguousarray(lab, dtype=np.uint8)).reshape(-1))
            shapes.append(shape)
            offsets.append(total)
            centres.append([centre_start(s, q) for s, q in zip(shape, self.patch)])
            total += int(np.prod(shape))
        dev = self.device
        self.image = torch.cat(images).to(dev, image_dtype)
        self.label = torch.cat(labels).to(dev) if with_labels else None
        self.shapes = torch.tensor(shapes, dtype=torch.long, device=dev)
        self.offsets = torch.tensor(offsets, dtype=torch.long, device=dev)
        self.task_ids = torch.tensor([v.task_id for v in volumes], dtype=torch.long, device=dev)
        self.centre_starts = torch.tensor(centres, dtype=torch.long, device=dev)
        # random starts are drawn in [0, size - patch); after the spec's padding size - patch >= 1 always
        self.start_range = (self.shapes - torch.tensor(self.patch, device=dev)).clamp_min(1)
        self._ar = [torch.arange(q, device=dev) for q in self.patch]

    @classmethod
    def from_folder(cls, root: str | Path, names: Sequence[str], patch_size: PatchSize = 96,
                    **kwargs: object) -> VolumeBank:
        """Read ``<root>/<name>.h5`` for every name (spec 1.4 layout) and build a bank."""
        with_labels = bool(kwargs.get("with_labels", True))
        return cls(read_cases(root, names, with_label=with_labels), patch_size, **kwargs)  # type: ignore[arg-type]

    def __len__(self) -> int:
        return len(self.names)

    def random_starts(self, index: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Uniform integer starts in ``[0, size - patch)`` per axis, ``(B, 3)`` int64, on the device."""
        u = torch.rand((index.shape[0], 3), generator=generator, device=self.device, dtype=torch.float64)
        rng = self.start_range[index]
        return torch.minimum((u * rng).floor().long(), rng - 1)

    def crop(self, index: torch.Tensor, starts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Crops of cases ``index`` (B,) at ``starts`` (B, 3): image (B, 1, *patch) float32,
        label (B, *patch) int64 (None without labels). One gather into the flat buffer."""
        shp = self.shapes[index]
        sy_z = (shp[:, 1] * shp[:, 2])[:, None, None, None]
        sz = shp[:, 2][:, None, None, None]
        ix = (starts[:, 0:1] + self._ar[0])[:, :, None, None]
        iy = (starts[:, 1:2] + self._ar[1])[:, None, :, None]
        iz = (starts[:, 2:3] + self._ar[2])[:, None, None, :]
        lin = self.offsets[index][:, None, None, None] + ix * sy_z + iy * sz + iz
        image = self.image[lin].to(torch.float32).unsqueeze(1)
        label = self.label[lin].long() if self.label is not None else None
        return image, label


class CropSampler:
    """Iterates batches of crops for one epoch (spec 1.6). ``len()`` = iterations per epoch (spec 1.8).

    ``mode='random'`` with ``repeats=5`` is the labelled loader; ``mode='centre'`` with ``repeats=1``
    the unlabelled one. With ``world_size > 1``, ``batch_size`` is per rank.
    """

    def __init__(
        self,
        bank: VolumeBank,
        batch_size: int = 8,
        *,
        mode: str = "random",
        repeats: int = 5,
        shuffle: bool = True,
        drop_last: bool = True,
        with_label: bool = True,
        seed: int = 2333,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if mode not in ("random", "centre"):
            raise ValueError(f"mode must be 'random' or 'centre', got {mode!r}")
        if with_label and bank.label is None:
            raise ValueError("with_label=True needs a bank built with labels")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.bank, self.batch_size, self.mode = bank, batch_size, mode
        self.repeats, self.shuffle, self.drop_last = repeats, shuffle, drop_last
        self.with_label, self.seed, self.rank, self.world_size = with_label, seed, rank, world_size
        self.epoch = 0

    @property
    def num_items(self) -> int:
        """Items this rank sees per epoch."""
        return (self.repeats * len(self.bank)) // self.world_size

    def __len__(self) -> int:
        n = self.num_items
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def epoch_order(self) -> torch.Tensor:
        """Case indices of this rank's items for the current epoch (CPU, int64)."""
        total = self.repeats * len(self.bank)
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
            items = torch.randperm(total, generator=g)
        else:
            items = torch.arange(total)
        items = items[self.rank :: self.world_size][: self.num_items]
        return items % len(self.bank)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        bank = self.bank
        order = self.epoch_order().to(bank.device, non_blocking=True)
        gen = None
        if self.mode == "random":
            gen = torch.Generator(device=bank.device)
            gen.manual_seed((self.seed * 1_000_003 + self.epoch) * 1009 + self.rank)
        for b in range(len(self)):
            index = order[b * self.batch_size : (b + 1) * self.batch_size]
            starts = bank.random_starts(index, gen) if gen is not None else bank.centre_starts[index]
            image, label = bank.crop(index, starts)
            task = bank.task_ids[index]
            batch = {"image": image, "task": task, "domain": task - 1, "index": index, "start": starts}
            if self.with_label and label is not None:
                batch["label"] = label
            yield batch


def labelled_sampler(
    bank: VolumeBank, batch_size: int = 8, *, repeats: int = 5, **kwargs: object
) -> CropSampler:
    """The labelled loader of spec 1.6: ``repeats`` x cases, shuffled, random crops, drop_last."""
    return CropSampler(bank, batch_size, mode="random", repeats=repeats, **kwargs)  # type: ignore[arg-type]


def unlabelled_sampler(bank: VolumeBank, batch_size: int = 8, *, with_label: bool = False,
                       **kwargs: object) -> CropSampler:
    """The unlabelled loader of spec 1.6: each case once, shuffled, centre crops, drop_last; labels
    are not returned unless ``with_label`` (the files hold them; the method must not use them)."""
    return CropSampler(bank, batch_size, mode="centre", repeats=1, with_label=with_label,
                       **kwargs)  # type: ignore[arg-type]
