"""Issue 17: curves.png shows per-domain Dice on a 0-1 axis and the unlabelled loss terms; overlays show the
first and the worst cases with ground truth and prediction."""

from pathlib import Path

import numpy as np
import torch
from torch import nn

from medsemi.config import load_config
from medsemi.data.contract import LabelSpec
from medsemi.evaluation.report import case_dice, curves_figure, pick_cases, render_report, write_overlays


def test_curves_show_domains_on_a_unit_axis_and_unlabelled_terms():
    records = [{"kind": "train", "iteration": i, "loss": 1.0 / i, "loss_sup": 0.5 / i, "loss_ul": 0.3 / i}
               for i in (1, 2)]
    records += [{"kind": "eval", "iteration": 2, "test_student_dice": 0.5, "test_student_dice_siteA": 0.4,
                 "test_student_dice_siteB": 0.6, "best_test_dice": 0.5}]
    fig = curves_figure(records)
    losses, dice = fig.axes[0], fig.axes[1]
    assert {t.get_text() for t in losses.get_legend().get_texts()} == {"loss", "loss_sup", "loss_ul"}
    assert {t.get_text() for t in dice.get_legend().get_texts()} == {"macro mean", "siteA", "siteB"}
    assert dice.get_ylim() == (0.0, 1.0)


def test_pick_cases_first_and_worst():
    assert pick_cases([0.9, 0.2, 0.5, 0.1], 2) == ([0, 1], [3, 1])
    assert pick_cases([0.3], 4) == ([0], [0])
    both = np.zeros((2, 4, 4), bool)
    assert case_dice(both, both) == 1.0
    a = both.copy()
    a[0, :2] = True
    assert case_dice(a, a) == 1.0 and case_dice(a, both) == 0.5  # class 0: 0, class 1 (both empty): 1


class Oracle(nn.Module):
    """Predicts the label stored in the image's second channel (so the Dice of each case is known)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fg = (x[:, 1:2] > 0).float()
        return torch.cat([1 - fg, fg], 1) * 10


def test_overlays_are_written_and_linked(tmp_path, monkeypatch):
    spec = LabelSpec("exclusive", ("background", "organ"))
    label = torch.zeros(3, 16, 16, dtype=torch.long)
    label[:, 4:10, 4:10] = 1
    image = torch.full((3, 2, 16, 16), -1.0)
    image[:, 1, 4:10, 4:10] = 1.0
    image[2, 1] = -1.0  # case 2 is predicted empty: the worst
    data = {"siteA": {"image": image, "label": label, "name": ["a", "b", "c"]}}
    paths = write_overlays(Oracle(), data, spec, tmp_path / "overlays", count=1)
    assert [p.name for p in paths] == ["siteA.png"] and paths[0].stat().st_size > 1000

    class Info:
        name = "toy"
        extra: dict = {}

    class Fam:
        info = Info()

        def summary(self):
            return {}

    from medsemi.config import load_config

    cfg = load_config(None)
    res = {"best_test": {"mean_over_classes": {"dice": 0.5}, "per_domain": {}, "macro": {}, "iteration": 1}}
    import medsemi.evaluation.report as report

    monkeypatch.setattr(report, "format_table", lambda res, metrics, **kw: "")
    text = render_report(cfg, res, Fam(), overlays=["overlays/siteA.png"])
    assert "](overlays/siteA.png)" in text


def test_volume_overlay_shows_the_slice_with_the_most_ground_truth():
    from medsemi.evaluation.report import volume_overlay_case

    image = np.random.default_rng(0).normal(size=(12, 10, 6)).astype(np.float32) * 300  # CT-like range
    gt = np.zeros((12, 10, 6), np.uint8)
    gt[2:5, 2:5, 1] = 1
    gt[1:9, 1:9, 4] = 1  # the largest cross-section
    pred = np.zeros_like(gt)
    pred[1:9, 1:5, 4] = 1
    case = volume_overlay_case("case_7", image, gt, pred, 0.5)
    assert "z=4" in case.name and case.dice == 0.5
    assert case.gt.shape == (1, 12, 10) and np.array_equal(case.gt[0], gt[..., 4].astype(bool))
    assert np.array_equal(case.pred[0], pred[..., 4].astype(bool))
    assert case.rgb.shape == (12, 10, 3) and 0.0 <= case.rgb.min() and case.rgb.max() <= 1.0
    assert case.rgb.max() == 1.0 and case.rgb.min() == 0.0  # the slice's range spans the picture
    empty = volume_overlay_case("none", image, np.zeros_like(gt), pred, 0.0)  # no ground truth: prediction
    assert "z=4" in empty.name


def test_3d_evaluation_writes_one_overlay_per_task_and_links_it(tmp_path):
    """A VerSemi run on the embedded volumes: evaluate writes overlays/<task>.png from the evaluation's own
    predictions and report.md links them."""
    from medsemi.engine.trainer import Trainer
    from medsemi.workflows.evaluate_run import evaluate_run

    repo = Path(__file__).resolve().parents[1]
    cfg = load_config(repo / "configs" / "versemi" / "synthetic3d_cpu.yaml", [
        "train.iterations=2", "method.stage1_iterations=1", "train.eval_every=2", "train.checkpoint_every=2",
        "train.batch_size=2", "train.unlabelled_batch_size=2", "train.device=cpu", "train.progress_bar=false",
        "train.tensorboard=false", "data.options.strides=[32,32,32]", "data.options.synthetic.n_per_task=4",
        "data.options.synthetic.size_max=36", "eval.overlays=1", "eval.surface_metrics=never"])
    run = tmp_path / "run"
    trainer = Trainer(cfg, run)
    trainer.fit()
    evaluate_run(run, which=("best_test",), cfg=cfg, family=trainer.family, device="cpu")
    tasks = list(trainer.family.info.domains)
    pictures = sorted(p.name for p in (run / "overlays").glob("*.png"))
    assert pictures == sorted(f"{t}.png" for t in tasks)
    assert all((run / "overlays" / p).stat().st_size > 1000 for p in pictures)
    report = (run / "report.md").read_text()
    assert all(f"](overlays/{t}.png)" in report for t in tasks)
