"""``medsemi runs [DIR]``: what has been trained under ``runs/`` (or DIR), one line per run directory.

A run directory is a folder holding ``config.yaml`` (written by ``medsemi train`` before the first step).
What is read, none of it able to run code:

- ``config.yaml`` (``yaml.safe_load``): method, dataset, ``train.iterations``;
- ``checkpoints/last.pt`` (``torch.load(weights_only=True, mmap=True)``): the iteration the run can resume
  from and the best-on-test / best-on-validation scores with their iterations;
- ``metrics.jsonl``: the last evaluation's test score (and the best scores when there is no ``last.pt``).

- ``run.lock`` (JSON, ``medsemi.run_lock``): which process is training there now.

Status: ``running`` (``run.lock`` names a process that still runs on this machine, or any process on
another machine, which cannot be checked from here; the note says which and when the run last logged),
``finished`` (last.pt at the configured iterations), ``interrupted`` (last.pt before them:
``medsemi train --resume DIR`` continues), ``failed`` (files but neither a readable ``last.pt`` nor a
readable ``last.prev.pt``, the one resume falls back to: nothing to resume from). A lock whose process is
gone is stale: the status is then read from the checkpoints and the note says so.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from medsemi.checkpoints import CheckpointError, load_checkpoint
from medsemi.engine.trainer import format_eta
from medsemi.run_lock import read_lock

MAX_DEPTH = 4  # runs/compare/<method>/<seed> nests run directories


@dataclass
class RunSummary:
    name: str
    method: str | None
    dataset: str | None
    iteration: int | None
    iterations: int | None
    best_test: float | None
    best_test_iteration: int | None
    best_val: float | None
    best_val_iteration: int | None
    last_score: float | None
    last_score_iteration: int | None
    status: str
    note: str = ""


def find_run_dirs(root: Path, depth: int = MAX_DEPTH) -> list[Path]:
    """Folders under ``root`` holding ``config.yaml`` (not searched further), sorted."""
    if (root / "config.yaml").is_file():
        return [root]
    if depth == 0 or not root.is_dir():
        return []
    found: list[Path] = []
    for child in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        found.extend(find_run_dirs(child, depth - 1))
    return found


def _score(value: Any) -> float | None:
    """A finite score, else None (-inf = never evaluated; a NaN is not a result)."""
    if isinstance(value, (int, float)) and math.isfinite(value):
        return float(value)
    return None


def _read_metrics(path: Path, upto: int | None) -> list[dict]:
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a crash
        if isinstance(rec, dict) and (upto is None or rec.get("iteration", 0) <= upto):
            records.append(rec)
    return records


def summarise_run(run_dir: Path, root: Path) -> RunSummary:
    name = str(run_dir.relative_to(root)) if run_dir != root else run_dir.name
    note = ""
    try:
        cfg = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        cfg, note = {}, f"config.yaml unreadable ({str(err).splitlines()[0]})"
    data = cfg.get("data") or {}
    dataset = data.get("format")
    if dataset and data.get("root"):
        dataset = f"{dataset}:{Path(str(data['root'])).name}"
    total = (cfg.get("train") or {}).get("iterations")
    last_pt = run_dir / "checkpoints" / "last.pt"
    state: dict | None = None
    if last_pt.is_file():
        try:
            state = load_checkpoint(last_pt, mmap=True)
        except CheckpointError as err:
            note = str(err)
    previous = run_dir / "checkpoints" / "last.prev.pt"
    if state is None and previous.is_file():  # `train --resume` falls back to it
        try:
            state = load_checkpoint(previous, mmap=True)
            note = "last.pt missing or unreadable: resumes from last.prev.pt"
        except CheckpointError:
            pass
    iteration = int(state["iteration"]) if state and "iteration" in state else None
    records = _read_metrics(run_dir / "metrics.jsonl", iteration)
    evals = [r for r in records if r.get("kind") == "eval"]
    best = (state or {}).get("best") or {}
    if not best and evals:
        best = {s: {"score": max((r[f"best_{s}_dice"] for r in evals if f"best_{s}_dice" in r), default=None)}
                for s in ("test", "val")}
    last = evals[-1] if evals else {}
    if state is None:
        status = "failed"
        iteration = max((int(r.get("iteration", 0)) for r in records), default=0) if records else None
        note = note or "no checkpoints/last.pt or last.prev.pt: cannot be resumed"
    elif total is not None and iteration is not None and iteration >= int(total):
        status = "finished"
    else:
        status = "interrupted"
        note = note or f"resume: medsemi train --resume {run_dir}"
    status, note = _apply_lock(run_dir, status, note)
    return RunSummary(
        name=name, method=(cfg.get("method") or {}).get("name"), dataset=dataset, iteration=iteration,
        iterations=int(total) if total is not None else None,
        best_test=_score((best.get("test") or {}).get("score")),
        best_test_iteration=(best.get("test") or {}).get("iteration"),
        best_val=_score((best.get("val") or {}).get("score")),
        best_val_iteration=(best.get("val") or {}).get("iteration"),
        last_score=_score(last.get("test_student_dice")), last_score_iteration=last.get("iteration"),
        status=status, note=note,
    )


def _apply_lock(run_dir: Path, status: str, note: str) -> tuple[str, str]:
    """``running`` when ``run.lock`` names a live (or unverifiable) trainer; a stale lock goes in the note."""
    holder = read_lock(run_dir)
    if holder is None:
        return status, note
    alive = holder.alive()
    if alive is False:
        return status, f"stale run.lock ({holder.describe()}, no longer running); " + note
    idle = holder.last_activity()
    since = "" if idle is None else f", last logged {format_eta(idle)} ago"
    if alive:
        return "running", f"training: {holder.describe()}{since}"
    return "running", (f"run.lock names {holder.describe()}{since}, which cannot be checked from here "
                       "(if that run was killed, `medsemi train --resume` takes over)")


def list_runs(root: str | Path = "runs") -> list[RunSummary]:
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such folder (medsemi train writes runs under output_dir, default runs/)")
    return [summarise_run(d, root) for d in find_run_dirs(root)]


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.4f}"


def runs_table(runs: list[RunSummary]) -> str:
    header = ["run", "method", "dataset", "iterations", "best test", "best val", "last test", "status"]
    rows = [header]
    for r in runs:
        its = f"{'-' if r.iteration is None else r.iteration}/{'-' if r.iterations is None else r.iterations}"
        status = r.status + (" (resumable)" if r.status == "interrupted" else "")
        rows.append([r.name, r.method or "-", r.dataset or "-", its, _fmt(r.best_test), _fmt(r.best_val),
                     _fmt(r.last_score), status])
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    notes = [f"  {r.name}: {r.note}" for r in runs if r.note and r.status != "finished"]
    return "\n".join(lines + (["", "notes:", *notes] if notes else []))


def runs_json(runs: list[RunSummary]) -> str:
    return json.dumps([asdict(r) for r in runs], indent=2)
