"""VerSemi's empty-prediction rule (HD95/ASD 0, as the original's ``calculate_metric_percase``) is stated
in the report header and in the README table (issue 11, item 9)."""

from pathlib import Path

from medsemi.config import load_config
from medsemi.evaluation.report import render_report
from medsemi.families.select import build_family
from medsemi.metrics import MetricPolicy

REPO = Path(__file__).resolve().parents[1]
TINY3D = ["data.options.synthetic.n_per_task=4", "data.options.synthetic.size_max=36", "train.device=cpu"]


def test_versemi_report_header_states_the_zero_distance_rule():
    cfg = load_config(REPO / "configs" / "versemi" / "synthetic3d_cpu.yaml", TINY3D)
    family = build_family(cfg)
    assert family.metric_policy(cfg) == MetricPolicy.versemi()
    header = render_report(cfg, {}, family).split("\n|")[0]
    assert "VerSemi's rule" in header
    assert "empty prediction with a non-empty ground truth: Dice 0, HD95/ASD 0;" in header


def test_2d_report_header_states_the_penalty():
    cfg = load_config(REPO / "configs" / "demo.yaml", ["data.synthetic.train_per_domain=8",
                                                      "data.synthetic.test_per_domain=2", "data.patch_size=32"])
    header = render_report(cfg, {}, build_family(cfg)).split("\n|")[0]
    assert "empty prediction with a non-empty ground truth: Dice 0, HD95/ASD 100;" in header


def test_readme_table_states_the_versemi_rule():
    readme = (REPO / "README.md").read_text()
    rows = [line for line in readme.splitlines() if line.startswith("| prediction empty, ground truth not")]
    assert len(rows) == 1 and "100" in rows[0] and "**0**" in rows[0] and "VerSemi" in rows[0]
