"""``medsemi bench compare`` and ``medsemi demo``: several methods × seeds on one config, a
comparison table (Markdown + CSV, mean ± sd over seeds, per domain and class, both model-selection
protocols) and a bar chart.

On a 3D volume config (``data.format`` versemi / synthetic3d) a *single-task* method (``supervised3d``,
``mean_teacher3d``, ``uamt3d``, ``cps3d``, ``bcp3d``: ``Method.single_task``) is trained once per task
(``data.options.task=<task>``, the config's tasks, all four unless the config chooses one) with a plain
VNet of the same width (``model.name=vnet`` where the config has the task-prompted ``versemi_vnet``), the
config's data, crops, optimiser, iterations and evaluation, and *without* the config's ``method``
section nor the command's ``method.*`` overrides (those belong to the config's own method;
``name:key=value`` variants still set options).
Its per-task results are merged into one row: per-task metrics from each task's run, the mean over the
tasks as for a multi-task run. The table then has a column per task and metric (Dice, Jaccard, HD95,
ASD) and the mean over tasks.

Runs are resumable: a run folder of ``--out`` that already holds a finished (``eval.json``) or interrupted
(``checkpoints/last.pt``) run is reused only when its resolved ``config.yaml`` equals the requested one;
otherwise the command stops before training anything and says which settings differ. Every entry of
``--methods`` (name and options) is checked first, too.
"""

from __future__ import annotations

import csv
import json
import math
import time
from pathlib import Path

import numpy as np

import medsemi
from medsemi.config import (
    Config,
    apply_overrides,
    config_differences,
    config_from_dict,
    find_config,
    load_config,
    read_raw_config,
)
from medsemi.data.volumes.cases import TASK_NAMES
from medsemi.engine.trainer import format_eta
from medsemi.families.volumes import VOLUME_FORMATS
from medsemi.workflows.references import load_references, render_references

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


def config_for_method(config: str | Path, method: str, overrides: list[str]) -> Config:
    """The config of one ``--methods`` entry: the file's method section kept only where the entry's method
    accepts the key (a ``ustrun`` config's ``lq_mode`` does not reach ``supervised``), then ``overrides``
    (all of them: a ``method.*`` override the method lacks is an error), then the entry's own options."""
    import dataclasses

    from medsemi.methods.registry import get_method

    raw = read_raw_config(config)
    name = method.split(":")[0]
    accepted = {f.name for f in dataclasses.fields(get_method(name).Options)}
    raw["method"] = {k: v for k, v in dict(raw.get("method") or {}).items() if k in accepted}
    return config_from_dict(apply_overrides(raw, [*overrides, *method_overrides(method)]))


def run_folder(method: str, task: str, seed: int) -> str:
    """The run folder of one entry, task and seed inside ``--out``."""
    return f"{run_label(method)}-{task}-seed{seed}" if task else f"{run_label(method)}-seed{seed}"


def run_label(method: str) -> str:
    """A file-name-safe label for a method entry (variants keep their options readable)."""
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in method)


def run_config(config: Path, method: str, seed: int, overrides: list[str], task: str = "") -> Config:
    """The resolved config of one run, on one task when ``task`` is given (see the module docstring); raises
    a clear error for an unknown method or option."""
    if task:
        base = load_config(config, overrides)
        model = ["model.name=vnet"] if base.model.name == "versemi_vnet" else []
        common = [o for o in overrides if not o.startswith("method.")]  # those belong to the config's method
        cfg = load_config(config, [*common, f"data.options.task={task}", *model, *method_overrides(method),
                                   f"seed={seed}"], replace_method=True)
        cfg.name = f"{cfg.name}-{run_label(method)}-{task}-s{seed}"
    else:
        cfg = config_for_method(config, method, [*overrides, f"seed={seed}"])
        cfg.name = f"{cfg.name}-{run_label(method)}-s{seed}"
    return cfg



