"""Evaluate a finished (or running) run directory and write ``eval.json``, ``report.md``,
``curves.png`` and prediction overlays (``overlays/<domain>.png``)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from medsemi.config import Config, load_config
from medsemi.data.datasets import Splits
from medsemi.engine.checkpoint import load_checkpoint
from medsemi.engine.sources import cache_dataset
from medsemi.evaluation.evaluate import evaluate_networks, overlay, predict_labels
from medsemi.metrics import format_table

CHECKPOINTS = {
    "best_test": ("best_test.pt", "student selected on the test set every eval (the papers' protocol)"),
    "best_val": ("best_val.pt", "student selected on the validation split (honest protocol)"),
    "last_student": ("last.pt", "student at the last iteration"),
    "last_teacher": ("last.pt", "EMA teacher at the last iteration"),
}


def load_network(
    run_dir: Path, which: str, cfg: Config, splits: Splits, device: torch.device
) -> tuple[nn.Module, int] | None:
    """The network of one checkpoint role and the iteration it was saved at, or None when the run has
    no such checkpoint."""
    from medsemi.nets.build import build_model

    file, _ = CHECKPOINTS[which]
    path = run_dir / "checkpoints" / file
    if not path.exists():
        return None
    state = load_checkpoint(path, map_location=device)
    model = build_model(cfg.model, splits.info).to(device)
    iteration = int(state["iteration"])
    if which.startswith("best"):
        model.load_state_dict(state["model"])
        return model, iteration
    prefix = "student." if which == "last_student" else "teacher."
    sub = {k[len(prefix) :]: v for k, v in state["method"].items() if k.startswith(prefix)}
    if not sub:
        return None
    sub = {k.replace("_orig_mod.", ""): v for k, v in sub.items()}
    model.load_state_dict(sub)
    return model, iteration


def plot_curves(run_dir: Path) -> Path | None:
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
    axes[1].set_title("mean Dice (macro over domains)")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    out = run_dir / "curves.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def write_overlays(model: nn.Module, test_data: dict[str, dict], splits: Splits, out_dir: Path, count: int) -> None:
    from PIL import Image

    out_dir.mkdir(parents=True, exist_ok=True)
    spec = splits.info.label_spec
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


def _fmt(value: float) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"


def render_report(cfg: Config, results: dict[str, Any], splits: Splits) -> str:
    lines = [
        f"# {cfg.name}: {cfg.method.name} on {splits.info.name}",
        "",
        f"Labelled domain {cfg.data.lb_domain}, splits {json.dumps(splits.summary())}.",
        "Metrics per image and class, averaged per domain, then macro over domains "
        "(HD95/ASD in pixels; policies in the README).",
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
        lines += ["", f"## {which}: {CHECKPOINTS[which][1]}", "", format_table(res, ("dice", "jaccard", "hd95", "asd"))]
    lines += ["", "![curves](curves.png)", ""]
    return "\n".join(lines)


def evaluate_run(
    run_dir: str | Path,
    which: tuple[str, ...] = tuple(CHECKPOINTS),
    device: str = "auto",
    splits: Splits | None = None,
    cfg: Config | None = None,
    out_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Evaluate the chosen checkpoints of a run with every metric; write the report files into
    ``out_dir`` (default: the run directory)."""
    from medsemi.data.build import build_splits
    from medsemi.engine.trainer import policy_from_config, resolve_device

    run_dir = Path(run_dir)
    out = Path(out_dir) if out_dir else run_dir
    out.mkdir(parents=True, exist_ok=True)
    cfg = cfg or load_config(run_dir / "config.yaml")
    dev = resolve_device(device)
    splits = splits or build_splits(cfg)
    own_eval = hasattr(splits, "evaluate")  # 3D datasets evaluate themselves (sliding window per task)
    test_data = {} if own_eval else {d: cache_dataset(ds, dev) for d, ds in splits.test.items()}
    policy = policy_from_config(cfg)
    adapt_images = None
    if cfg.eval.bn_adaptation and not own_eval:
        from medsemi.evaluation.adabn import images_by_domain

        pool = cache_dataset(splits.unlabelled, dev, with_label=False)
        adapt_images = images_by_domain(pool, splits.info.domains)
    results: dict[str, Any] = {}
    for role in which:
        loaded = load_network(run_dir, role, cfg, splits, dev)
        if loaded is None:
            continue
        model, iteration = loaded
        surface = cfg.eval.surface_metrics != "never"
        if own_eval:
            res = splits.evaluate({role: model}, cfg, dev, surface=surface, amp="off")["test"][role]
        else:
            res = evaluate_networks({role: model}, test_data, splits.info.label_spec, policy,
                                    cfg.eval.batch_size, surface=surface,
                                    selection_metric=cfg.eval.selection_metric,
                                    adapt_images=adapt_images)[role]
        res["iteration"] = iteration
        results[role] = res
        if not own_eval and (role == "best_test" or (role == "last_student" and "best_test" not in results)):
            write_overlays(model, test_data, splits, out / "overlays", cfg.eval.overlays)
    if not results:
        raise FileNotFoundError(f"{run_dir}: no checkpoint to evaluate (looked for {sorted(set(CHECKPOINTS))})")
    plot_curves(run_dir)
    (out / "eval.json").write_text(json.dumps(results, indent=1, default=float))
    (out / "report.md").write_text(render_report(cfg, results, splits))
    return results
