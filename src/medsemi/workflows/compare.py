"""``medsemi bench compare`` and ``medsemi demo``: several methods × seeds on one config, a
comparison table (Markdown + CSV, mean ± sd over seeds, per domain and class, both model-selection
protocols) and a bar chart."""

from __future__ import annotations

import csv
import json
import math
import time
from pathlib import Path

import numpy as np

from medsemi.config import find_config, load_config
from medsemi.engine.trainer import format_eta

METRICS = ("dice", "jaccard", "hd95", "asd")


def method_overrides(method: str) -> list[str]:
    """Overrides for a method entry of ``--methods``: a registered name, or a *variant*
    ``name:key=value[:key=value...]`` (e.g. ``versemi:pipeline=released_main``) that sets
    ``method.<key>`` options on top of the config."""
    name, *options = method.split(":")
    if not name:
        raise ValueError(f"--methods entry {method!r} has no method name")
    bad = [o for o in options if "=" not in o or not o.split("=", 1)[0]]
    if bad:
        raise ValueError(f"--methods entry {method!r}: options must look like key=value, got {bad}")
    return [f"method.name={name}", *(f"method.{o}" for o in options)]


def run_label(method: str) -> str:
    """A file-name-safe label for a method entry (variants keep their options readable)."""
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in method)


def train_and_evaluate(config: Path, method: str, seed: int, run_dir: Path, overrides: list[str]) -> dict:
    from medsemi.engine.trainer import Trainer
    from medsemi.workflows.evaluate_run import evaluate_run

    if (run_dir / "eval.json").exists():  # finished earlier: reuse (compare runs are resumable)
        return json.loads((run_dir / "eval.json").read_text())
    cfg = load_config(config, [*overrides, *method_overrides(method), f"seed={seed}"])
    cfg.name = f"{cfg.name}-{run_label(method)}-s{seed}"
    resume = (run_dir / "checkpoints" / "last.pt").exists()
    trainer = Trainer(cfg, run_dir, resume=resume)
    trainer.fit()
    if not trainer.finished:  # interrupted (Ctrl-C / SIGTERM): the checkpoint is written, stop here
        raise SystemExit(f"interrupted in {run_dir}; run the same command again to resume")
    return evaluate_run(run_dir, cfg=cfg, family=trainer.family, device=str(trainer.device))


def _mean_sd(values: list[float]) -> tuple[float, float]:
    arr = np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=float)
    if arr.size == 0:
        return math.nan, math.nan
    return float(arr.mean()), float(arr.std(ddof=1)) if arr.size > 1 else 0.0


def summarise(results: dict[str, list[dict]], protocol: str) -> list[dict]:
    """Rows ``{method, scope, class, metric, mean, sd, n}`` over seeds for one checkpoint role."""
    rows = []
    for method, runs in results.items():
        runs = [r[protocol] for r in runs if protocol in r]
        if not runs:
            continue
        domains = list(runs[0]["per_domain"])
        classes = list(runs[0]["macro"])
        for scope in [*domains, "macro"]:
            for cls in classes:
                for metric in METRICS:
                    vals = [
                        (r["macro"] if scope == "macro" else r["per_domain"][scope])[cls].get(metric, math.nan)
                        for r in runs
                    ]
                    mean, sd = _mean_sd(vals)
                    rows.append({"protocol": protocol, "method": method, "scope": scope, "class": cls,
                                 "metric": metric, "mean": mean, "sd": sd, "n": len(vals)})
    return rows


def _cell(rows: list[dict], method: str, scope: str, metric: str) -> str:
    sel = [r for r in rows if r["method"] == method and r["scope"] == scope and r["metric"] == metric]
    if not sel:
        return "—"
    return " / ".join("—" if math.isnan(r["mean"]) else f"{r['mean']:.3f}" if r["n"] < 2
                      else f"{r['mean']:.3f}±{r['sd']:.3f}" for r in sel)  # no "± 0.000" for one seed


