"""VerSemi 3D data for the engine (spec versemi.md 1.2-1.8, 4): splits, batch sources, evaluation.

``build_versemi_splits(cfg)`` serves two ``data.format`` values:

- ``versemi``: the release layout (spec 1.4), one ``<data.root>/<name>.h5`` per case; the lists
  ``train_lab_<ratio>``/``train_unlab_<ratio>`` and the four test lists come from the package
  (the released ``datalist/``) or from ``data.list_dir``; ``data.options.ratio`` is 10 or 20.
- ``synthetic3d``: the embedded four-task stand-in (:mod:`medsemi.data.synthetic3d`), generated in
  memory, or written once into ``data.root`` (a cache folder) and read back like real data.

The returned :class:`VerSemiSplits` has the two engine hooks (``engine/trainer.py``):
``make_sources`` (device-side crop samplers of spec 1.6 with exact resume) and ``evaluate``
(per-task sliding-window inference, spec 4.1-4.4, scored with the VerSemi metric rules of 4.3).

``data.options`` keys (all optional):

================  ==========  ==============================================================
key               default     meaning
================  ==========  ==============================================================
ratio             20          labelled percentage, 10 or 20 (the original hard-codes 20)
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
================  ==========  ==============================================================

The crop size is ``data.patch_size`` (96 in the paper). The training batch size is
``train.batch_size`` labelled + ``train.unlabelled_batch_size`` unlabelled (both 8 in the paper).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from medsemi.config import Config, ConfigError
from medsemi.data.contract import DatasetInfo, LabelSpec
from medsemi.data.sampling3d import CropSampler, VolumeBank
from medsemi.data.versemi_splits import TEST_LISTS, VerSemiSplit, load_versemi_split
from medsemi.data.volumes import TASK_NAMES, Volume, read_cases

LABEL_SPEC = LabelSpec("exclusive", ("background", "foreground"))
CLASS_NAME = "foreground"
DEFAULT_STRIDES = (16, 16, 4)
_OPTION_KEYS = {
    "ratio", "repeats", "strides", "lcc", "selection", "metric_policy", "sw_batch_size", "bank_device",
    "image_dtype", "synthetic",
}
_SYNTHETIC_KEYS = {"n_per_task", "size_min", "size_max", "other_prob", "seed", "test_fraction"}
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# --------------------------------------------------------------------------- batch sources
class CropSource:
    """Endless stream of crop batches for the engine: ``next()``, ``state_dict()``, ``load_state_dict()``.

    Wraps a :class:`~medsemi.data.sampling3d.CropSampler` (epoch order from ``(seed, epoch)``, crops by
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


# --------------------------------------------------------------------------- splits object
@dataclass
class VerSemiSplits:
    """Everything the engine needs from a VerSemi dataset (see the module docstring)."""

    info: DatasetInfo
    split: VerSemiSplit
    labelled_volumes: list[Volume]
    unlabelled_volumes: list[Volume]
    test_volumes: dict[int, list[Volume]]
    options: dict[str, Any]
    source: str
    test: dict = field(default_factory=dict)  # the engine's 2D caches stay empty: evaluate() is used
    validation: dict = field(default_factory=dict)

    # -- engine hook 1: sources -----------------------------------------------------------------
    def make_sources(
        self, cfg: Config, device: torch.device, seed: int, uses_unlabelled: bool
    ) -> tuple[CropSource, CropSource | None]:
        """Labelled random-crop stream (x repeats, shuffled, drop_last) and the unlabelled centre-crop
        stream (spec 1.6); the latter only when the method (and its options) use unlabelled data."""
        from medsemi.engine import distributed as ddp

        bank_dev = device if self.options["bank_device"] == "train" else torch.device("cpu")
        dtype = _DTYPES[self.options["image_dtype"]]
        patch = self.info.patch_size
        base_seed = cfg.seed  # the same epoch order on every rank; each rank takes a strided share
        rank, world = ddp.rank(), ddp.world_size()
        lab_bank = VolumeBank(self.labelled_volumes, patch, device=bank_dev, image_dtype=dtype)
        labelled = CropSource(CropSampler(
            lab_bank, cfg.train.batch_size, mode="random", repeats=int(self.options["repeats"]),
            seed=base_seed + 2, rank=rank, world_size=world,
        ))
        needs = uses_unlabelled and bool(getattr(cfg.method, "needs_unlabelled", True))
        if not needs:
            return labelled, None
        if not self.unlabelled_volumes:
            raise ConfigError(
                f"{self.source}: the method uses unlabelled data but the unlabelled list is empty"
            )
        if len(self.unlabelled_volumes) < cfg.train.unlabelled_batch_size * world:  # checked now, built later
            raise ConfigError(
                f"{self.source}: {len(self.unlabelled_volumes)} unlabelled cases cannot fill one batch of "
                f"train.unlabelled_batch_size={cfg.train.unlabelled_batch_size} per rank; lower it or add cases"
            )

        def build_unlabelled() -> CropSource:
            unl_bank = VolumeBank(self.unlabelled_volumes, patch, device=bank_dev, with_labels=False,
                                  image_dtype=dtype)
            return CropSource(CropSampler(
                unl_bank, cfg.train.unlabelled_batch_size, mode="centre", repeats=1, with_label=False,
                seed=base_seed + 3, rank=rank, world_size=world,
            ))

        return labelled, LazyCropSource(build_unlabelled)

    # -- engine hook 2: evaluation --------------------------------------------------------------
    def evaluate(
        self, networks: dict[str, nn.Module], cfg: Config, device: torch.device, surface: bool = False,
        amp: str = "off",
    ) -> dict[str, dict[str, dict]]:
        """Per-task sliding-window evaluation of every network on the test lists (spec 4.1-4.4).

        Each test volume is segmented with its own task id (the synthetic task is never evaluated);
        records carry the task name as ``domain``. ``mean_dice`` is the model-selection score:
        the pancreas test Dice with ``selection: pancreas`` (spec 4.5), else the macro mean over
        tasks; the macro mean over tasks is always in ``mean_dice_tasks``.
        """
        return {"test": {role: self.evaluate_network(net, cfg, device, surface, amp)
                         for role, net in networks.items()}}

    def evaluate_network(
        self, net: nn.Module, cfg: Config, device: torch.device, surface: bool = False, amp: str = "off"
    ) -> dict:
        from medsemi.metrics import aggregate

        records = []
        for task, vols in self.test_volumes.items():
            for vol in vols:
                pred = predict_volume(net, vol.image, task, cfg, self.options, device, amp)
                records.append(score_case(pred, vol, self.metric_policy(cfg), surface))
        if not records:
            raise ValueError(f"{self.source}: no test volumes to evaluate")
        agg = aggregate(records)
        agg["mean_dice_tasks"] = agg["mean_dice"]
        sel = self.options["selection"]
        if sel != "mean":
            agg["mean_dice"] = agg["per_domain"].get(sel, {}).get(CLASS_NAME, {}).get("dice", float("nan"))
        agg["selection"] = sel
        agg["records"] = records
        return agg

    def metric_policy(self, cfg: Config) -> Any:
        from medsemi.metrics import MetricPolicy

        if self.options["metric_policy"] == "versemi":
            return MetricPolicy.versemi()
        from medsemi.engine.trainer import policy_from_config

        return policy_from_config(cfg)

    def summary(self) -> dict[str, Any]:
        out = dict(self.split.summary())
        out.update({"format": self.info.name, "source": self.source, "lists": self.split.source,
                    "patch_size": list(self.info.patch_size), "repeats": self.options["repeats"]})
        return out


# --------------------------------------------------------------------------- prediction + scoring
def predict_volume(
    net: nn.Module, image: np.ndarray, task: int, cfg: Config, options: dict[str, Any], device: torch.device,
    amp: str = "off",
) -> np.ndarray:
    """Binary mask (uint8, image shape) of one volume queried with ``task`` (spec 4.2; LCC of 4.4)."""
    from medsemi.evaluation.evaluate import autocast_for, eval_mode
    from medsemi.evaluation.sliding3d import sliding_window_predict

    def predictor(x: torch.Tensor) -> torch.Tensor:
        ids = torch.full((x.shape[0],), int(task), dtype=torch.long, device=x.device)
        with autocast_for(x.device, amp):
            return net(x, ids).float()

    with eval_mode(net):
        return sliding_window_predict(
            image, predictor, window=int(cfg.data.patch_size), strides=tuple(options["strides"]),
            lcc=bool(options["lcc"]), sw_batch_size=int(options["sw_batch_size"]), device=device,
        )


def score_case(pred: np.ndarray, vol: Volume, policy: Any, surface: bool) -> dict:
    """Metrics record of one case (spec 4.3): Dice, Jaccard, and with ``surface`` HD95/ASD in voxels
    plus ``hd95_mm``/``asd_mm`` when the file stores a spacing."""
    from medsemi.metrics import case_metrics

    if vol.label is None:
        raise ValueError(f"{vol.name}: test case has no label")
    metrics = ("dice", "jaccard", "hd95", "asd") if surface else ("dice", "jaccard")
    m = case_metrics(pred[None].astype(bool), vol.label[None].astype(bool), (CLASS_NAME,), vol.spacing,
                     policy, metrics)
    return {"domain": TASK_NAMES[vol.task_id], "case": vol.name, "metrics": m}


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
        "synthetic": {},
    }
    opts.update(raw)
    if int(opts["ratio"]) not in (10, 20):
        raise ConfigError(f"data.options.ratio must be 10 or 20, got {opts['ratio']!r}")
    opts["ratio"] = int(opts["ratio"])
    strides = opts["strides"]
    if not isinstance(strides, (list, tuple)) or len(strides) != 3 or any(int(s) < 1 for s in strides):
        raise ConfigError(f"data.options.strides must be 3 positive integers, got {strides!r}")
    opts["strides"] = [int(s) for s in strides]
    if opts["selection"] not in ("mean", *TASK_NAMES.values()):
        raise ConfigError(f"data.options.selection must be 'mean' or a task name "
                          f"{list(TASK_NAMES.values())}, got {opts['selection']!r}")
    if opts["metric_policy"] not in ("versemi", "config"):
        raise ConfigError(
            f"data.options.metric_policy must be versemi or config, got {opts['metric_policy']!r}"
        )
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
    from medsemi.data.synthetic3d import Synthetic3DConfig

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