def check_reusable(run_dir: Path, cfg: Config) -> None:
    """Refuse a run folder whose finished or interrupted run was made with other settings."""
    has_run = (run_dir / "eval.json").exists() or (run_dir / "checkpoints" / "last.pt").exists()
    if not has_run:
        return
    if not (run_dir / "config.yaml").is_file():
        raise ValueError(f"{run_dir} holds a run without config.yaml, so it cannot be reused; choose another "
                         "--out or delete that folder")
    diffs = [f"{k}: {a!r} -> {b!r}" for k, a, b in config_differences(load_config(run_dir / "config.yaml"), cfg)]
    if diffs:
        shown = "; ".join(diffs[:4]) + (f"; and {len(diffs) - 4} more" if len(diffs) > 4 else "")
        raise ValueError(f"{run_dir} holds a run made with other settings ({shown}); nothing was trained: choose "
                         "another --out, or delete that folder to train it again")


def train_and_evaluate(config: Path, method: str, seed: int, run_dir: Path, overrides: list[str],
                       task: str = "") -> dict:
    """Train one method with one seed (on one task when ``task`` is given) and evaluate its checkpoints; a
    finished run directory with the same resolved config is reused."""
    from medsemi.engine.nonfinite import NonFiniteLossError
    from medsemi.engine.trainer import Trainer
    from medsemi.workflows.evaluate_run import evaluate_run

    cfg = run_config(config, method, seed, overrides, task)
    check_reusable(run_dir, cfg)
    if (run_dir / "eval.json").exists():  # finished earlier with the same settings: reuse
        return json.loads((run_dir / "eval.json").read_text())
    resume = (run_dir / "checkpoints" / "last.pt").exists()
    trainer = Trainer(cfg, run_dir, resume=resume)
    try:
        trainer.fit()
    except NonFiniteLossError as err:
        raise SystemExit(f"medsemi: error: {err}") from None
    if not trainer.finished:  # interrupted (Ctrl-C / SIGTERM): the checkpoint is written, stop here
        raise SystemExit(f"interrupted in {run_dir}; run the same command again to resume")
    return evaluate_run(run_dir, cfg=cfg, family=trainer.family, device=str(trainer.device))


def method_tasks(method: str, base_format: str, base_task: str) -> list[str]:
    """The tasks a method entry is trained on separately: every task (or the config's one) for a
    single-task method on a volume config; ``[""]`` (one run on the config as it is) otherwise."""
    from medsemi.methods.registry import get_method

    if base_format not in VOLUME_FORMATS or not get_method(method.split(":")[0]).single_task:
        return [""]
    return [base_task] if base_task else list(TASK_NAMES.values())


def merge_tasks(per_task: dict[str, dict]) -> dict:
    """One result per role from single-task runs ``{task: eval result}``: ``per_domain`` from each run,
    ``macro`` the NaN-aware mean over the tasks (as ``metrics.aggregate`` does over domains)."""
    roles = [r for r in next(iter(per_task.values())) if all(r in res for res in per_task.values())]
    merged: dict = {}
    for role in roles:
        per_domain = {}
        for task, res in per_task.items():
            per_domain[task] = res[role]["per_domain"][task]
        classes = list(next(iter(per_domain.values())))
        macro = {}
        for cls in classes:
            names = list(dict.fromkeys(m for d in per_domain.values() for m in d.get(cls, {})))
            macro[cls] = {m: _mean_sd([d.get(cls, {}).get(m, math.nan) for d in per_domain.values()])[0]
                          for m in names}
        merged[role] = {"per_domain": per_domain, "macro": macro,
                        "mean_dice": float(np.nanmean([macro[c].get("dice", math.nan) for c in classes])),
                        "tasks_merged": list(per_task)}
    return merged


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


def render_task_markdown(rows: list[dict], methods: list[str], protocol: str, setting: str) -> str:
    """One table for a volume setting: a column per task and metric, then the mean over tasks."""
    scopes = [sc for sc in dict.fromkeys(r["scope"] for r in rows) if sc != "macro"] + ["macro"]
    lines = [f"### {protocol} ({setting}; mean±sd over seeds; HD95/ASD in voxels)", ""]
    header = [f"{'mean' if sc == 'macro' else sc} {label}" for sc in scopes
              for label in ("Dice", "Jaccard", "HD95", "ASD")]
    lines.append("| method | " + " | ".join(header) + " |")
    lines.append("|---" * (len(header) + 1) + "|")
    for m in methods:
        cells = [_cell(rows, m, sc, k) for sc in scopes for k in METRICS]
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


