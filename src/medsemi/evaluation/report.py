"""What a run's report shows: ``report.md`` text, ``curves.png`` and prediction overlays
(``overlays/<domain>.png``). :mod:`medsemi.workflows.evaluate_run` evaluates a run and writes them."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from medsemi.config import Config
from medsemi.data.contract import LabelSpec
from medsemi.evaluation.evaluate import overlay, predict_labels
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


def plot_curves(run_dir: Path, group: str = "domain") -> Path | None:
    """``curves.png``: training losses and evaluation Dice; ``group`` names what the macro mean is over
    (``domain``, or ``task`` for multi-task data)."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for key in ("loss", "loss_sup", "loss_unsup"):
        pts = [(r["iteration"], r[key]) for r in train if key in r]
        if pts:
            axes[0].plot(*zip(*pts), label=key)
    axes[0].set_xlabel("iteration")
    axes[0].set_title("training loss")
    axes[0].legend()
    for key in sorted({k for r in evals for k in r if k.endswith("_dice") and not k.startswith("best")}):
        pts = [(r["iteration"], r[key]) for r in evals if key in r]
        axes[1].plot(*zip(*pts), marker="o", label=key)
    axes[1].set_xlabel("iteration")
    axes[1].set_title(f"mean Dice (macro over {group}s)")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    out = run_dir / "curves.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def write_overlays(
    model: nn.Module, test_data: dict[str, dict], spec: LabelSpec, out_dir: Path, count: int
) -> list[Path]:
    """One strip of ``count`` prediction overlays per test domain: ``out_dir/<domain>.png``."""
    from PIL import Image

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for domain, data in test_data.items():
        n = min(count, len(data["image"]))
        if n == 0:
            continue
        pred = predict_labels(model, data["image"][:n], spec, batch_size=n)
        tiles = [overlay(data["image"][i], data["label"][i], pred[i], spec) for i in range(n)]
        strip = np.concatenate(tiles, axis=1)
        zoom = max(1, -(-192 // strip.shape[0]))  # small patches are enlarged (nearest) to be readable
        strip = strip.repeat(zoom, axis=0).repeat(zoom, axis=1)
        Image.fromarray(strip).save(out_dir / f"{domain}.png")
        written.append(out_dir / f"{domain}.png")
    return written


def _fmt(value: float) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"


def _policy(cfg: Config, family: Any) -> MetricPolicy:
    """The empty-mask rule the family scored with (VerSemi's own for 3D volumes, else the eval section)."""
    return family.metric_policy(cfg) if hasattr(family, "metric_policy") else policy_from_eval(cfg.eval)


def _policy_name(cfg: Config, family: Any) -> str:
    if _policy(cfg, family) == MetricPolicy.versemi():
        return "VerSemi's rule, data.options.metric_policy=versemi; the original's calculate_metric_percase"
    return "the eval section's rule"


def render_report(cfg: Config, results: dict[str, Any], splits: Any) -> str:
    """``report.md`` of an evaluated run; ``splits`` is the dataset family (``info``, ``summary()``)."""
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
    return "\n".join(lines)
