"""The MiDSS / UST-RUN experiment split over the 2D readers (spec ust-run.md 1.2-1.4).

Rule of the original code (UST train.py:464-485, MID code/train.py:346-362), for ``lb_domain`` k
(1-based) and ``lb_num`` n:

- labelled = the first n files of domain k's ordered training list (not a random draw);
- unlabelled = the rest of domain k's training list, then every training file of every other domain,
  in domain order (size ``total_train - n``);
- test = every domain's test list, one dataset per domain;
- ``lb_ratio = r > 0`` replaces n by ``int(r * total_train)``, the total over **all** domains
  (UST train.py:474-477), although the labelled files still come from domain k only.

Validation (ours, off by default; the papers select models on the test set, spec 1.3): with
``val_fraction = f > 0``, for every domain d (0-based) with an ordered training list of ``n_d`` files,
``v_d = int(f * n_d)`` positions are drawn by ``numpy.random.default_rng([split_seed, d]).permutation(n_d)
[:v_d]``; those files form the validation set of domain d (kept in training order) and are removed from
the training list **before** the rule above is applied to what remains (so the labelled files are the
first n of the remaining list). ``lb_ratio`` counts the training files before the removal.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medsemi.data.contract import DatasetInfo
from medsemi.data.datasets import Splits
from medsemi.data.formats.base import Entry, Format2D
from medsemi.data.formats.registry import open_format

# spec 1.2 table: hard-coded ``domain_len`` (train) and test counts per domain (None: not in the code)
_EXPECTED: dict[str, dict[str, dict[str, int | None]]] = {
    "fundus": {
        "train": {"Domain1": 50, "Domain2": 99, "Domain3": 320, "Domain4": 320},
        "test": {"Domain1": 51, "Domain2": 60, "Domain3": 80, "Domain4": 80},
    },
    "prostate": {
        "train": {"BIDMC": 225, "BMC": 305, "HK": 136, "I2CVB": 373, "RUNMC": 338, "UCL": 133},
        "test": {d: None for d in ("BIDMC", "BMC", "HK", "I2CVB", "RUNMC", "UCL")},
    },
    "mnms": {
        "train": {"vendorA": 1030, "vendorB": 1342, "vendorC": 525, "vendorD": 550},
        "test": {d: None for d in ("vendorA", "vendorB", "vendorC", "vendorD")},
    },
    "busi": {
        "train": {"benign": 350, "malignant": 168},
        "test": {"benign": 87, "malignant": 42},
    },
}


def expected_counts(format: str) -> dict[str, dict[str, int | None]]:
    """The paper's per-domain counts ``{"train": {domain: n}, "test": {domain: n or None}}`` (spec 1.2)."""
    key = format.lower()
    if key not in _EXPECTED:
        raise ValueError(f"no paper counts for format {format!r}; known: {sorted(_EXPECTED)}")
    return {s: dict(v) for s, v in _EXPECTED[key].items()}


def dataset_info(
    format: str | Format2D, patch_size: int | Sequence[int] | None = None, root: str | Path | None = None
) -> DatasetInfo:
    """``DatasetInfo`` with the per-dataset settings of spec 1.4 (``root`` needed only for ``generic``)."""
    if isinstance(format, Format2D):
        return format.info(patch_size)
    if format.lower() == "generic":
        return open_format(format, root).info(patch_size)
    return open_format(format, root or ".").info(patch_size)


