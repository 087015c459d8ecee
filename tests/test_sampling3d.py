"""Batched VerSemi sampling/cropping (spec versemi.md 1.6, 1.8) against per-sample NumPy references."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from medsemi.data.synthetic.volumes3d import generate_synthetic_volumes
from medsemi.data.volumes.cases import Volume
from medsemi.data.volumes.sampling import (
    VolumeBank,
    centre_start,
    labelled_sampler,
    unlabelled_sampler,
    versemi_pad_amounts,
)

P = 16


def _ref_pad(arr: np.ndarray, patch: int) -> np.ndarray:
    """The original RandomCrop/CenterCrop padding, written out per axis."""
    w, h, d = arr.shape
    if w <= patch or h <= patch or d <= patch:
        pw, ph, pd = (max((patch - s) // 2 + 1, 0) for s in (w, h, d))
        arr = np.pad(arr, [(pw, pw), (ph, ph), (pd, pd)], mode="constant", constant_values=0)
    return arr


def _volumes() -> list[Volume]:
    rng = np.random.default_rng(3)
    shapes = [(12, 20, 30), (16, 16, 17), (17, 25, 18), (40, 22, 19), (20, 20, 20), (9, 33, 16)]
    names = ["data0001", "AAA", "spleen_01", "lung_001", "data0002", "BBB"]
    tasks = [1, 2, 3, 4, 1, 2]
    return [
        Volume(n, rng.standard_normal(s).astype(np.float32), (rng.integers(0, 3, s) == 1).astype(np.uint8), t)
        for n, s, t in zip(names, shapes, tasks)
    ]


def test_pad_amounts_and_centre_start() -> None:
    assert versemi_pad_amounts((95, 100, 200), 96) == (1, 0, 0)
    assert versemi_pad_amounts((96, 120, 120), 96) == (1, 0, 0)  # <= triggers padding
    assert versemi_pad_amounts((97, 97, 97), 96) == (0, 0, 0)
    assert versemi_pad_amounts((50, 97, 300), 96) == (24, 0, 0)
    assert versemi_pad_amounts((93, 94, 96), 96) == (2, 2, 1)
    assert [centre_start(s, 96) for s in (97, 99, 101, 98, 200)] == [0, 2, 2, 1, 52]  # half-to-even


def test_bank_crop_matches_numpy_reference() -> None:
    vols = _volumes()
    bank = VolumeBank(vols, P)
    g = torch.Generator().manual_seed(0)
    index = torch.tensor([0, 1, 2, 3, 4, 5, 3, 0])
    starts = bank.random_starts(index, g)
    image, label = bank.crop(index, starts)
    assert image.shape == (8, 1, P, P, P) and image.dtype == torch.float32
    assert label.shape == (8, P, P, P) and label.dtype == torch.int64
    for b, (i, s) in enumerate(zip(index.tolist(), starts.tolist())):
        img = _ref_pad(vols[i].image, P)
        lab = _ref_pad(vols[i].label.astype(np.uint8), P)
        assert all(0 <= s[a] < img.shape[a] - P for a in range(3))
        sl = tuple(slice(s[a], s[a] + P) for a in range(3))
        np.testing.assert_array_equal(image[b, 0].numpy(), img[sl])
        np.testing.assert_array_equal(label[b].numpy(), lab[sl])


def test_random_starts_cover_the_half_open_range() -> None:
    vols = _volumes()
    bank = VolumeBank(vols, P)
    g = torch.Generator().manual_seed(1)
    index = torch.full((4000,), 1)  # (16, 16, 17) -> pads (1, 1, 0) -> (18, 18, 17): starts {0,1}, {0,1}, {0}
    starts = bank.random_starts(index, g)
    for a, hi in enumerate((2, 2, 1)):
        assert set(starts[:, a].tolist()) == set(range(hi))
    index = torch.full((4000,), 3)  # (40, 22, 19): no axis <= 16, no padding
    starts = bank.random_starts(index, g)
    assert starts[:, 0].max().item() == 40 - P - 1 and starts[:, 0].min().item() == 0


def test_labelled_sampler_epoch_semantics() -> None:
    vols = _volumes()
    bank = VolumeBank(vols, P)
    s = labelled_sampler(bank, batch_size=4, seed=5)
    assert len(s) == (5 * 6) // 4
    batches = list(s)
    assert len(batches) == 7
    b0 = batches[0]
    assert set(b0) == {"image", "label", "task", "domain", "index", "start"}
    assert b0["image"].shape == (4, 1, P, P, P) and b0["label"].dtype == torch.int64
    assert b0["task"].dtype == torch.int64 and torch.equal(b0["domain"], b0["task"] - 1)
    expected_tasks = torch.tensor([v.task_id for v in vols])
    counts = Counter()
    for b in batches:
        assert torch.equal(b["task"], expected_tasks[b["index"]])
        counts.update(b["index"].tolist())
    assert sum(counts.values()) == 28 and max(counts.values()) <= 5
    # full epoch without drop: every case exactly 5 times
    full = labelled_sampler(bank, batch_size=5, seed=5)
    c2 = Counter(i for b in full for i in b["index"].tolist())
    assert c2 == Counter({i: 5 for i in range(6)})
    # deterministic per (seed, epoch), different across epochs
    again = list(labelled_sampler(bank, batch_size=4, seed=5))
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(batches, again))
    s.set_epoch(1)
    other = list(s)
    assert not all(torch.equal(a["index"], b["index"]) and torch.equal(a["start"], b["start"])
                   for a, b in zip(batches, other))


def test_unlabelled_sampler_centre_crops() -> None:
    vols = _volumes()
    bank = VolumeBank(vols, P, with_labels=False)
    with pytest.raises(ValueError):
        unlabelled_sampler(bank, 2, with_label=True)
    s = unlabelled_sampler(bank, batch_size=2, seed=0)
    assert len(s) == 3
    seen = []
    for b in s:
        assert "label" not in b
        for k, i in enumerate(b["index"].tolist()):
            img = _ref_pad(vols[i].image, P)
            st = [centre_start(img.shape[a], P) for a in range(3)]
            sl = tuple(slice(st[a], st[a] + P) for a in range(3))
            np.testing.assert_array_equal(b["image"][k, 0].numpy(), img[sl])
            assert b["start"][k].tolist() == st
            seen.append(i)
    assert sorted(seen) == list(range(6))


def test_ranks_share_the_epoch() -> None:
    bank = VolumeBank(_volumes(), P)
    orders = [labelled_sampler(bank, 3, seed=1, rank=r, world_size=2).epoch_order() for r in (0, 1)]
    assert len(orders[0]) == len(orders[1]) == 15
    merged = Counter(orders[0].tolist()) + Counter(orders[1].tolist())
    assert merged == Counter({i: 5 for i in range(6)})


def test_bank_from_synthetic_volumes() -> None:
    vols = generate_synthetic_volumes(n_per_task=1, seed=0, size_range=(20, 24))
    bank = VolumeBank(vols, 24)  # some axes <= 24 -> padding
    batch = next(iter(labelled_sampler(bank, batch_size=4, seed=0)))
    assert batch["image"].shape == (4, 1, 24, 24, 24)
    assert sorted(bank.task_ids.tolist()) == [1, 2, 3, 4]
    assert set(torch.unique(batch["label"]).tolist()) <= {0, 1}
