"""Evaluate a finished (or running) run directory: every checkpoint role with every metric, then ``eval.json``,
``report.md``, ``curves.png`` and prediction overlays (``overlays/<domain>.png``, ``overlays/<task>.png`` for
volumes)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medsemi.checkpoints import load_checkpoint
from medsemi.config import Config, apply_overrides, config_differences, config_from_dict, load_config
from medsemi.data.contract import DatasetInfo
from medsemi.device import resolve_device
from medsemi.evaluation.report import CHECKPOINTS, plot_curves, render_report
from medsemi.families.base import DatasetFamily
from medsemi.families.select import build_family
from medsemi.nets.build import build_model


def load_network(
    run_dir: Path, which: str, cfg: Config, info: DatasetInfo, device: torch.device
) -> tuple[nn.Module, int] | None:
    """The network of one checkpoint role and the iteration it was saved at, or None when the run has
    no such checkpoint."""
    file, _ = CHECKPOINTS[which]
    path = run_dir / "checkpoints" / file
    if not path.exists():
        return None
    state = load_checkpoint(path, map_location=device)
    model = build_model(cfg.model, info).to(device)
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



def differences_from_training(run_dir: str | Path, cfg: Config, which: tuple[str, ...]) -> list[str]:
    """What makes this evaluation differ from the one training wrote (``eval.bn_adaptation=True``,
    a subset of checkpoints, ...); empty when it is the same evaluation."""
    diffs = [f"{k}={b}" for k, _, b in config_differences(load_config(Path(run_dir) / "config.yaml"), cfg)]
    if set(which) != set(CHECKPOINTS):
        diffs.insert(0, "+".join(which))
    return diffs


def default_out_dir(run_dir: str | Path, cfg: Config, which: tuple[str, ...]) -> tuple[Path, list[str]]:
    """Where ``medsemi evaluate`` writes without ``--out``: the run directory for the evaluation training
    did, else ``RUN_DIR/evaluations/<what differs>/`` so that the run's own report is never replaced."""
    diffs = differences_from_training(run_dir, cfg, which)
    if not diffs:
        return Path(run_dir), []
    label = re.sub(r"[^A-Za-z0-9_.=+-]+", "-", ",".join(diffs)).strip("-")[:120]
    return Path(run_dir) / "evaluations" / label, diffs


def evaluate_run(
    run_dir: str | Path,
    which: tuple[str, ...] = tuple(CHECKPOINTS),
    device: str = "auto",
    family: DatasetFamily | None = None,
    cfg: Config | None = None,
    out_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Evaluate the chosen checkpoints of a run with every metric; write the report files into
    ``out_dir`` (default: the run directory). ``family``: the run's dataset, when already built."""
    run_dir = Path(run_dir)
    out = Path(out_dir) if out_dir else run_dir
    out.mkdir(parents=True, exist_ok=True)
    cfg = cfg or load_config(run_dir / "config.yaml")
    dev = resolve_device(device)
    family = family or build_family(cfg)
    results: dict[str, Any] = {}
    overlays: list[Path] = []
    for role in which:
        loaded = load_network(run_dir, role, cfg, family.info, dev)
        if loaded is None:
            continue
        model, iteration = loaded
        surface = cfg.eval.surface_metrics != "never"
        res = family.evaluate({role: model}, cfg, dev, surface=surface, amp="off", validation=False)["test"][role]
        res["iteration"] = iteration
        results[role] = res
        if role == "best_test" or (role == "last_student" and "best_test" not in results):
            overlays = family.write_overlays(model, cfg, dev, out / "overlays")
    if not results:
        raise FileNotFoundError(f"{run_dir}: no checkpoint to evaluate (looked for {sorted(set(CHECKPOINTS))})")
    plot_curves(run_dir, "task" if family.info.extra.get("tasks") else "domain", out)  # beside report.md
    (out / "eval.json").write_text(json.dumps(results, indent=1, default=float))
    links = [p.relative_to(out).as_posix() for p in overlays]
    (out / "report.md").write_text(render_report(cfg, results, family, overlays=links))
    return results


def evaluate_model_file(
    path: str | Path, overrides: list[str] | None = None, device: str = "auto", out_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Evaluate one model checkpoint file (``iter_<k>.pt``, ``best_*.pt``, an imported checkpoint) with the
    config stored in it plus ``overrides`` (e.g. ``data.root=...``); writes ``eval.json`` and ``report.md``
    into ``out_dir`` (default: ``<file without .pt>_eval/`` beside it)."""
    path = Path(path)
    state = load_checkpoint(path, map_location="cpu")
    if "model" not in state or "config" not in state:
        raise ValueError(f"{path}: not a model checkpoint (best_*.pt, iter_<k>.pt or an imported one)")
    cfg = config_from_dict(apply_overrides(dict(state["config"]), overrides))
    out = Path(out_dir) if out_dir else path.with_name(path.stem + "_eval")
    out.mkdir(parents=True, exist_ok=True)
    dev = resolve_device(device)
    family = build_family(cfg)
    model = build_model(cfg.model, family.info).to(dev)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as err:
        raise ValueError(f"{path}: the weights do not fit the configured network ({err})") from err
    role = path.stem
    surface = cfg.eval.surface_metrics != "never"
    res = family.evaluate({role: model}, cfg, dev, surface=surface, amp="off", validation=False)["test"][role]
    res["iteration"] = int(state.get("iteration", 0))
    res["file"] = str(path)
    results = {role: res}
    (out / "eval.json").write_text(json.dumps(results, indent=1, default=float))
    (out / "report.md").write_text(render_report(cfg, results, family))
    return results
