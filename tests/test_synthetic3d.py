"""Synthetic partially-labelled 3D data for the four VerSemi tasks."""

from __future__ import annotations

import numpy as np

from medsemi.data.synthetic.volumes3d import (
    generate_synthetic_volumes,
    make_synthetic_volume,
    write_synthetic_dataset,
)
from medsemi.data.volumes.cases import read_case, task_id_from_name
from medsemi.data.volumes.lists import load_versemi_split


def test_deterministic_sizes_names_and_labels() -> None:
    a = generate_synthetic_volumes(n_per_task=2, seed=7)
    b = generate_synthetic_volumes(n_per_task=2, seed=7)
    c = generate_synthetic_volumes(n_per_task=2, seed=8)
    assert [v.name for v in a] == [v.name for v in b]
    assert all(np.array_equal(x.image, y.image) and np.array_equal(x.label, y.label) for x, y in zip(a, b))
    assert any(x.shape != y.shape for x, y in zip(a, c))
    assert [v.task_id for v in a] == [1, 1, 2, 2, 3, 3, 4, 4]
    for v in a:
        assert task_id_from_name(v.name) == v.task_id
        assert all(32 <= s <= 48 for s in v.shape)
        assert v.label.dtype == np.uint8 and set(np.unique(v.label).tolist()) == {0, 1}
        # the target sits near the centre (the real volumes are ROI crops)
        centre = np.array(v.shape) / 2
        com = np.argwhere(v.label).mean(0)
        assert np.all(np.abs(com - centre) < 0.2 * np.array(v.shape))


def test_intensity_scales_and_shapes_differ_per_task() -> None:
    vols = generate_synthetic_volumes(n_per_task=3, seed=0)
    frac = {t: np.mean([v.label.mean() for v in vols if v.task_id == t]) for t in (1, 2, 3, 4)}
    assert frac[2] > frac[3] > frac[4] and frac[2] > frac[1] > frac[4]  # LA large, tumour small
    for v in vols:
        if v.task_id == 2:  # z-scored MRI
            assert abs(v.image.mean()) < 1e-3 and abs(v.image.std() - 1) < 1e-3
        else:  # clipped + normalised CT
            assert v.image.min() >= 0 and v.image.max() <= 1
        fg, bg = v.image[v.label == 1].mean(), v.image[v.label == 0].mean()
        assert fg > bg  # the target is visible


def test_partial_labels_other_structures_unlabelled() -> None:
    rng = np.random.default_rng(0)
    for task in (1, 2, 3, 4):
        img, lab, present, others = make_synthetic_volume(task, (40, 40, 40), rng, other_prob=1.0)
        assert present[0] == task and len(present) >= 3
        assert set(np.unique(others).tolist()) - {0} == set(present[1:])
        assert not np.any(lab.astype(bool) & (others > 0))  # other tasks' structures carry no label
        bg = (lab == 0) & (others == 0)
        for t in present[1:]:
            assert abs(img[others == t].mean() - img[bg].mean()) > 0.05  # present and visible
    img, lab, present, others = make_synthetic_volume(3, (32, 32, 32), rng, other_prob=0.0)
    assert present == [3] and not others.any()


def test_write_dataset_layout_and_lists(tmp_path) -> None:
    paths = write_synthetic_dataset(tmp_path, n_per_task=4, seed=1, size_range=(32, 34))
    assert len(paths) == 16
    v = read_case(paths[0])
    assert v.image.shape == v.label.shape and v.task_id == 1
    s = load_versemi_split(20, list_dir=tmp_path / "lists")
    s10 = load_versemi_split(10, list_dir=tmp_path / "lists")
    assert {t: len(x) for t, x in s.test.items()} == {1: 1, 2: 1, 3: 1, 4: 1}
    assert {t: len(x) for t, x in s.labelled_by_task.items()} == {1: 2, 2: 2, 3: 2, 4: 2}
    assert set(s10.labelled) < set(s.labelled) and set(s10.train_pool) == set(s.train_pool)
    assert sorted(s.train_pool + s.all_test) == sorted(p.stem for p in paths)
