"""A seeded synthetic stand-in for the four VerSemi datasets (spec versemi.md 1.2, 1.5, N21).

Four tasks with different "organ" shapes, intensity scales and textures, like the real data:

- 1 pancreas-like: a thin curved tube; CT-like [0, 1] intensities (as after HU clip + min-max), fine noise;
- 2 left-atrium-like: a large bumpy blob; z-scored intensities (mean 0, std 1), smooth bias texture;
- 3 spleen-like: a crescent (ellipsoid minus a shifted ellipsoid); [0, 1], medium noise;
- 4 lung-tumour-like: a small bright sphere inside a dark "lung" region; [0, 1], speckle.

Each volume is labelled **only for its own task** (label 1), placed near the centre (the real volumes
are ROI crops). With probability ``other_prob`` per other task, that task's structure is also painted
into the image, off-centre, and left unlabelled: the partial-label situation of the real datasets.
Case names follow the release naming so the task-id rule of spec 1.2 applies (``data0001``, 20-char
upper-case LA ids, ``spleen_01``, ``lung_001``).
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medsemi.data.volumes.cases import TASK_NAMES, Volume, task_id_from_name, write_case


@dataclass(frozen=True)
class Synthetic3DConfig:
    """How many volumes per task, their size range (per axis, inclusive) and the seed."""

    n_per_task: int = 6
    size_range: tuple[int, int] = (32, 48)
    other_prob: float = 0.5
    seed: int = 0


def _grid(shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return np.meshgrid(*(np.arange(n, dtype=np.float32) for n in shape), indexing="ij", sparse=True)


def _shape_mask(
    task: int, shape: tuple[int, int, int], centre: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """Boolean mask of one task's structure centred at ``centre`` (voxel coordinates)."""
    x, y, z = _grid(shape)
    dx, dy, dz = x - centre[0], y - centre[1], z - centre[2]
    m = min(shape)
    if task == 1:  # curved thin tube along x
        half_len = rng.uniform(0.25, 0.35) * shape[0]
        amp, freq = rng.uniform(1.5, 3.0), rng.uniform(0.08, 0.15)
        r = rng.uniform(2.2, 3.2)
        cy = amp * np.sin(freq * dx)
        return (np.abs(dx) <= half_len) & ((dy - cy) ** 2 + dz**2 <= r**2)
    if task == 2:  # large bumpy blob
        base = rng.uniform(0.2, 0.26) * m
        rr = np.sqrt(dx**2 + dy**2 + dz**2) + 1e-6
        bump = 1 + 0.15 * np.sin(3 * dx / rr + rng.uniform(0, 6)) * np.cos(2 * dz / rr + rng.uniform(0, 6))
        return rr <= base * bump
    if task == 3:  # crescent
        a = np.array([rng.uniform(0.18, 0.24) * m, rng.uniform(0.12, 0.16) * m, rng.uniform(0.14, 0.18) * m])
        outer = (dx / a[0]) ** 2 + (dy / a[1]) ** 2 + (dz / a[2]) ** 2 <= 1
        inner = ((dx / a[0]) ** 2 + ((dy - 0.6 * a[1]) / (0.8 * a[1])) ** 2 + (dz / a[2]) ** 2) <= 1
        return outer & ~inner
    if task == 4:  # small sphere
        r = rng.uniform(3.0, 4.5)
        return dx**2 + dy**2 + dz**2 <= r**2
    raise ValueError(f"unknown task {task}")


def _smooth_noise(shape: tuple[int, int, int], sigma: float, rng: np.random.Generator) -> np.ndarray:
    from scipy import ndimage

    n = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma)
    return n / (n.std() + 1e-6)


def make_synthetic_volume(task: int, shape: tuple[int, int, int], rng: np.random.Generator,
                          other_prob: float = 0.5) -> tuple[np.ndarray, np.ndarray, list[int], np.ndarray]:
    """One volume of ``task``: image float32, label uint8 {0,1} of its own task only, the tasks present,
    and a uint8 map of the unlabelled other-task structures (value = their task id, 0 elsewhere)."""
    size = np.asarray(shape, dtype=np.float32)
    centre = size / 2 + rng.uniform(-2, 2, size=3)
    own = _shape_mask(task, shape, centre, rng)
    others: list[tuple[int, np.ndarray]] = []
    for t in TASK_NAMES:
        if t != task and rng.random() < other_prob:
            direction = rng.standard_normal(3)
            direction /= np.linalg.norm(direction) + 1e-6
            c = centre + direction * 0.3 * size
            others.append((t, _shape_mask(t, shape, c, rng) & ~own))
    present = [task] + [t for t, mk in others if mk.any()]

    if task == 2:  # MRI-like: smooth texture, organ brighter, then z-score
        img = 0.6 * _smooth_noise(shape, 3.0, rng) + 0.2 * rng.standard_normal(shape).astype(np.float32)
        for _, mk in others:
            img = img + 0.8 * mk
        img = img + 1.8 * own
        img = (img - img.mean()) / (img.std() + 1e-6)
    else:  # CT-like in [0, 1]
        style = {1: (0.35, 0.55, 0.04, 1.0), 3: (0.30, 0.62, 0.06, 1.5), 4: (0.40, 0.55, 0.05, 0.0)}[task]
        bg, fg, noise, smooth = style
        img = np.full(shape, bg, dtype=np.float32)
        if task == 4:  # dark lung region around the tumour
            x, y, z = _grid(shape)
            d2 = (x - centre[0]) ** 2 + (y - centre[1]) ** 2 + (z - centre[2]) ** 2
            lung = d2 <= (0.35 * min(shape)) ** 2
            img[lung] = 0.06
            speckle = rng.gamma(4.0, 0.25, size=shape).astype(np.float32)
            img = img * speckle
        for _, mk in others:
            img[mk] = 0.5 * (bg + fg)
        img[own] = fg
        if smooth > 0:
            img = img + 0.05 * _smooth_noise(shape, smooth, rng)
        img = np.clip(img + noise * rng.standard_normal(shape).astype(np.float32), 0.0, 1.0)
    other_map = np.zeros(shape, dtype=np.uint8)
    for t, mk in others:
        other_map[mk] = t
    return img.astype(np.float32), own.astype(np.uint8), present, other_map


