"""UA-MT's RandomRotFlip on 3D crops (data/volumes/augment3d.py): per-sample reference, coverage, resume."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_sampling3d import P, _volumes

from medsemi.config import ConfigError, load_config
from medsemi.data.volumes.augment3d import rot_flip
from medsemi.data.volumes.crop_source import CropSource
from medsemi.data.volumes.sampling import VolumeBank, labelled_sampler, unlabelled_sampler


def _reference(image: np.ndarray, label: np.ndarray, k: int, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """la_heart.py's RandomRotFlip on one (X, Y, Z) array pair with the given draws."""
    image, label = np.rot90(image, k), np.rot90(label, k)
    return np.flip(image, axis=axis).copy(), np.flip(label, axis=axis).copy()


def test_rot_flip_matches_the_per_sample_numpy_transform() -> None:
    torch.manual_seed(0)
    image = torch.randn(32, 1, 6, 6, 4)
    label = torch.randint(0, 3, (32, 6, 6, 4))
    out_img, out_lab = rot_flip(image, label, torch.Generator().manual_seed(5))
    draws = torch.Generator().manual_seed(5)
    ks = torch.randint(4, (32,), generator=draws)
    axes = torch.randint(2, (32,), generator=draws)
    seen = set()
    for b in range(32):
        k, axis = int(ks[b]), int(axes[b])
        seen.add((k, axis))
        ref_img, ref_lab = _reference(image[b, 0].numpy(), label[b].numpy(), k, axis)
        np.testing.assert_array_equal(out_img[b, 0].numpy(), ref_img)
        np.testing.assert_array_equal(out_lab[b].numpy(), ref_lab)
    assert len(seen) >= 6  # the draws cover (nearly) all 8 combinations
    unlabelled, none = rot_flip(image, None, torch.Generator().manual_seed(5))
    assert none is None and torch.equal(unlabelled, out_img)
    with pytest.raises(ValueError, match="X == Y"):
        rot_flip(torch.zeros(2, 1, 4, 6, 4), None, torch.Generator())


def test_crop_source_augments_and_resumes_exactly() -> None:
    bank = VolumeBank(_volumes(), P)
    plain = CropSource(labelled_sampler(bank, 2, seed=1))
    augmented = CropSource(labelled_sampler(bank, 2, seed=1), augment="rot_flip")
    a, b = plain.next(), augmented.next()
    assert torch.equal(a["start"], b["start"]) and not torch.equal(a["image"], b["image"])
    for _ in range(3):
        augmented.next()
    state = augmented.state_dict()
    expected = [augmented.next() for _ in range(4)]
    resumed = CropSource(labelled_sampler(bank, 2, seed=1), augment="rot_flip")
    resumed.load_state_dict(state)
    for want, got in zip(expected, (resumed.next() for _ in range(4))):
        assert torch.equal(want["image"], got["image"]) and torch.equal(want["label"], got["label"])
    # centre crops get a generator of their own for the augmentation (the lineage augments every crop)
    centre = CropSource(unlabelled_sampler(bank, 2, seed=1), augment="rot_flip")
    assert centre.generator is not None and centre.next()["image"].shape == (2, 1, P, P, P)
    with pytest.raises(ValueError, match="augment"):
        CropSource(labelled_sampler(bank, 2, seed=1), augment="elastic")


def test_augment_option_is_checked_and_used_by_the_family(tmp_path) -> None:
    from medsemi.families.select import build_family

    base = ["data.format=synthetic3d", "data.patch_size=32", "data.options.synthetic.n_per_task=2",
            "data.options.synthetic.size_min=32", "data.options.synthetic.size_max=36", "train.device=cpu"]
    cfg = load_config(None, [*base, "data.options.augment=rot_flip"])
    labelled, _ = build_family(cfg).make_sources(cfg, torch.device("cpu"), 0, uses_unlabelled=False)
    assert labelled.augment == "rot_flip"
    with pytest.raises(ConfigError, match="data.options.augment must be one of none, rot_flip"):
        build_family(load_config(None, [*base, "data.options.augment=mirror"]))
