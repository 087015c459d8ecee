"""The papers' numbers file and ``bench compare`` printing them beside ours (issue 12, section 5)."""

import re
from pathlib import Path

import pytest
import yaml

from medsemi.config import load_config
from medsemi.workflows.compare import compare_methods, default_references
from medsemi.workflows.references import load_references, matches, render_references

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "benchmarks" / "reference_results.yaml"
SPECS = REPO.parent / "shared" / "spec"  # beside the repository, as CI lays it out

# A made-up entry for the tests only (not a published number): the shape of a transcribed table row.
FIXTURE = {"paper": "UST-RUN", "table": "Table 0 (test fixture)", "dataset": "fundus", "labelled_domain": 1,
           "labelled_count": 20, "method": "UST-RUN (ours)", "ours": "ustrun",
           "dice": {"domain2": {"cup": 11.0, "disc": 33.0}}}


def test_shipped_file_holds_only_sourced_numbers():
    assert default_references() == SHIPPED
    raw = yaml.safe_load(SHIPPED.read_text())
    assert load_references(SHIPPED) == raw["results"] == []  # the specs quote no per-setting table values
    for claim in raw["claims"]:
        assert claim["source"] and "spec" in claim["source"] and claim["paper"] in ("MiDSS", "UST-RUN", "VerSemi")


@pytest.mark.skipif(not SPECS.is_dir(), reason="the specs are not beside the repository")
def test_every_shipped_number_is_quoted_by_a_spec():
    text = "".join(p.read_text() for p in SPECS.glob("*.md"))
    raw = yaml.safe_load(SHIPPED.read_text())
    for claim in raw["claims"]:
        value = f"{claim['dice_gain_percent']:.2f}"
        assert re.search(rf"\b{re.escape(value)}\s?%", text), value


def test_matching_rule():
    cfg = load_config(REPO / "configs" / "fundus" / "ustrun.yaml")
    assert matches(FIXTURE, cfg, ["supervised", "ustrun"])
    assert matches(FIXTURE, cfg, ["ustrun:preset=released"])  # a variant is still the method
    assert not matches(FIXTURE, cfg, ["supervised", "midss"])  # method
    assert not matches(FIXTURE, load_config(REPO / "configs" / "fundus" / "ustrun.yaml", ["data.lb_domain=2"]),
                       ["ustrun"])  # labelled domain
    assert not matches(FIXTURE, load_config(REPO / "configs" / "fundus" / "ustrun.yaml", ["data.lb_num=40"]),
                       ["ustrun"])  # labelled count
    assert not matches(FIXTURE, load_config(REPO / "configs" / "prostate" / "ustrun.yaml"), ["ustrun"])  # dataset
    v = {"paper": "VerSemi", "table": "T", "dataset": "versemi", "labelled_ratio": 10, "method": "VerSemi",
         "ours": "versemi"}
    assert matches(v, load_config(REPO / "configs" / "versemi" / "versemi_10.yaml"), ["versemi"])
    assert not matches(v, load_config(REPO / "configs" / "versemi" / "versemi_20.yaml"), ["versemi"])
    text = render_references([FIXTURE, v], cfg, ["ustrun"])
    assert "Table 0 (test fixture)" in text and "| 22.00 |" in text and "VerSemi" not in text
    assert render_references([v], cfg, ["ustrun"]) == ""


def test_entries_without_source_are_refused(tmp_path):
    bad = tmp_path / "refs.yaml"
    bad.write_text(yaml.safe_dump({"results": [{"dataset": "fundus", "method": "x", "dice": {"a": 1}}]}))
    with pytest.raises(ValueError, match="paper"):
        load_references(bad)


def test_bench_compare_prints_matching_numbers(tmp_path, tiny_overrides, capsys):
    refs = tmp_path / "refs.yaml"
    entry = dict(FIXTURE, dataset="synthetic", labelled_count=4, ours="supervised")
    refs.write_text(yaml.safe_dump({"results": [entry]}))
    overrides = [*tiny_overrides, "train.iterations=2", "train.eval_every=2", "train.checkpoint_every=2",
                 "eval.surface_metrics=never"]
    compare_methods(REPO / "configs" / "demo.yaml", ["supervised"], 1, tmp_path / "cmp", overrides, refs)
    md = (tmp_path / "cmp" / "comparison.md").read_text()
    assert "Published numbers for this setting" in md and "Table 0 (test fixture)" in md
    assert "Published numbers" in capsys.readouterr().out
