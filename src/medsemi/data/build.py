"""Build the splits an experiment config asks for (``data.format``), checking real data first."""

from __future__ import annotations

from medsemi.config import Config, ConfigError
from medsemi.data.datasets import Splits

FORMATS_2D = ("fundus", "prostate", "mnms", "busi", "generic")


class DataError(ValueError):
    """The data on disk cannot be used; the message names the files and the problems."""


def build_splits(cfg: Config) -> Splits:
    data = cfg.data
    if data.format == "synthetic":
        from medsemi.data.synthetic2d import SyntheticConfig, build_synthetic_splits

        s = data.synthetic
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
    if data.format in ("versemi", "synthetic3d"):
        from medsemi.data.build3d import build_versemi_splits

        return build_versemi_splits(cfg)  # type: ignore[return-value]
    if data.format in FORMATS_2D:
        if not data.root:
            raise ConfigError(f"data.format={data.format} needs data.root (the dataset folder)")
        if data.check:
            from medsemi.data.check2d import check_dataset

            report = check_dataset(data.root, data.format)
            if report.errors:
                raise DataError(
                    f"refusing to train on {data.root}: `medsemi data check` found "
                    f"{len(report.errors)} error(s):\n" + report.to_text()
                )
        from medsemi.data.splits2d import build_splits as build_2d

        return build_2d(
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
    raise ConfigError(
        f"unknown data.format {data.format!r}; valid: synthetic, {', '.join(FORMATS_2D)}, versemi, synthetic3d"
    )