def synthetic_case_name(task: int, index: int, rng: np.random.Generator) -> str:
    """Release-style names: ``data%04d``, 20-char upper-case id, ``spleen_%02d``, ``lung_%03d``."""
    if task == 1:
        return f"data{index + 1:04d}"
    if task == 2:
        alphabet = np.array(list(string.ascii_uppercase + string.digits))
        return "".join(rng.choice(alphabet[:26], 1)) + "".join(rng.choice(alphabet, 19))
    if task == 3:
        return f"spleen_{index + 1:02d}"
    return f"lung_{index + 1:03d}"


def generate_synthetic_volumes(config: Synthetic3DConfig | None = None, **overrides: object) -> list[Volume]:
    """``n_per_task`` volumes for each of the 4 tasks (task-major order), deterministic in ``seed``."""
    cfg = config or Synthetic3DConfig()
    if overrides:
        cfg = Synthetic3DConfig(**{**cfg.__dict__, **overrides})  # type: ignore[arg-type]
    lo, hi = cfg.size_range
    vols: list[Volume] = []
    for task in TASK_NAMES:
        rng = np.random.default_rng([cfg.seed, task])
        for i in range(cfg.n_per_task):
            shape = tuple(int(s) for s in rng.integers(lo, hi + 1, size=3))
            name = synthetic_case_name(task, i, rng)
            img, lab, present, _ = make_synthetic_volume(task, shape, rng, cfg.other_prob)  # type: ignore[arg-type]
            assert task_id_from_name(name) == task
            vols.append(Volume(name, img, lab, task, (1.0, 1.0, 1.0), {"present_tasks": present}))
    return vols


def synthetic_lists(volumes: list[Volume], test_fraction: float = 0.25) -> dict[str, list[str]]:
    """Release-style lists for synthetic volumes: per task the last ``test_fraction`` are test cases; of
    the rest, 10 % / 20 % (at least 1 / 2) are labelled, nested; the others unlabelled."""
    by_task: dict[int, list[str]] = {t: [v.name for v in volumes if v.task_id == t] for t in TASK_NAMES}
    out: dict[str, list[str]] = {k: [] for k in
                                 ("train_lab_10", "train_unlab_10", "train_lab_20", "train_unlab_20")}
    test_files = {1: "test", 2: "test_la", 3: "test_spleen", 4: "test_lung"}
    for t, names in by_task.items():
        n_test = max(1, int(round(test_fraction * len(names))))
        train, test = names[: len(names) - n_test], names[len(names) - n_test:]
        out[test_files[t]] = test
        for ratio, minimum in ((10, 1), (20, 2)):
            k = min(len(train), max(minimum, int(round(ratio / 100 * len(train)))))
            out[f"train_lab_{ratio}"] += train[:k]
            out[f"train_unlab_{ratio}"] += train[k:]
    return out


def write_synthetic_dataset(out_dir: str | Path, config: Synthetic3DConfig | None = None,
                            *, test_fraction: float = 0.25, **overrides: object) -> list[Path]:
    """Write the volumes as ``<out_dir>/<name>.h5`` (the layout of spec 1.4) and release-style lists in
    ``<out_dir>/lists/`` (usable as ``load_versemi_split(ratio, list_dir=out_dir / "lists")``)."""
    out = Path(out_dir)
    vols = generate_synthetic_volumes(config, **overrides)
    paths = [
        write_case(out / f"{v.name}.h5", v.image, v.label, spacing=v.spacing,  # type: ignore[arg-type]
                   attrs={"task_id": v.task_id, "present_tasks": np.asarray(v.attrs["present_tasks"])},
                   compression=None)
        for v in vols
    ]
    lists = out / "lists"
    lists.mkdir(parents=True, exist_ok=True)
    for name, cases in synthetic_lists(vols, test_fraction).items():
        (lists / f"{name}.txt").write_text("\n".join(cases) + "\n")
    return paths