def validation_indices(n: int, fraction: float, seed: int, domain: int) -> list[int]:
    """Sorted positions of the validation files of one domain (rule in the module docstring)."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {fraction}")
    v = int(fraction * n)
    if v == 0:
        return []
    return sorted(int(i) for i in np.random.default_rng([seed, domain]).permutation(n)[:v])


@dataclass
class SplitLists:
    """The split as file entries, before datasets are built (used by ``build_splits`` and ``convert2d``)."""

    fmt: Format2D
    labelled: list[Entry]
    unlabelled: list[Entry]
    test: dict[str, list[Entry]]
    validation: dict[str, list[Entry]] = field(default_factory=dict)
    train_order: dict[str, list[Entry]] = field(default_factory=dict)  # full per-domain lists (before val)
    test_order: dict[str, list[Entry]] = field(default_factory=dict)
    lb_domain: int | None = None
    lb_num: int | None = None


def split_lists(
    format: str | Format2D,
    root: str | Path | None,
    lb_domain: int | None,
    lb_num: int | None = None,
    lb_ratio: float = 0.0,
    val_fraction: float = 0.0,
    split_seed: int = 0,
    list_dir: str | Path | None = None,
) -> SplitLists:
    """Entries of each part of the split (see the module docstring for the rule)."""
    fmt = open_format(format, root)
    k = len(fmt.domains)
    trains = {d: fmt.list_split(i, "train", list_dir) for i, d in enumerate(fmt.domains)}
    tests = {d: fmt.list_split(i, "test", list_dir) for i, d in enumerate(fmt.domains)}
    if lb_domain is None:
        if not hasattr(fmt, "explicit_lists"):
            raise ValueError(f"{fmt.name}: lb_domain (1..{k}) is required")
        if val_fraction:
            raise ValueError(
                "val_fraction applies to the paper rule; splits.json has its own validation list"
            )
        ex = fmt.explicit_lists()  # type: ignore[attr-defined]
        by_domain = {d: [e for e in ex["test"] if e.domain == i] for i, d in enumerate(fmt.domains)}
        val = {d: [e for e in ex["validation"] if e.domain == i] for i, d in enumerate(fmt.domains)}
        return SplitLists(
            fmt,
            ex["labelled"],
            ex["unlabelled"],
            by_domain,
            {d: v for d, v in val.items() if v},
            trains,
            tests,
            None,
            len(ex["labelled"]),
        )
    if not 1 <= lb_domain <= k:
        raise ValueError(f"{fmt.name}: lb_domain must be 1..{k} (domains {fmt.domains}), got {lb_domain}")
    total = sum(len(v) for v in trains.values())
    if lb_ratio > 0:
        lb_num = int(lb_ratio * total)
    elif lb_num is None:
        lb_num = fmt.default_lb_num
    validation: dict[str, list[Entry]] = {}
    pools: dict[str, list[Entry]] = {}
    for i, d in enumerate(fmt.domains):
        idx = set(validation_indices(len(trains[d]), val_fraction, split_seed, i))
        if idx:
            validation[d] = [e for j, e in enumerate(trains[d]) if j in idx]
        pools[d] = [e for j, e in enumerate(trains[d]) if j not in idx]
    lb_name = fmt.domains[lb_domain - 1]
    if not 1 <= lb_num <= len(pools[lb_name]):
        raise ValueError(
            f"{fmt.name}: lb_num={lb_num} but domain {lb_name} has {len(pools[lb_name])} training files"
            + (" after removing validation" if validation else "")
        )
    labelled = pools[lb_name][:lb_num]
    unlabelled = pools[lb_name][lb_num:] + [e for d in fmt.domains if d != lb_name for e in pools[d]]
    return SplitLists(fmt, labelled, unlabelled, tests, validation, trains, tests, lb_domain, lb_num)


def build_splits(
    format: str | Format2D,
    root: str | Path | None,
    lb_domain: int | None,
    lb_num: int | None = None,
    lb_ratio: float = 0.0,
    patch_size: int | Sequence[int] | None = None,
    val_fraction: float = 0.0,
    split_seed: int = 0,
    list_dir: str | Path | None = None,
    unlabelled_labels: bool = False,
    cache: bool = False,
) -> Splits:
    """The experiment's ``Splits`` (lazy file datasets; ``cache=True``: in-memory tensors).

    ``lb_domain`` is 1-based (spec 1.2); ``lb_num=None`` takes the dataset's default (fundus 20, prostate
    40, M&Ms 20, BUSI 40). For ``generic``, ``lb_domain=None`` uses the lists of ``splits.json``.
    Unlabelled data is read without masks unless ``unlabelled_labels`` (then every one needs its mask).
    Labelled, validation and test images without a mask raise ``MissingMaskError`` here.
    A domain without test files is left out of ``test`` with a warning.
    """
    sl = split_lists(format, root, lb_domain, lb_num, lb_ratio, val_fraction, split_seed, list_dir)
    fmt = sl.fmt

    def make(entries: list[Entry], labels: bool = True):
        ds = fmt.dataset(entries, patch_size, labels)
        return ds.cache() if cache and len(ds) else ds

    test = {}
    for d, entries in sl.test.items():
        if entries:
            test[d] = make(entries)
        else:
            warnings.warn(f"{fmt.name}: domain {d} has no test files in {fmt.root}", stacklevel=2)
    return Splits(
        info=fmt.info(patch_size),
        labelled=make(sl.labelled),
        unlabelled=make(sl.unlabelled, labels=unlabelled_labels),
        test=test,
        validation={d: make(v) for d, v in sl.validation.items()},
    )
