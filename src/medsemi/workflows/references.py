"""Published numbers beside ours: ``benchmarks/reference_results.yaml`` (issue 12 section 5).

An entry of ``results`` *matches* a comparison when all of these hold (see the file's header):

- ``dataset`` equals the config's ``data.format``;
- 2D datasets: ``labelled_domain`` equals ``data.lb_domain`` and ``labelled_count`` equals ``data.lb_num``
  (a run that sets ``data.lb_ratio`` matches nothing: its count depends on the data);
- VerSemi (``versemi``): ``labelled_ratio`` equals ``data.options.ratio`` (default 20);
- ``ours`` is one of the compared methods (variants ``name:key=value`` count as ``name``).

The file is read with ``yaml.safe_load``; an entry without its source (``paper`` and ``table``) is an error.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from medsemi.config import Config

REQUIRED = ("paper", "table", "dataset", "method")


def load_references(path: str | Path) -> list[dict[str, Any]]:
    """The ``results`` entries of a reference file, checked for the keys every entry needs."""
    path = Path(path)
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict) or not isinstance(raw.get("results", []), list):
        raise ValueError(f"{path}: expected a mapping with a list `results`")
    entries = raw.get("results") or []
    for i, entry in enumerate(entries):
        missing = [k for k in REQUIRED if not isinstance(entry, dict) or k not in entry]
        if missing:
            raise ValueError(f"{path}: results[{i}] lacks {missing} (every number needs its paper and table)")
    return entries


def matches(entry: dict[str, Any], cfg: Config, methods: list[str]) -> bool:
    """Whether a reference entry is in the same setting as ``cfg`` and names one of ``methods``."""
    ours = {m.split(":")[0] for m in methods}
    if entry.get("ours") not in ours or entry.get("dataset") != cfg.data.format:
        return False
    if cfg.data.format == "versemi":
        return entry.get("labelled_ratio") == int((cfg.data.options or {}).get("ratio", 20))
    if cfg.data.lb_ratio > 0:
        return False
    return entry.get("labelled_domain") == cfg.data.lb_domain and entry.get("labelled_count") == cfg.data.lb_num


def _mean_dice(entry: dict[str, Any]) -> float | None:
    """Mean of the printed Dice values (over domains / tasks and classes), or None when none is printed."""
    values: list[float] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for v in node.values():
                walk(v)
        elif isinstance(node, (int, float)) and not isinstance(node, bool):
            values.append(float(node))

    walk(entry.get("dice"))
    return sum(values) / len(values) if values else None


def render_references(entries: list[dict[str, Any]], cfg: Config, methods: list[str]) -> str:
    """A Markdown section listing the matching published numbers (empty string when none match)."""
    found = [e for e in entries if matches(e, cfg, methods)]
    if not found:
        return ""
    lines = ["### Published numbers for this setting (benchmarks/reference_results.yaml)", "",
             "| ours | paper | table | method as printed | mean Dice (printed values) | Dice as printed |",
             "|---|---|---|---|---|---|"]
    for e in found:
        mean = _mean_dice(e)
        lines.append(f"| {e['ours']} | {e['paper']} | {e['table']} | {e['method']} | "
                     f"{'—' if mean is None else f'{mean:.2f}'} | {e.get('dice', '—')} |")
    return "\n".join(lines)
