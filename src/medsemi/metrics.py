"""Segmentation metrics: Dice, Jaccard, HD95, ASD, the smoothed Dice of UST/MiDSS, and aggregation.

Definitions (spec ust-run.md 3.4, versemi.md 4.3), all per image and per class on binary masks
(numpy bool arrays, 2D or 3D):

- ``dice``    = 2|P∩G| / (|P|+|G|)                       (medpy ``dc``)
- ``jaccard`` = |P∩G| / |P∪G|                            (medpy ``jc``)
- surface of a mask = mask XOR binary_erosion(mask, 1-connectivity structure); pixels outside
  the image count as background, so foreground touching the border is surface (as medpy).
- directed surface distances A->B: for each surface point of A the Euclidean distance to the
  nearest surface point of B (``scipy.ndimage.distance_transform_edt`` with ``sampling=spacing``;
  pixel/voxel units when ``spacing`` is None).
- ``hd95`` (default ``definition="medpy"``): 95th percentile (numpy's linear interpolation) of the
  *pooled* directed distances of both directions. ``definition="max_directed"``: max of the two
  per-direction 95th percentiles (MONAI's definition; it differs from medpy, notes/stack.md).
- ``asd`` = mean of the directed distances *prediction -> ground truth* (medpy ``asd``, one-sided;
  not the symmetric ASSD).
- ``smoothed_dice`` = (2|P∩G| + 1) / (|P| + |G| + 1.001) (UST utils/metrics.py); both empty:
  0.0 under the ``"ust"`` rule, 1/1.001 ≈ 0.999 under the ``"midss"`` rule.

Empty-mask rule (spec ust-run.md 3.4 and section 6 item 22), written down once in
:class:`MetricPolicy`; the defaults are:

==========================  =================  ====================================================
case                        dice / jaccard     hd95 / asd
==========================  =================  ====================================================
prediction and gt empty     1.0 / 1.0          NaN (skipped, counted)
prediction empty, gt not    0.0 / 0.0          100.0 (the UST penalty, ``empty_pred_distance``)
gt empty, prediction not    0.0 / 0.0          NaN (skipped, counted; ``empty_gt_distance`` penalty
                                               optional). medpy raises here, the original crashes.
==========================  =================  ====================================================

``None`` for any configurable value means "NaN: skip this image for this class and metric".
Aggregations ignore NaN and report how many values were skipped. Presets:
:meth:`MetricPolicy.medpy_legacy` (medpy 0.4: both empty -> dc 0, jc skipped, as the authors'
environment), :meth:`MetricPolicy.versemi` (VerSemi: an empty prediction scores 0 for all four).

Units: ``case_metrics`` always reports ``hd95``/``asd`` in pixel/voxel units (what the papers
report); when a spacing is given it adds ``hd95_mm``/``asd_mm`` computed with that spacing.

Aggregation (spec ust-run.md 1.3): per-domain mean over images, then the macro mean over domains
of the per-domain means; "mean Dice" = mean over classes of the domain-averaged per-class Dice.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from scipy import ndimage

HD95Definition = Literal["medpy", "max_directed"]
SmoothedRule = Literal["ust", "midss"]

#: metric keys computed by :func:`case_metrics` (``*_mm`` added when a spacing is given)
DEFAULT_METRICS: tuple[str, ...] = ("dice", "jaccard", "hd95", "asd", "smoothed_dice")
#: per-class mask sizes stored alongside the metrics; used to count empty cases, never averaged
SIZE_KEYS: tuple[str, str] = ("pred_voxels", "gt_voxels")
_DISTANCE_METRICS = ("hd95", "asd")
_NAN = float("nan")


@dataclass(frozen=True)
class MetricPolicy:
    """What each metric returns when the prediction and/or the ground truth is empty.

    A float is returned as the metric value; ``None`` means NaN (the image is skipped for that
    class and metric and counted by :func:`aggregate`). See the module docstring for the table.
    """

    both_empty_dice: float | None = 1.0
    both_empty_jaccard: float | None = 1.0
    both_empty_distance: float | None = None
    empty_pred_distance: float | None = 100.0
    empty_gt_distance: float | None = None
    smoothed_empty_rule: SmoothedRule = "ust"
    hd95_definition: HD95Definition = "medpy"

    def __post_init__(self) -> None:
        if self.smoothed_empty_rule not in ("ust", "midss"):
            raise ValueError(
                f"smoothed_empty_rule must be 'ust' or 'midss', got {self.smoothed_empty_rule!r}"
            )
        if self.hd95_definition not in ("medpy", "max_directed"):
            raise ValueError(
                f"hd95_definition must be 'medpy' or 'max_directed', got {self.hd95_definition!r}"
            )

    def describe(self) -> str:
        """One sentence for report headers: what empty masks score."""

        def v(x: float | None) -> str:
            return "skipped" if x is None else f"{x:g}"

        return (f"empty prediction with a non-empty ground truth: Dice 0, HD95/ASD {v(self.empty_pred_distance)}; "
                f"both empty: Dice {v(self.both_empty_dice)}, HD95/ASD {v(self.both_empty_distance)}; "
                f"empty ground truth only: HD95/ASD {v(self.empty_gt_distance)}")

    @classmethod
    def medpy_legacy(cls) -> MetricPolicy:
        """medpy 0.4.x as in the UST authors' environment: both empty -> dc 0, jc raises (skipped)."""
        return cls(both_empty_dice=0.0, both_empty_jaccard=None)

    @classmethod
    def versemi(cls) -> MetricPolicy:
        """VerSemi ``calculate_metric_percase``: empty prediction -> (0, 0, 0, 0) (versemi.md 4.3)."""
        return cls(
            both_empty_dice=0.0, both_empty_jaccard=0.0, both_empty_distance=0.0, empty_pred_distance=0.0
        )


