"""What a run's report shows: ``report.md`` text, ``curves.png`` and prediction overlays
(``overlays/<domain>.png``, ``overlays/<task>.png`` for volumes). :mod:`medsemi.workflows.evaluate_run`
evaluates a run and writes them."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from medsemi.config import Config
from medsemi.data.contract import LabelSpec
from medsemi.evaluation.evaluate import predict_labels
from medsemi.metrics import MetricPolicy, format_table, policy_from_eval

CHECKPOINTS = {
    "best_test": ("best_test.pt", "student selected on the test set every eval (the papers' protocol; "
                  "two-stage VerSemi: the stage-2 best)"),
    "best_test_stage1": ("best_test_stage1.pt", "two-stage VerSemi: student selected on the test set during "
                         "stage 1 (the original keeps a best per stage)"),
    "best_val": ("best_val.pt", "student selected on the validation split (honest protocol)"),
    "last_student": ("last.pt", "student at the last iteration"),
    "last_teacher": ("last.pt", "EMA teacher at the last iteration"),
}


def plot_curves(run_dir: Path, group: str = "domain", out_dir: Path | None = None) -> Path | None:
    """``curves.png`` in ``out_dir`` (default: the run directory), from the run's ``metrics.jsonl``: the
    training losses (total, supervised and every unlabelled term) and the test Dice per ``group``
    (``domain``, or ``task`` for multi-task data) of the student, with its macro mean, on a 0-1 axis."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    fig = curves_figure(records, group)
    out = (run_dir if out_dir is None else out_dir) / "curves.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def curves_figure(records: list[dict], group: str = "domain") -> Any:
    """The matplotlib figure of :func:`plot_curves` from ``metrics.jsonl`` records."""
    import matplotlib.pyplot as plt

    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    loss_keys = [k for k in dict.fromkeys(k for r in train for k in r) if k == "loss" or k.startswith("loss_")]
    for key in loss_keys:
        pts = [(r["iteration"], r[key]) for r in train if key in r]
        axes[0].plot(*zip(*pts), label=key, lw=2 if key == "loss" else 1)
    axes[0].set_xlabel("iteration")
    axes[0].set_title("training losses (loss_sup: labelled; the other loss_*: unlabelled terms)", fontsize=9)
    if loss_keys:
        axes[0].legend(fontsize=7)
    dice_keys = [k for k in dict.fromkeys(k for r in evals for k in r) if k.startswith("test_student_dice")]
    for key in dice_keys:
        pts = [(r["iteration"], r[key]) for r in evals if key in r]
        macro = key == "test_student_dice"
        label = "macro mean" if macro else key.removeprefix("test_student_dice_")
        axes[1].plot(*zip(*pts), marker="o", ms=3, lw=2.5 if macro else 1, color="black" if macro else None,
                      label=label)
    axes[1].set_ylim(0, 1)
    axes[1].set_xlabel("iteration")
    axes[1].set_ylabel("Dice (mean over classes)")
    axes[1].set_title(f"student test Dice per {group}", fontsize=9)
    if dice_keys:
        axes[1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    return fig


CLASS_COLOURS = ((0.12, 0.47, 0.71), (1.0, 0.5, 0.05), (0.17, 0.63, 0.17), (0.84, 0.15, 0.16),
                 (0.58, 0.4, 0.74), (0.55, 0.34, 0.29), (0.89, 0.47, 0.76), (0.09, 0.75, 0.81))


def case_dice(pred: np.ndarray, gt: np.ndarray) -> float:
    """Mean over foreground classes of a case's Dice (both masks empty: 1), for choosing and labelling overlays."""
    inter = (pred & gt).reshape(len(pred), -1).sum(1)
    total = pred.reshape(len(pred), -1).sum(1) + gt.reshape(len(gt), -1).sum(1)
    return float(np.mean(np.where(total > 0, 2 * inter / np.maximum(total, 1), 1.0)))


def pick_cases(dice: list[float], count: int) -> tuple[list[int], list[int]]:
    """The indices of the first ``count`` cases and of the ``count`` with the lowest Dice (worst first)."""
    n = min(count, len(dice))
    return list(range(n)), [int(i) for i in np.argsort(np.asarray(dice), kind="stable")[:n]]


def _picture(image: np.ndarray) -> np.ndarray:
    img = ((image + 1) * 0.5).clip(0, 1)
    return img[:3].transpose(1, 2, 0) if img.shape[0] == 3 else np.repeat(img[:1], 3, axis=0).transpose(1, 2, 0)


def _draw(ax: Any, rgb: np.ndarray, masks: np.ndarray, title: str) -> None:
    """The image with each class filled (translucent) and outlined in its colour."""
    from scipy import ndimage

    out = rgb.copy()
    for c in sorted(range(len(masks)), key=lambda k: -int(masks[k].sum())):  # larger first: a cup inside a disc shows
        m = masks[c]
        colour = np.asarray(CLASS_COLOURS[c % len(CLASS_COLOURS)])
        out[m] = 0.55 * out[m] + 0.45 * colour
        out[m & ~ndimage.binary_erosion(m)] = colour
    ax.imshow(out, interpolation="nearest")
    ax.set_title(title, fontsize=7)
    ax.set_xticks([])
    ax.set_yticks([])


@dataclass
class OverlayCase:
    """One tile pair of an overlay page: the picture, per-class ground-truth and predicted masks
    ``(F, H, W)`` bool, and the case's Dice (mean over classes)."""

    name: str
    rgb: np.ndarray
    gt: np.ndarray
    pred: np.ndarray
    dice: float


def overlay_page(cases: list[OverlayCase], count: int, class_names: tuple[str, ...], title: str,
                 path: Path) -> Path | None:
    """``path``: the first ``count`` cases and the ``count`` worst (lowest Dice), each as ground truth beside
    prediction, classes in distinct colours, with a legend, the case name and its Dice (None: no cases)."""
    if not cases or count <= 0:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    handles = [Patch(color=CLASS_COLOURS[c % len(CLASS_COLOURS)], label=n) for c, n in enumerate(class_names)]
    first, worst = pick_cases([c.dice for c in cases], count)
    fig, axes = plt.subplots(2, 2 * len(first), figsize=(3.2 * len(first) + 0.5, 4.2), squeeze=False)
    for row, (kind, picks) in enumerate((("first", first), ("worst", worst))):
        for j, i in enumerate(picks):
            case = cases[i]
            label = f"{kind}: {case.name}" if len(case.name) <= 24 else f"{kind}:\n{case.name}"  # fits the tile
            _draw(axes[row, 2 * j], case.rgb, case.gt, f"{label}\nground truth")
            _draw(axes[row, 2 * j + 1], case.rgb, case.pred, f"prediction\nDice {case.dice:.3f}")
            axes[row, 2 * j + 1].legend(handles=handles, fontsize=5, loc="lower right", framealpha=0.7,
                                        handlelength=1, borderpad=0.3)
    fig.suptitle(f"{title}: first {len(first)} and worst {len(worst)} test cases (Dice = mean over classes)",
                 fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_overlays(
    model: nn.Module, test_data: dict[str, dict], spec: LabelSpec, out_dir: Path, count: int
) -> list[Path]:
    """One picture per test domain, ``out_dir/<domain>.png`` (:func:`overlay_page`)."""
    written = []
    for domain, data in test_data.items():
        total = len(data["image"])
        if total == 0 or count <= 0:
            continue
        pred = predict_labels(model, data["image"], spec, batch_size=max(1, min(total, 16)))
        pred_bin = spec.to_binary(pred).cpu().numpy()
        gt_bin = spec.to_binary(data["label"]).cpu().numpy()
        cases = [OverlayCase(Path(str(data["name"][i])).name, _picture(data["image"][i].float().cpu().numpy()),
                             gt_bin[i], pred_bin[i], case_dice(pred_bin[i], gt_bin[i])) for i in range(total)]
        path = overlay_page(cases, count, spec.foreground_names, domain, out_dir / f"{domain}.png")
        if path is not None:
            written.append(path)
    return written


def volume_overlay_case(name: str, image: np.ndarray, gt: np.ndarray, pred: np.ndarray, dice: float
                        ) -> OverlayCase:
    """The slice along the last axis with the most ground truth (else prediction, else the middle) of a
    ``(X, Y, Z)`` volume, its intensities scaled to the slice's range, as an :class:`OverlayCase`."""
    area = gt.reshape(-1, gt.shape[-1]).sum(0)
    if not area.any():
        area = pred.reshape(-1, pred.shape[-1]).sum(0)
    z = int(area.argmax()) if area.any() else gt.shape[-1] // 2
    plane = image[..., z].astype(np.float32)
    lo, hi = float(plane.min()), float(plane.max())
    plane = (plane - lo) / (hi - lo) * 2 - 1 if hi > lo else np.zeros_like(plane)
    return OverlayCase(f"{name} (z={z})", _picture(plane[None]), gt[None, ..., z].astype(bool),
                       pred[None, ..., z].astype(bool), dice)


def _fmt(value: float) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"


def _policy(cfg: Config, family: Any) -> MetricPolicy:
    """The empty-mask rule the family scored with (VerSemi's own for 3D volumes, else the eval section)."""
    return family.metric_policy(cfg) if hasattr(family, "metric_policy") else policy_from_eval(cfg.eval)


def _policy_name(cfg: Config, family: Any) -> str:
    if _policy(cfg, family) == MetricPolicy.versemi():
        return "VerSemi's rule, data.options.metric_policy=versemi; the original's calculate_metric_percase"
    return "the eval section's rule"


def render_report(cfg: Config, results: dict[str, Any], splits: Any, overlays: list[str] | None = None) -> str:
    """``report.md`` of an evaluated run; ``splits`` is the dataset family (``info``, ``summary()``);
    ``overlays``: the overlay pictures' paths relative to the report, linked under "Overlays"."""
    tasks = splits.info.extra.get("tasks")  # multi-task volume data has tasks, not a labelled domain
    setting = (f"Tasks {', '.join(tasks.values())}" if tasks else f"Labelled domain {cfg.data.lb_domain}")
    lines = [
        f"# {cfg.name}: {cfg.method.name} on {splits.info.name}",
        "",
        f"{setting}, splits {json.dumps(splits.summary())}.",
        ("Metrics per case and class, averaged per task, then macro over tasks (HD95/ASD in voxels; "
         "policies in the README)." if tasks else "Metrics per image and class, averaged per domain, then "
         "macro over domains (HD95/ASD in pixels; policies in the README)."),
        f"Empty masks ({_policy_name(cfg, splits)}): {_policy(cfg, splits).describe()}.",
        *(["**BatchNorm statistics re-estimated per test domain on its unlabelled training images "
           "(eval.bn_adaptation, AdaBN; not the papers' protocol).**"] if cfg.eval.bn_adaptation else []),
        "",
        "| checkpoint | iteration | mean Dice | mean Jaccard | mean HD95 | mean ASD |",
        "|---|---|---|---|---|---|",
    ]
    for which, res in results.items():
        m = res["mean_over_classes"]
        lines.append(
            f"| {which} | {res.get('iteration', '')} | {_fmt(m.get('dice'))} | {_fmt(m.get('jaccard'))} "
            f"| {_fmt(m.get('hd95'))} | {_fmt(m.get('asd'))} |"
        )
    for which, res in results.items():
        about = CHECKPOINTS[which][1] if which in CHECKPOINTS else f"model file {res.get('file', which)}"
        lines += ["", f"## {which}: {about}", "", format_table(res, ("dice", "jaccard", "hd95", "asd"),
                                                                  group="task" if tasks else "domain")]
    lines += ["", "![curves](curves.png)", ""]
    if overlays:
        lines += ["## Overlays", "", "First and worst test cases, ground truth beside prediction:", ""]
        lines += [f"- [{Path(o).stem}]({o})" for o in overlays] + [""]
    return "\n".join(lines)
