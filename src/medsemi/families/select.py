"""Which dataset family a config gets: the one place that reads ``data.format``."""

from __future__ import annotations

import sys

from medsemi.config import Config, ConfigError
from medsemi.data.datasets import Splits
from medsemi.data.formats.registry import FORMAT_NAMES
from medsemi.data.formats.splits import build_splits as build_2d
from medsemi.data.synthetic.images2d import SyntheticConfig, build_synthetic_splits
from medsemi.data.tools.check2d import check_dataset
from medsemi.data.volumes.cases import TASK_NAMES
from medsemi.families.base import DataError, DatasetFamily
from medsemi.families.images import ImageFamily
from medsemi.families.volumes import VOLUME_FORMATS, build_volume_family

FORMATS_2D = FORMAT_NAMES
ALL_FORMATS = ("synthetic", *FORMAT_NAMES, *VOLUME_FORMATS)


def build_family(cfg: Config) -> DatasetFamily:
    """The dataset family of ``cfg.data.format``, checked (``data.check``) and split as the config says."""
    data = cfg.data
    if data.format == "synthetic":
        return ImageFamily.of(_synthetic_splits(cfg))
    if data.format in VOLUME_FORMATS:
        return build_volume_family(cfg)
    if data.format in FORMAT_NAMES:
        return ImageFamily.of(_folder_splits(cfg))
    raise ConfigError(f"unknown data.format {data.format!r}; valid: {', '.join(ALL_FORMATS)}")


def data_kind(cfg: Config) -> tuple[int, tuple[str, ...]]:
    """What ``cfg.data`` holds before anything is read: its spatial dimensions and its tasks (the chosen
    ``data.options.task`` or every task of a volume format; none for 2D images)."""
    if cfg.data.format in VOLUME_FORMATS:
        task = str((cfg.data.options or {}).get("task", "") or "")
        return 3, (task,) if task else tuple(TASK_NAMES.values())
    return 2, ()


def _synthetic_splits(cfg: Config) -> Splits:
    data, s = cfg.data, cfg.data.synthetic
    syn = SyntheticConfig(
        kind=s.kind,
        num_domains=s.num_domains,
        size=data.patch_size,
        train_per_domain=s.train_per_domain,
        test_per_domain=s.test_per_domain,
        seed=s.seed,
    )
    return build_synthetic_splits(
        syn, data.lb_domain, data.lb_num, val_fraction=data.val_fraction, split_seed=data.split_seed
    )


def _folder_splits(cfg: Config) -> Splits:
    """The splits of a dataset folder, after ``data check`` (``data.check``). Unlabelled images need no mask:
    a missing one is a warning there, printed here; an error refuses training and says how to skip the check."""
    data = cfg.data
    if not data.root:
        raise ConfigError(f"data.format={data.format} needs data.root (the dataset folder)")
    try:
        splits = build_2d(
            data.format,
            data.root,
            # generic format: lb_domain 0 = use splits.json as written
            lb_domain=None if data.format == "generic" and data.lb_domain == 0 else data.lb_domain,
            lb_num=data.lb_num,
            lb_ratio=data.lb_ratio,
            patch_size=data.patch_size,
            val_fraction=data.val_fraction,
            split_seed=data.split_seed,
            list_dir=data.list_dir or None,
        )
        failure: Exception | None = None
    except (OSError, ValueError) as err:  # the check below explains bad data better, when it finds it
        splits, failure = None, err
    if data.check:
        unlabelled = getattr(splits.unlabelled, "image_paths", []) if splits is not None else []
        report = check_dataset(data.root, data.format, mask_optional=unlabelled)
        if report.errors:
            raise DataError(
                f"refusing to train on {data.root}: `medsemi data check` found {len(report.errors)} error(s) "
                f"(fix them, or set data.check=false to train without this check):\n" + report.to_text()
            )
        maskless = [w for w in report.warnings if w.code == "missing_mask"]
        if maskless:
            print(f"warning: {len(maskless)} unlabelled image(s) in {data.root} have no mask (fine: unlabelled "
                  f"images need none), e.g. {maskless[0].path}", file=sys.stderr)
    if failure is not None:
        raise failure
    return splits