DEFAULT_POLICY = MetricPolicy()


def policy_from_eval(section: Any, method_rule: SmoothedRule = "ust") -> MetricPolicy:
    """The policy an ``eval`` config section asks for (``both_empty_score``, ``empty_prediction_penalty``,
    ``gt_empty_policy``, ``hd95``, ``smoothed_empty_rule``); duck-typed so that this leaf module needs no
    config import. ``smoothed_empty_rule: auto`` (or a section without the key) takes ``method_rule``, the
    rule the trained method declares (``Method.smoothed_empty_rule``)."""
    rule = getattr(section, "smoothed_empty_rule", "auto")
    return MetricPolicy(
        both_empty_dice=section.both_empty_score,
        both_empty_jaccard=section.both_empty_score,
        empty_pred_distance=section.empty_prediction_penalty,
        empty_gt_distance=section.empty_prediction_penalty if section.gt_empty_policy == "penalty" else None,
        smoothed_empty_rule=method_rule if rule == "auto" else rule,
        hd95_definition=section.hd95,
    )


def _nan_if_none(value: float | None) -> float:
    return _NAN if value is None else float(value)


def _check_pair(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred = np.asarray(pred).astype(bool, copy=False)
    gt = np.asarray(gt).astype(bool, copy=False)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from ground-truth shape {gt.shape}")
    if pred.ndim not in (2, 3):
        raise ValueError(f"masks must be 2D or 3D, got {pred.ndim}D")
    return pred, gt


def _check_spacing(spacing: Sequence[float] | None, ndim: int) -> tuple[float, ...] | None:
    if spacing is None:
        return None
    sp = tuple(float(s) for s in spacing)
    if len(sp) != ndim or any(not s > 0 for s in sp):
        raise ValueError(f"spacing must be {ndim} positive numbers, got {spacing!r}")
    return sp


def dice(pred: np.ndarray, gt: np.ndarray, policy: MetricPolicy = DEFAULT_POLICY) -> float:
    """medpy ``dc``: 2|P∩G| / (|P|+|G|); both empty -> ``policy.both_empty_dice``."""
    pred, gt = _check_pair(pred, gt)
    denom = int(pred.sum()) + int(gt.sum())
    if denom == 0:
        return _nan_if_none(policy.both_empty_dice)
    return 2.0 * int(np.count_nonzero(pred & gt)) / denom


def jaccard(pred: np.ndarray, gt: np.ndarray, policy: MetricPolicy = DEFAULT_POLICY) -> float:
    """medpy ``jc``: |P∩G| / |P∪G|; both empty -> ``policy.both_empty_jaccard``."""
    pred, gt = _check_pair(pred, gt)
    union = int(np.count_nonzero(pred | gt))
    if union == 0:
        return _nan_if_none(policy.both_empty_jaccard)
    return int(np.count_nonzero(pred & gt)) / union


def smoothed_dice(pred: np.ndarray, gt: np.ndarray, empty_rule: SmoothedRule = "ust") -> float:
    """UST/MiDSS per-image Dice (2|P∩G|+1)/(|P|+|G|+1.001) (spec ust-run.md 3.4 item 1).

    Both empty: 0.0 for ``"ust"``, 1/1.001 for ``"midss"`` (whose rule is commented out).
    """
    if empty_rule not in ("ust", "midss"):
        raise ValueError(f"empty_rule must be 'ust' or 'midss', got {empty_rule!r}")
    pred, gt = _check_pair(pred, gt)
    p, g = int(pred.sum()), int(gt.sum())
    if p == 0 and g == 0 and empty_rule == "ust":
        return 0.0
    return (2.0 * int(np.count_nonzero(pred & gt)) + 1.0) / (p + g + 1.001)


def _crop_box(pred: np.ndarray, gt: np.ndarray) -> tuple[slice, ...]:
    """Bounding box of P ∪ G.

    Exact for surfaces and distances: everything outside the box is background in both masks,
    which is what the erosion assumes outside the array, and every surface point lies in the box,
    so the nearest surface point found by the distance transform is the same.
    """
    union = pred | gt
    box = []
    for axis in range(union.ndim):
        other = tuple(a for a in range(union.ndim) if a != axis)
        idx = np.flatnonzero(union.any(axis=other))
        box.append(slice(int(idx[0]), int(idx[-1]) + 1))
    return tuple(box)


def surface(mask: np.ndarray) -> np.ndarray:
    """medpy surface: mask XOR its erosion by the 1-connectivity structure (outside = background)."""
    mask = np.asarray(mask).astype(bool, copy=False)
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask ^ ndimage.binary_erosion(mask, structure=structure, iterations=1)


def surface_distances(
    pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Directed surface distances (pred -> gt, gt -> pred) as 1D float arrays (medpy semantics).

    Both masks must be non-empty.
    """
    pred, gt = _check_pair(pred, gt)
    sp = _check_spacing(spacing, pred.ndim)
    if not pred.any() or not gt.any():
        raise ValueError("surface distances need a non-empty prediction and ground truth")
    box = _crop_box(pred, gt)
    pred_s, gt_s = surface(pred[box]), surface(gt[box])
    d_pred = ndimage.distance_transform_edt(~gt_s, sampling=sp)[pred_s]
    d_gt = ndimage.distance_transform_edt(~pred_s, sampling=sp)[gt_s]
    return d_pred, d_gt


def _empty_distance(p_empty: bool, g_empty: bool, policy: MetricPolicy) -> float | None:
    """The policy value for an empty case, or None when both masks are non-empty."""
    if p_empty and g_empty:
        return _nan_if_none(policy.both_empty_distance)
    if p_empty:
        return _nan_if_none(policy.empty_pred_distance)
    if g_empty:
        return _nan_if_none(policy.empty_gt_distance)
    return None


def _hd95_from(d_pred: np.ndarray, d_gt: np.ndarray, definition: HD95Definition) -> float:
    if definition == "medpy":
        return float(np.percentile(np.concatenate([d_pred, d_gt]), 95))
    if definition == "max_directed":
        return float(max(np.percentile(d_pred, 95), np.percentile(d_gt, 95)))
    raise ValueError(f"hd95 definition must be 'medpy' or 'max_directed', got {definition!r}")


def hd95(
    pred: np.ndarray,
    gt: np.ndarray,
    spacing: Sequence[float] | None = None,
    definition: HD95Definition = "medpy",
    policy: MetricPolicy = DEFAULT_POLICY,
) -> float:
    """95% Hausdorff distance; ``"medpy"``: percentile of pooled directed distances (module doc)."""
    pred, gt = _check_pair(pred, gt)
    empty = _empty_distance(not pred.any(), not gt.any(), policy)
    if empty is not None:
        return empty
    return _hd95_from(*surface_distances(pred, gt, spacing), definition)


def asd(
    pred: np.ndarray,
    gt: np.ndarray,
    spacing: Sequence[float] | None = None,
    policy: MetricPolicy = DEFAULT_POLICY,
) -> float:
    """medpy ``asd``: mean directed surface distance prediction -> ground truth (one-sided)."""
    pred, gt = _check_pair(pred, gt)
    empty = _empty_distance(not pred.any(), not gt.any(), policy)
    if empty is not None:
        return empty
    return float(surface_distances(pred, gt, spacing)[0].mean())


def binary_metrics(
    pred: np.ndarray,
    gt: np.ndarray,
    spacing: Sequence[float] | None = None,
    policy: MetricPolicy = DEFAULT_POLICY,
    metrics: Sequence[str] = DEFAULT_METRICS,
) -> dict[str, float]:
    """All requested metrics of one binary pair, sharing the surface computation.

    Returns the requested keys plus ``pred_voxels``/``gt_voxels``; with a spacing, ``hd95_mm`` /
    ``asd_mm`` are added for each requested distance metric (``hd95``/``asd`` stay in voxels).
    """
    pred, gt = _check_pair(pred, gt)
    sp = _check_spacing(spacing, pred.ndim)
    unknown = set(metrics) - set(DEFAULT_METRICS)
    if unknown:
        raise ValueError(f"unknown metrics {sorted(unknown)}; known: {list(DEFAULT_METRICS)}")
    out: dict[str, float] = {}
    if "dice" in metrics:
        out["dice"] = dice(pred, gt, policy)
    if "jaccard" in metrics:
        out["jaccard"] = jaccard(pred, gt, policy)
    if "smoothed_dice" in metrics:
        out["smoothed_dice"] = smoothed_dice(pred, gt, policy.smoothed_empty_rule)
    wanted = [m for m in _DISTANCE_METRICS if m in metrics]
    if wanted:
        unit_spacings: list[tuple[str, tuple[float, ...] | None]] = [("", None)]
        if sp is not None:
            unit_spacings.append(("_mm", sp))
        empty = _empty_distance(not pred.any(), not gt.any(), policy)
        for suffix, s in unit_spacings:
            if empty is not None:
                values = {m: empty for m in wanted}
            else:
                d_pred, d_gt = surface_distances(pred, gt, s)
                values = {
                    "hd95": _hd95_from(d_pred, d_gt, policy.hd95_definition),
                    "asd": float(d_pred.mean()),
                }
            for m in wanted:
                out[m + suffix] = values[m]
    out["pred_voxels"] = float(np.count_nonzero(pred))
    out["gt_voxels"] = float(np.count_nonzero(gt))
    return out


def case_metrics(
    pred_label_bin: np.ndarray,
    gt_label_bin: np.ndarray,
    class_names: Sequence[str],
    spacing: Sequence[float] | None = None,
    policy: MetricPolicy = DEFAULT_POLICY,
    metrics: Sequence[str] = DEFAULT_METRICS,
) -> dict[str, dict[str, float]]:
    """Per-class metrics of one case from per-class binary stacks ``(F, *spatial)``."""
    pred_label_bin = np.asarray(pred_label_bin)
    gt_label_bin = np.asarray(gt_label_bin)
    if pred_label_bin.shape != gt_label_bin.shape:
        raise ValueError(
            f"prediction stack {pred_label_bin.shape} differs from ground truth {gt_label_bin.shape}"
        )
    if pred_label_bin.ndim not in (3, 4) or pred_label_bin.shape[0] != len(class_names):
        raise ValueError(
            f"expected a (F, *spatial) stack with F = {len(class_names)} classes {tuple(class_names)}, "
            f"got shape {pred_label_bin.shape}"
        )
    return {
        name: binary_metrics(pred_label_bin[i], gt_label_bin[i], spacing, policy, metrics)
        for i, name in enumerate(class_names)
    }


# --------------------------------------------------------------------------- aggregation


def _nanstats(values: list[float]) -> tuple[float, float, int]:
    """(NaN-aware mean, NaN-aware population sd, number of NaN values)."""
    arr = np.asarray(values, dtype=np.float64)
    ok = arr[~np.isnan(arr)]
    skipped = int(arr.size - ok.size)
    if ok.size == 0:
        return _NAN, _NAN, skipped
    return float(ok.mean()), float(ok.std()), skipped


def _ordered_union(items: list[list[str]]) -> list[str]:
    seen: dict[str, None] = {}
    for group in items:
        for x in group:
            seen.setdefault(x, None)
    return list(seen)


def aggregate(records: Sequence[dict], dice_key: str = "dice") -> dict:
    """Per-domain NaN-aware means over cases, then the macro mean over domains (spec 1.3).

    ``records``: ``{"domain": str, "case": str, "metrics": {class: {metric: value}}}``.
    Returns a dict with

    - ``per_domain`` / ``per_domain_sd``: ``{domain: {class: {metric: mean / sd over cases}}}``
    - ``macro`` / ``macro_sd``: ``{class: {metric: mean / sd over the per-domain means}}``
      (a domain whose per-domain mean is NaN is left out and counted in ``counts``)
    - ``mean_over_classes``: ``{metric: mean over classes of macro}``
    - ``mean_dice``: mean over classes of ``macro[class][dice_key]`` (the model-selection number)
    - ``counts``: ``cases`` per domain; ``skipped`` ``{domain: {class: {metric: n NaN}}}``;
      ``skipped_total`` ``{class: {metric: n}}``; ``domains_skipped`` ``{class: {metric: n}}``;
      ``empty`` ``{domain: {class: {"both", "pred_only", "gt_only": n}}}`` (from the size keys).

    SDs are population SDs (ddof 0). Size keys (``pred_voxels``/``gt_voxels``) are not averaged.
    """
    if not records:
        raise ValueError("aggregate() needs at least one record")
    by_domain: dict[str, list[dict]] = {}
    for r in records:
        by_domain.setdefault(str(r["domain"]), []).append(r["metrics"])
    classes = _ordered_union([list(r["metrics"]) for r in records])
    metric_names = _ordered_union(
        [[k for k in r["metrics"][c] if k not in SIZE_KEYS] for r in records for c in r["metrics"]]
    )

    per_domain: dict = {}
    per_domain_sd: dict = {}
    skipped: dict = {}
    empty: dict = {}
    for dom, cases in by_domain.items():
        per_domain[dom], per_domain_sd[dom], skipped[dom], empty[dom] = {}, {}, {}, {}
        for c in classes:
            per_domain[dom][c], per_domain_sd[dom][c], skipped[dom][c] = {}, {}, {}
            for m in metric_names:
                vals = [cm[c][m] if c in cm and m in cm[c] else _NAN for cm in cases]
                mean, sd, n_nan = _nanstats(vals)
                per_domain[dom][c][m], per_domain_sd[dom][c][m], skipped[dom][c][m] = mean, sd, n_nan
            counts = {"both": 0, "pred_only": 0, "gt_only": 0}
            for cm in cases:
                sizes = cm.get(c, {})
                if all(k in sizes for k in SIZE_KEYS):
                    p0, g0 = sizes["pred_voxels"] == 0, sizes["gt_voxels"] == 0
                    key = "both" if p0 and g0 else "pred_only" if p0 else "gt_only" if g0 else None
                    if key:
                        counts[key] += 1
            empty[dom][c] = counts

    macro: dict = {}
    macro_sd: dict = {}
    domains_skipped: dict = {}
    skipped_total: dict = {}
    for c in classes:
        macro[c], macro_sd[c], domains_skipped[c], skipped_total[c] = {}, {}, {}, {}
        for m in metric_names:
            mean, sd, n_nan = _nanstats([per_domain[d][c][m] for d in by_domain])
            macro[c][m], macro_sd[c][m], domains_skipped[c][m] = mean, sd, n_nan
            skipped_total[c][m] = sum(skipped[d][c][m] for d in by_domain)
    mean_over_classes = {m: _nanstats([macro[c][m] for c in classes])[0] for m in metric_names}
    return {
        "per_domain": per_domain,
        "per_domain_sd": per_domain_sd,
        "macro": macro,
        "macro_sd": macro_sd,
        "mean_over_classes": mean_over_classes,
        "mean_dice": mean_over_classes.get(dice_key, _NAN),
        "selection_metric": dice_key,
        "counts": {
            "cases": {d: len(v) for d, v in by_domain.items()},
            "skipped": skipped,
            "skipped_total": skipped_total,
            "domains_skipped": domains_skipped,
            "empty": empty,
        },
    }


def format_table(
    result: dict, metrics: Sequence[str] | None = None, digits: int = 4, group: str = "domain"
) -> str:
    """Markdown table of an :func:`aggregate` result: one row per (domain, class), then macro rows.

    Cells are ``mean ± sd``; ``n`` is the number of cases, skipped (NaN) values are listed per
    cell as ``(k skipped)``. ``group``: what the rows are (``domain``; ``task`` for multi-task data).
    """
    classes = list(result["macro"])
    names = list(metrics) if metrics is not None else list(next(iter(result["macro"].values()), {}))

    def fmt(x: float) -> str:
        return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"

    def cell(mean: float, sd: float, n_skip: int) -> str:
        text = fmt(mean) if math.isnan(sd) else f"{fmt(mean)} ± {fmt(sd)}"
        return text + (f" ({n_skip} skipped)" if n_skip else "")

    counts = result["counts"]
    lines = [f"| {group} | class | n | " + " | ".join(names) + " |", "|---|---|---|" + "---|" * len(names)]
    for dom, per_class in result["per_domain"].items():
        for c in classes:
            cells = [
                cell(
                    per_class[c].get(m, _NAN),
                    result["per_domain_sd"][dom][c].get(m, _NAN),
                    counts["skipped"][dom][c].get(m, 0),
                )
                for m in names
            ]
            lines.append(f"| {dom} | {c} | {counts['cases'][dom]} | " + " | ".join(cells) + " |")
    n_dom = len(result["per_domain"])
    for c in classes:
        cells = [
            cell(
                result["macro"][c].get(m, _NAN),
                result["macro_sd"][c].get(m, _NAN),
                counts["domains_skipped"][c].get(m, 0),
            )
            for m in names
        ]
        lines.append(
            f"| **macro ({n_dom} {group}s)** | {c} | {sum(counts['cases'].values())} | "
            + " | ".join(cells)
            + " |"
        )
    mean_cells = [fmt(result["mean_over_classes"].get(m, _NAN)) for m in names]
    lines.append("| **mean over classes** | all | | " + " | ".join(mean_cells) + " |")
    lines.append("")
    key = result.get("selection_metric", "dice")
    lines.append(f"Model-selection score, mean {key} (macro over {group}s, mean over classes): "
                 f"{fmt(result['mean_dice'])}")
    lines.append(
        f"Macro = mean over {group}s of per-{group} means; ± is the SD over cases ({group} rows) or over "
        f"{group} means (macro rows). (k skipped) = NaN values left out: cases ({group} rows) or "
        f"{group}s (macro rows); see MetricPolicy for the empty-mask rules."
    )
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- torch, on device


def batch_dice(
    pred_bin: torch.Tensor,
    gt_bin: torch.Tensor,
    policy: MetricPolicy = DEFAULT_POLICY,
    smoothed: bool = False,
) -> torch.Tensor:
    """Per-sample, per-class Dice on the device: ``(B, F, *spatial)`` -> float32 ``(B, F)``.

    ``smoothed=False``: medpy ``dc`` with ``policy.both_empty_dice`` (None -> NaN) when both empty.
    ``smoothed=True``: :func:`smoothed_dice` with ``policy.smoothed_empty_rule``. No host sync.
    """
    if pred_bin.shape != gt_bin.shape:
        raise ValueError(
            f"prediction shape {tuple(pred_bin.shape)} differs from target {tuple(gt_bin.shape)}"
        )
    if pred_bin.dim() < 3:
        raise ValueError(f"expected (B, F, *spatial), got shape {tuple(pred_bin.shape)}")
    p, g = pred_bin.bool(), gt_bin.bool()
    dims = tuple(range(2, p.dim()))
    inter = (p & g).sum(dim=dims).to(torch.float32)
    total = (p.sum(dim=dims) + g.sum(dim=dims)).to(torch.float32)
    both_empty = total == 0
    if smoothed:
        value = (2.0 * inter + 1.0) / (total + 1.001)
        if policy.smoothed_empty_rule == "ust":
            value = torch.where(both_empty, torch.zeros_like(value), value)
        return value
    value = 2.0 * inter / total.clamp_min(1.0)
    fill = _nan_if_none(policy.both_empty_dice)
    return torch.where(both_empty, torch.full_like(value, fill), value)