def build_versemi_splits(cfg: Config) -> VerSemiSplits:
    """Splits for ``data.format`` ``versemi`` (HDF5 folder) or ``synthetic3d`` (embedded data)."""
    data = cfg.data
    opts = _options(cfg)
    ratio = opts["ratio"]
    if data.format == "synthetic3d":
        from medsemi.data.synthetic3d import (
            generate_synthetic_volumes,
            synthetic_lists,
            write_synthetic_dataset,
        )

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
        name = "synthetic3d"
    elif data.format == "versemi":
        if not data.root:
            raise ConfigError("data.format=versemi needs data.root (the folder of <name>.h5 files)")
        root = Path(data.root)
        if not root.is_dir():
            raise ConfigError(f"data.root={root}: folder not found")
        split = load_versemi_split(ratio, data.list_dir or None)
        if data.check:
            _check_folder(root, split)
        volumes = None
        source = str(root)
        name = "versemi"
    else:
        raise ConfigError(
            f"build_versemi_splits: data.format must be versemi or synthetic3d, got {data.format!r}"
        )

    def load(names: tuple[str, ...], with_label: bool = True) -> list[Volume]:
        if volumes is not None:
            return [volumes[n] for n in names]
        return read_cases(source, names, with_label=with_label)

    labelled = load(split.labelled)
    needs_unl = bool(getattr(cfg.method, "needs_unlabelled", True))
    from medsemi.methods.registry import get_method

    needs_unl = needs_unl and get_method(cfg.method.name).uses_unlabelled
    unlabelled = load(split.unlabelled, with_label=False) if needs_unl else []
    test = {t: load(names) for t, names in split.test.items() if names}
    p = int(data.patch_size)
    info = DatasetInfo(
        name=name, in_channels=1, label_spec=LABEL_SPEC, domains=tuple(TASK_NAMES.values()),
        patch_size=(p, p, p),
        extra={
            "tasks": {str(k): v for k, v in TASK_NAMES.items()},
            "synthetic_task": 5,
            "strides": list(opts["strides"]),
            "lcc": bool(opts["lcc"]),
            "preprocessing": _preprocessing_extra(name),
        },
    )
    return VerSemiSplits(info, split, labelled, unlabelled, test, opts, source)


def _preprocessing_extra(name: str) -> dict[str, Any]:
    """Per-task intensity/spacing recipe that ``predict3d`` applies to raw NIfTI inputs (none: synthetic)."""
    if name != "versemi":
        return {}
    from medsemi.data.prepare3d import RECIPES, Recipe

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
    from medsemi.data.build import DataError
    from medsemi.data.check3d import check_volumes

    problems = check_volumes(root, [*split.train_pool, *split.all_test])
    if problems:
        raise DataError(
            f"refusing to train on {root}: the VerSemi check found {len(problems)} problem(s) "
            f"(lists: {split.source}, ratio {split.ratio}; set data.check=false to skip):\n  "
            + "\n  ".join(problems[:20])
        )