def default_references() -> Path | None:
    """``benchmarks/reference_results.yaml`` of the repository, when the package runs from a checkout."""
    path = Path(medsemi.__file__).resolve().parents[2] / "benchmarks" / "reference_results.yaml"
    return path if path.is_file() else None


def compare_methods(config: str | Path, methods: list[str], seeds: int, out: str | Path,
                    overrides: list[str] | None = None, references: str | Path | None = None) -> dict:
    """Train every method for every seed, then write the comparison; published numbers of the same setting
    from ``references`` (default: :func:`default_references`) are printed beside ours
    (:mod:`medsemi.workflows.references` says when a setting matches)."""
    if seeds < 1:
        raise ValueError(f"--seeds must be at least 1, got {seeds}")
    config = find_config(config)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    overrides = list(overrides or [])
    base = load_config(config, overrides)
    base_task = str((base.data.options or {}).get("task", "") or "")
    for method in methods:  # every name, option and reusable run checked before anything trains
        for seed in range(seeds):
            for task in method_tasks(method, base.data.format, base_task):
                check_reusable(out / run_folder(method, task, seed),
                               run_config(config, method, base.seed + seed, overrides, task))
    results: dict[str, list[dict]] = {m: [] for m in methods}
    total = seeds * sum(len(method_tasks(m, base.data.format, base_task)) for m in methods)
    k, durations = 0, []
    for method in methods:
        tasks = method_tasks(method, base.data.format, base_task)
        for seed in range(seeds):
            per_task: dict[str, dict] = {}
            for task in tasks:
                run_dir = out / run_folder(method, task, seed)
                k += 1
                reused = (run_dir / "eval.json").exists()
                eta = f", ETA {format_eta(np.mean(durations) * (total - k + 1))}" if durations else ""
                print(f"run {k} of {total}: {method}{f' on {task}' if task else ''} seed {base.seed + seed} -> "
                      f"{run_dir}{' (finished earlier: reused)' if reused else ''}{eta}", flush=True)
                tic = time.perf_counter()
                per_task[task] = train_and_evaluate(config, method, base.seed + seed, run_dir, overrides, task)
                if not reused:
                    durations.append(time.perf_counter() - tic)
            results[method].append(per_task[""] if tasks == [""] else merge_tasks(per_task))
    rows = []
    volumes = base.data.format in VOLUME_FORMATS
    setting = "3D tasks: multi-task methods once on all tasks, single-task methods once per task" if volumes \
        else f"labelled domain {base.data.lb_domain}"
    render = render_task_markdown if volumes else render_markdown
    parts = [f"# Comparison: {config.name} ({', '.join(overrides) or 'no overrides'}), {seeds} seed(s)", ""]
    for protocol in ("best_test", "best_test_stage1", "best_val", "last_student", "last_teacher"):
        prot_rows = summarise(results, protocol)
        if prot_rows:
            rows += prot_rows
            parts += [render(prot_rows, methods, protocol, setting), ""]
    ref_path = Path(references) if references else default_references()
    published = render_references(load_references(ref_path), base, methods) if ref_path else ""
    if published:
        parts += [published, ""]
    (out / "comparison.md").write_text("\n".join(parts))
    with open(out / "comparison.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    bar_chart([r for r in rows if r["protocol"] == "best_test"], methods, out / "comparison.png",
              f"{config.stem}: Dice per test {'task' if volumes else 'domain'} (best-on-test)")
    print("\n".join(parts))
    print(f"written: {out / 'comparison.md'}, {out / 'comparison.csv'}, {out / 'comparison.png'}")
    return {"rows": rows, "results": results}


def run_demo(out: str | Path | None = None, quick: bool = False) -> dict:
    """Supervised vs UST-RUN on the embedded synthetic data; prints the per-domain tables and the gain.
    Default folder: ``runs/demo`` (``runs/demo-quick`` with ``quick``, so the two never mix)."""
    out = out or ("runs/demo-quick" if quick else "runs/demo")
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
