"""The 3D volume family (spec versemi.md 1.2-1.8, 4): VerSemi splits, crop sources, per-task evaluation.

``build_volume_family(cfg)`` serves two ``data.format`` values:

- ``versemi``: the release layout (spec 1.4), one ``<data.root>/<name>.h5`` per case; the lists
  ``train_lab_<ratio>``/``train_unlab_<ratio>`` and the four test lists come from the package
  (the released ``datalist/``) or from ``data.list_dir``; ``data.options.ratio`` is 10 or 20.
- ``synthetic3d``: the embedded four-task stand-in (:mod:`medsemi.data.synthetic.volumes3d`), generated in
  memory, or written once into ``data.root`` (a cache folder) and read back like real data.

The returned :class:`VolumeFamily` is a dataset family (:mod:`medsemi.families.base`): its batch sources
are device-side crop samplers (spec 1.6, exact resume; :mod:`medsemi.data.volumes.crop_source`) and its
evaluation is per-task sliding-window inference (spec 4.1-4.4) scored with the VerSemi metric rules of 4.3
(:mod:`medsemi.evaluation.volumes`).

``data.options`` keys (all optional):

================  ==========  ==============================================================
key               default     meaning
================  ==========  ==============================================================
ratio             20          labelled percentage: 10 or 20 with the shipped lists (the original
                              hard-codes 20); any other with ``data.list_dir`` lists of that ratio
allow_duplicates  false       accept lists that repeat case names (the first public lists balanced the
                              tasks by duplication, spec 1.3); refused otherwise
repeats           5           labelled dataset length = repeats x cases (spec 1.6)
strides           [16,16,4]   sliding-window strides per axis (spec 4.2); window = patch size
lcc               false       largest connected component after prediction (spec 4.4)
selection         pancreas    model-selection score: ``pancreas`` = pancreas test Dice (spec 4.5,
                              the original), ``mean`` = macro mean Dice over the four tasks
metric_policy     versemi     ``versemi`` (empty prediction -> 0,0,0,0; spec 4.3) or ``config``
                              (the ``eval`` section's rules)
sw_batch_size     4           windows per forward during evaluation
bank_device       train       where training volumes live: ``train`` (the training device) or ``cpu``
image_dtype       float32     storage dtype of the volume bank (float16/bfloat16 halve memory)
synthetic         {}          synthetic3d only: n_per_task (6), size_min (32), size_max (48),
                              other_prob (0.5), seed (0), test_fraction (0.25)
unlabelled_crop   centre      crops of the unlabelled stream: ``centre`` (VerSemi, spec 1.6) or
                              ``random`` (UA-MT / SSL4MIS / BCP: random crops for every scan)
augment           none        ``none`` (VerSemi: crops only, spec 1.6) or ``rot_flip`` (UA-MT's
                              RandomRotFlip on every labelled and unlabelled crop; data/volumes/augment3d.py)
task              ""          one task name (pancreas, la, spleen, lung): keep only that task's
                              labelled, unlabelled and test cases (the single-task methods
                              ``*3d`` need it); model selection is then that task's Dice
================  ==========  ==============================================================

The crop size is ``data.patch_size`` (96 in the paper). The training batch size is
``train.batch_size`` labelled + ``train.unlabelled_batch_size`` unlabelled (both 8 in the paper).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medsemi.config import Config, ConfigError
from medsemi.data.contract import DatasetInfo, LabelSpec
from medsemi.data.synthetic.volumes3d import (
    Synthetic3DConfig,
    generate_synthetic_volumes,
    synthetic_lists,
    write_synthetic_dataset,
)
from medsemi.data.tools.check3d import check_volumes
from medsemi.data.tools.prepare3d import RECIPES, Recipe
from medsemi.data.volumes.augment3d import AUGMENTS
from medsemi.data.volumes.cases import TASK_IDS, TASK_NAMES, Volume, read_cases, task_id_from_name
from medsemi.data.volumes.crop_source import CropSource, LazyCropSource
from medsemi.data.volumes.lists import TEST_LISTS, VerSemiSplit, load_versemi_split
from medsemi.data.volumes.sampling import CropSampler, VolumeBank
from medsemi.evaluation.report import OverlayCase, overlay_page
from medsemi.evaluation.volumes import CLASS_NAME, evaluate_volume_network
from medsemi.families.base import DataError, eval_policy
from medsemi.methods.registry import get_method
from medsemi.metrics import MetricPolicy

LABEL_SPEC = LabelSpec("exclusive", ("background", "foreground"))
VOLUME_FORMATS = ("versemi", "synthetic3d")
DEFAULT_STRIDES = (16, 16, 4)
_OPTION_KEYS = {
    "ratio", "repeats", "strides", "lcc", "selection", "metric_policy", "sw_batch_size", "bank_device",
    "image_dtype", "synthetic", "allow_duplicates", "task", "unlabelled_crop", "augment",
}
_SYNTHETIC_KEYS = {"n_per_task", "size_min", "size_max", "other_prob", "seed", "test_fraction"}
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# --------------------------------------------------------------------------- the family
@dataclass
class VolumeFamily:
    """A VerSemi-style multi-task volume dataset as the engine sees it (see the module docstring)."""

    info: DatasetInfo
    split: VerSemiSplit
    labelled_volumes: list[Volume]
    unlabelled_volumes: list[Volume]
    test_volumes: dict[int, list[Volume]]
    options: dict[str, Any]
    source: str
    # per evaluated network (id): one slice of each test case from its latest evaluation, for write_overlays
    _overlay_slices: dict[int, list[tuple[str, OverlayCase]]] = field(default_factory=dict, repr=False)

    def make_sources(
        self, cfg: Config, device: torch.device, seed: int, uses_unlabelled: bool, rank: int = 0, world_size: int = 1
    ) -> tuple[CropSource, CropSource | None]:
        """Labelled random-crop stream (x repeats, shuffled, drop_last) and the unlabelled centre-crop
        stream (spec 1.6; random crops with ``unlabelled_crop: random``); the latter only when the method
        (and its options) use unlabelled data.
        Every rank uses the same epoch order (from ``cfg.seed``) and takes a strided share of it."""
        bank_dev = device if self.options["bank_device"] == "train" else torch.device("cpu")
        dtype = _DTYPES[self.options["image_dtype"]]
        patch = self.info.patch_size
        base_seed = cfg.seed
        lab_bank = VolumeBank(self.labelled_volumes, patch, device=bank_dev, image_dtype=dtype)
        labelled = CropSource(CropSampler(
            lab_bank, cfg.train.batch_size, mode="random", repeats=int(self.options["repeats"]),
            seed=base_seed + 2, rank=rank, world_size=world_size,
        ), augment=self.options["augment"])
        needs = uses_unlabelled and bool(getattr(cfg.method, "needs_unlabelled", True))
        if not needs:
            return labelled, None
        if not self.unlabelled_volumes:
            raise ConfigError(
                f"{self.source}: the method uses unlabelled data but the unlabelled list is empty"
            )
        if len(self.unlabelled_volumes) < cfg.train.unlabelled_batch_size * world_size:  # checked now, built later
            raise ConfigError(
                f"{self.source}: {len(self.unlabelled_volumes)} unlabelled cases cannot fill one batch of "
                f"train.unlabelled_batch_size={cfg.train.unlabelled_batch_size} per rank; lower it or add cases"
            )

        def build_unlabelled() -> CropSource:
            unl_bank = VolumeBank(self.unlabelled_volumes, patch, device=bank_dev, with_labels=False,
                                  image_dtype=dtype)
            return CropSource(CropSampler(
                unl_bank, cfg.train.unlabelled_batch_size, mode=self.options["unlabelled_crop"], repeats=1,
                with_label=False, seed=base_seed + 3, rank=rank, world_size=world_size,
            ), augment=self.options["augment"])

        return labelled, LazyCropSource(build_unlabelled)

    def evaluate(
        self, networks: dict[str, nn.Module], cfg: Config, device: torch.device, surface: bool = False,
        amp: str = "off", validation: bool = True,
    ) -> dict[str, dict[str, dict]]:
        """Per-task sliding-window evaluation of every network on the test lists (spec 4.1-4.5;
        :mod:`medsemi.evaluation.volumes`). There is no validation split."""
        policy = self.metric_policy(cfg)
        results = {}
        for role, net in networks.items():
            slices: list[tuple[str, OverlayCase]] = []
            results[role] = evaluate_volume_network(net, self.test_volumes, cfg, self.options, policy, device,
                                                    surface, amp, self.source, overlays=slices)
            self._overlay_slices[id(net)] = slices  # the latest evaluation's, for write_overlays
        return {"test": results}

    def write_overlays(self, model: nn.Module, cfg: Config, device: torch.device, out_dir: Path) -> list[Path]:
        """``out_dir/<task>.png``: for each task the first and the worst test cases, each shown on the
        slice (last axis) with the most ground truth, from the model's latest evaluation (run now when
        there is none)."""
        slices = self._overlay_slices.get(id(model))
        if slices is None:
            self.evaluate({"model": model}, cfg, device)
            slices = self._overlay_slices[id(model)]
        written = []
        for task in dict.fromkeys(t for t, _ in slices):
            cases = [c for t, c in slices if t == task]
            path = overlay_page(cases, cfg.eval.overlays, (CLASS_NAME,), task, out_dir / f"{task}.png")
            if path is not None:
                written.append(path)
        return written

    def metric_policy(self, cfg: Config) -> MetricPolicy:
        """VerSemi's empty-prediction rule (spec 4.3) or the ``eval`` section's rules."""
        if self.options["metric_policy"] == "versemi":
            return MetricPolicy.versemi()
        return eval_policy(cfg)

    def summary(self) -> dict[str, Any]:
        out = dict(self.split.summary())
        out.update({"format": self.info.name, "source": self.source, "lists": self.split.source,
                    "patch_size": list(self.info.patch_size), "repeats": self.options["repeats"]})
        return out


# --------------------------------------------------------------------------- builder
def _options(cfg: Config) -> dict[str, Any]:
    raw = dict(cfg.data.options or {})
    unknown = sorted(set(raw) - _OPTION_KEYS)
    if unknown:
        raise ConfigError(f"unknown data.options key(s) {unknown} for data.format={cfg.data.format}; "
                          f"valid: {sorted(_OPTION_KEYS)}")
    opts: dict[str, Any] = {
        "ratio": 20, "repeats": 5, "strides": list(DEFAULT_STRIDES), "lcc": False, "selection": "pancreas",
        "metric_policy": "versemi", "sw_batch_size": 4, "bank_device": "train", "image_dtype": "float32",
        "synthetic": {}, "allow_duplicates": False, "task": "", "unlabelled_crop": "centre", "augment": "none",
    }
    opts.update(raw)
    task = str(opts["task"] or "")
    if task and task not in TASK_NAMES.values():
        raise ConfigError(f"data.options.task={task!r} is not a task of data.format={cfg.data.format}; "
                          f"choose one of {', '.join(TASK_NAMES.values())}")
    opts["task"] = task
    own_lists = cfg.data.format == "versemi" and bool(cfg.data.list_dir)
    if not isinstance(opts["ratio"], int) or isinstance(opts["ratio"], bool) or not 0 < opts["ratio"] < 100:
        raise ConfigError(f"data.options.ratio must be a percentage 1..99, got {opts['ratio']!r}")
    if opts["ratio"] not in (10, 20) and not own_lists:
        raise ConfigError(f"data.options.ratio={opts['ratio']}: the shipped lists have 10 and 20; other ratios "
                          f"need data.list_dir with train_lab_{opts['ratio']}.txt and train_unlab_{opts['ratio']}.txt")
    if not isinstance(opts["allow_duplicates"], bool):
        raise ConfigError(f"data.options.allow_duplicates must be true or false, got {opts['allow_duplicates']!r}")
    strides = opts["strides"]
    if not isinstance(strides, (list, tuple)) or len(strides) != 3 or any(int(s) < 1 for s in strides):
        raise ConfigError(f"data.options.strides must be 3 positive integers, got {strides!r}")
    opts["strides"] = [int(s) for s in strides]
    if opts["selection"] not in ("mean", *TASK_NAMES.values()):
        raise ConfigError(f"data.options.selection must be 'mean' or a task name "
                          f"{list(TASK_NAMES.values())}, got {opts['selection']!r}")
    if task:
        opts["selection"] = task  # one task: model selection on its Dice, whatever the config selects
    if opts["metric_policy"] not in ("versemi", "config"):
        raise ConfigError(
            f"data.options.metric_policy must be versemi or config, got {opts['metric_policy']!r}"
        )
    if opts["unlabelled_crop"] not in ("centre", "random"):
        raise ConfigError(f"data.options.unlabelled_crop must be centre or random, got {opts['unlabelled_crop']!r}")
    if opts["augment"] not in AUGMENTS:
        raise ConfigError(f"data.options.augment must be one of {', '.join(AUGMENTS)}, got {opts['augment']!r}")
    if opts["bank_device"] not in ("train", "cpu"):
        raise ConfigError(f"data.options.bank_device must be train or cpu, got {opts['bank_device']!r}")
    if opts["image_dtype"] not in _DTYPES:
        raise ConfigError(
            f"data.options.image_dtype must be one of {list(_DTYPES)}, got {opts['image_dtype']!r}"
        )
    if int(opts["repeats"]) < 1:
        raise ConfigError(f"data.options.repeats must be >= 1, got {opts['repeats']!r}")
    bad = sorted(set(opts["synthetic"] or {}) - _SYNTHETIC_KEYS)
    if bad:
        raise ConfigError(f"unknown data.options.synthetic key(s) {bad}; valid: {sorted(_SYNTHETIC_KEYS)}")
    p = int(cfg.data.patch_size)
    if p % 16 or p < 32:
        raise ConfigError(f"data.patch_size must be a multiple of 16 and >= 32 for the VNet, got {p}")
    return opts


def _synthetic_config(opts: dict[str, Any]) -> tuple[Any, float]:
    s = dict(opts["synthetic"] or {})
    syn = Synthetic3DConfig(
        n_per_task=int(s.get("n_per_task", 6)),
        size_range=(int(s.get("size_min", 32)), int(s.get("size_max", 48))),
        other_prob=float(s.get("other_prob", 0.5)),
        seed=int(s.get("seed", 0)),
    )
    return syn, float(s.get("test_fraction", 0.25))


def _split_from_lists(lists: dict[str, list[str]], ratio: int, source: str) -> VerSemiSplit:
    test = {t: tuple(lists[Path(f).stem]) for t, f in TEST_LISTS.items()}
    lab, unl = tuple(lists[f"train_lab_{ratio}"]), tuple(lists[f"train_unlab_{ratio}"])
    split = VerSemiSplit(ratio, lab, unl, test, source)
    problems = split.validate()
    if problems:
        raise ValueError("invalid VerSemi split:\n  " + "\n  ".join(problems))
    return split


def build_volume_family(cfg: Config) -> VolumeFamily:
    """Splits for ``data.format`` ``versemi`` (HDF5 folder) or ``synthetic3d`` (embedded data)."""
    data = cfg.data
    opts = _options(cfg)
    ratio = opts["ratio"]
    if data.format == "synthetic3d":
        syn, test_fraction = _synthetic_config(opts)
        if data.root:  # cache folder: write once, then read back like real data
            root = Path(data.root)
            if not (root / "lists" / f"train_lab_{ratio}.txt").is_file():
                write_synthetic_dataset(root, syn, test_fraction=test_fraction)
            split = load_versemi_split(ratio, root / "lists")
            volumes = None
            source = str(root)
        else:
            vols = generate_synthetic_volumes(syn)
            split = _split_from_lists(synthetic_lists(vols, test_fraction), ratio, "synthetic3d (in memory)")
            volumes = {v.name: v for v in vols}
            source = "synthetic3d (in memory)"
        if opts["task"]:
            split = _one_task(split, TASK_IDS[opts["task"]])
        name = "synthetic3d"
    elif data.format == "versemi":
        if not data.root:
            raise ConfigError("data.format=versemi needs data.root (the folder of <name>.h5 files)")
        root = Path(data.root)
        if not root.is_dir():
            raise ConfigError(f"data.root={root}: folder not found")
        split = load_versemi_split(ratio, data.list_dir or None, allow_duplicates=opts["allow_duplicates"])
        if opts["task"]:  # check only the chosen task's cases
            split = _one_task(split, TASK_IDS[opts["task"]])
        if data.check:
            _check_folder(root, split)
        volumes = None
        source = str(root)
        name = "versemi"
    else:
        raise ConfigError(
            f"build_volume_family: data.format must be versemi or synthetic3d, got {data.format!r}"
        )

    def load(names: tuple[str, ...], with_label: bool = True) -> list[Volume]:
        if volumes is not None:
            return [volumes[n] for n in names]
        unique = list(dict.fromkeys(names))  # a duplicated name (allow_duplicates) is read once
        read = dict(zip(unique, read_cases(source, unique, with_label=with_label)))
        return [read[n] for n in names]

    labelled = load(split.labelled)
    needs_unl = bool(getattr(cfg.method, "needs_unlabelled", True))
    needs_unl = needs_unl and get_method(cfg.method.name).uses_unlabelled
    unlabelled = load(split.unlabelled, with_label=False) if needs_unl else []
    test = {t: load(names) for t, names in split.test.items() if names}
    info = volume_info(name, int(data.patch_size), opts["strides"], bool(opts["lcc"]), task=opts["task"])
    return VolumeFamily(info, split, labelled, unlabelled, test, opts, source)


def volume_info(
    name: str, patch_size: int, strides: list[int] | tuple[int, ...] = DEFAULT_STRIDES, lcc: bool = False,
    in_channels: int = 1, task: str = "",
) -> DatasetInfo:
    """What a model trained on the volume family records about its data (``name``: versemi | synthetic3d;
    ``task``: the one task of a single-task run, else all); also used for imported checkpoints, which have
    no data."""
    p = int(patch_size)
    domains = (task,) if task else tuple(TASK_NAMES.values())
    return DatasetInfo(
        name=name, in_channels=in_channels, label_spec=LABEL_SPEC, domains=domains,
        patch_size=(p, p, p),
        extra={
            "tasks": {str(k): v for k, v in TASK_NAMES.items()},
            "task": task,
            "synthetic_task": 5,
            "strides": [int(s) for s in strides],
            "lcc": bool(lcc),
            "preprocessing": _preprocessing_extra(name),
        },
    )


def _one_task(split: VerSemiSplit, task_id: int) -> VerSemiSplit:
    """The split restricted to one task's labelled, unlabelled and test cases (an error when it has none
    labelled or none to test)."""
    def keep(names: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(n for n in names if task_id_from_name(n) == task_id)

    out = VerSemiSplit(split.ratio, keep(split.labelled), keep(split.unlabelled),
                       {task_id: split.test.get(task_id, ())}, f"{split.source}, task {TASK_NAMES[task_id]}")
    if not out.labelled or not out.test[task_id]:
        raise ConfigError(f"data.options.task={TASK_NAMES[task_id]}: the lists ({split.source}, ratio "
                          f"{split.ratio}) have {len(out.labelled)} labelled and {len(out.test[task_id])} "
                          "test case(s) of that task; both must be at least 1")
    return out


def _preprocessing_extra(name: str) -> dict[str, Any]:
    """Per-task intensity/spacing recipe that ``predict3d`` applies to raw NIfTI inputs (none: synthetic)."""
    if name != "versemi":
        return {}
    out: dict[str, Any] = {}
    for rec in RECIPES.values():
        assert isinstance(rec, Recipe)
        out[str(rec.task_id)] = {
            "kind": rec.kind,
            "intensity": rec.intensity,
            "hu_window": list(rec.hu_window) if rec.hu_window else None,
            "target_spacing": list(rec.target_spacing) if rec.target_spacing else None,
            "pancreas_z_quirk": rec.pancreas_z_quirk,
        }
    return out


def _check_folder(root: Path, split: VerSemiSplit) -> None:
    """``medsemi data check`` on the listed cases; refuse to train when it finds errors (``data.check``)."""
    problems = check_volumes(root, [*split.train_pool, *split.all_test])
    if problems:
        raise DataError(
            f"refusing to train on {root}: the VerSemi check found {len(problems)} problem(s) "
            f"(lists: {split.source}, ratio {split.ratio}; set data.check=false to skip):\n  "
            + "\n  ".join(problems[:20])
        )