def render_markdown(rows: list[dict], methods: list[str], protocol: str, setting: str) -> str:
    scopes = list(dict.fromkeys(r["scope"] for r in rows))
    classes = list(dict.fromkeys(r["class"] for r in rows))
    seeds = max((r["n"] for r in rows), default=0)
    stat = "mean±sd over seeds" if seeds > 1 else "one seed, no spread"
    lines = [f"### {protocol} ({setting}; cells: {' / '.join(classes)}, {stat})", ""]
    header = " | ".join(f"Dice {s}" for s in scopes)
    lines.append(f"| method | {header} | Jaccard macro | HD95 macro | ASD macro |")
    lines.append("|---" * (len(scopes) + 4) + "|")
    for m in methods:
        cells = [_cell(rows, m, s, "dice") for s in scopes]
        cells += [_cell(rows, m, "macro", k) for k in ("jaccard", "hd95", "asd")]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def bar_chart(rows: list[dict], methods: list[str], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dice = [r for r in rows if r["metric"] == "dice"]
    scopes = list(dict.fromkeys(r["scope"] for r in dice))
    width = 0.8 / max(len(methods), 1)
    fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(scopes)), 3.6))
    for i, m in enumerate(methods):
        means, sds = [], []
        for s in scopes:
            sel = [r for r in dice if r["method"] == m and r["scope"] == s]
            means.append(np.nanmean([r["mean"] for r in sel]) if sel else 0.0)
            sds.append(np.nanmean([r["sd"] for r in sel]) if sel else 0.0)
        one_seed = all(r["n"] < 2 for r in dice if r["method"] == m)
        ax.bar(np.arange(len(scopes)) + i * width, means, width, yerr=None if one_seed else sds, label=m, capsize=2)
    ax.set_xticks(np.arange(len(scopes)) + width * (len(methods) - 1) / 2, scopes)
    ax.set_ylabel("Dice (mean over classes)")
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the axes, not over bars
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def compare_methods(config: str | Path, methods: list[str], seeds: int, out: str | Path,
                    overrides: list[str] | None = None) -> dict:
    if seeds < 1:
        raise ValueError(f"--seeds must be at least 1, got {seeds}")
    config = find_config(config)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    overrides = list(overrides or [])
    base = load_config(config, overrides)
    results: dict[str, list[dict]] = {m: [] for m in methods}
    total, durations = len(methods) * seeds, []
    for method in methods:
        for seed in range(seeds):
            run_dir = out / f"{run_label(method)}-seed{seed}"
            k = sum(len(r) for r in results.values()) + 1
            reused = (run_dir / "eval.json").exists()
            eta = f", ETA {format_eta(np.mean(durations) * (total - k + 1))}" if durations else ""
            print(f"run {k} of {total}: {method} seed {base.seed + seed} -> {run_dir}"
                  f"{' (finished earlier: reused)' if reused else ''}{eta}", flush=True)
            tic = time.perf_counter()
            results[method].append(train_and_evaluate(config, method, base.seed + seed, run_dir, overrides))
            if not reused:
                durations.append(time.perf_counter() - tic)
    rows = []
    per_task = base.data.format in ("versemi", "synthetic3d")
    setting = "one network for all tasks" if per_task else f"labelled domain {base.data.lb_domain}"
    parts = [f"# Comparison: {config.name} ({', '.join(overrides) or 'no overrides'}), {seeds} seed(s)", ""]
    for protocol in ("best_test", "best_val", "last_student", "last_teacher"):
        prot_rows = summarise(results, protocol)
        if prot_rows:
            rows += prot_rows
            parts += [render_markdown(prot_rows, methods, protocol, setting), ""]
    (out / "comparison.md").write_text("\n".join(parts))
    with open(out / "comparison.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    bar_chart([r for r in rows if r["protocol"] == "best_test"], methods, out / "comparison.png",
              f"{config.stem}: Dice per test domain (best-on-test)")
    print("\n".join(parts))
    print(f"written: {out / 'comparison.md'}, {out / 'comparison.csv'}, {out / 'comparison.png'}")
    return {"rows": rows, "results": results}


def run_demo(out: str | Path = "runs/demo", quick: bool = False) -> dict:
    """Supervised vs UST-RUN on the embedded synthetic data; prints the per-domain tables and the gain."""
    from medsemi.methods.registry import available_methods

    methods = [m for m in ("supervised", "ustrun") if m in available_methods()]
    overrides = ["train.iterations=20", "train.eval_every=10", "data.synthetic.train_per_domain=12"] if quick else []
    summary = compare_methods("configs/demo.yaml", methods, 1, out, overrides)
    rows = [r for r in summary["rows"] if r["protocol"] == "best_test" and r["metric"] == "dice"]
    out = Path(out)
    for method in methods:
        report = out / f"{method}-seed0" / "report.md"
        section = report.read_text().split("\n## best_test")[1].split("\n## ")[0]
        print(f"\n{method}, best_test{section.rstrip()}")  # per domain and class: Dice, Jaccard, HD95, ASD
        print(f"report: {report} (curves.png, overlays/ beside it)")
    if len(methods) == 2:  # the summary comes last, where the reader's eye lands
        print("\nDemo summary: best-on-test Dice (mean over classes), one seed")
        for scope in dict.fromkeys(r["scope"] for r in rows):
            sup = np.nanmean([r["mean"] for r in rows if r["method"] == "supervised" and r["scope"] == scope])
            ust = np.nanmean([r["mean"] for r in rows if r["method"] == "ustrun" and r["scope"] == scope])
            print(f"Dice {scope:10s} supervised {sup:.3f}  UST-RUN {ust:.3f}  gain {ust - sup:+.3f}")
    return summary
