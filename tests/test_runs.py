"""``medsemi runs``: finished, interrupted and failed run directories, read without loading code.

The reference for the scores is metrics.jsonl itself, read here independently."""

import json
from pathlib import Path

import pytest

from medsemi.cli import main
from medsemi.config import load_config
from medsemi.engine.trainer import Trainer
from medsemi.workflows.runs import list_runs, runs_table

REPO = Path(__file__).resolve().parents[1]


def _train(run_dir: Path, overrides: list[str], iterations: int, stop_after: int | None = None) -> None:
    cfg = load_config(REPO / "configs" / "demo.yaml",
                      [*overrides, f"train.iterations={iterations}", "train.eval_every=1", "train.log_every=1",
                       "train.checkpoint_every=100", "train.device=cpu"])
    Trainer(cfg, run_dir).fit(stop_after=stop_after)


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory):
    from conftest import TINY

    root = tmp_path_factory.mktemp("runs")
    _train(root / "done", TINY, iterations=2)
    _train(root / "compare" / "supervised" / "seed0", TINY, iterations=2)
    _train(root / "stopped", TINY, iterations=4, stop_after=2)
    failed = root / "crashed"
    failed.mkdir()
    (failed / "config.yaml").write_text((root / "done" / "config.yaml").read_text())
    (failed / "metrics.jsonl").write_text(json.dumps({"kind": "train", "iteration": 1, "loss": 0.5}) + "\n")
    (root / "notes").mkdir()  # not a run
    return root


def _evals(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == "eval"]


def test_runs_status_progress_and_scores(runs_root):
    runs = {r.name: r for r in list_runs(runs_root)}
    assert sorted(runs) == ["compare/supervised/seed0", "crashed", "done", "stopped"]
    done, stopped, crashed = runs["done"], runs["stopped"], runs["crashed"]
    assert (done.status, done.iteration, done.iterations) == ("finished", 2, 2)
    assert (stopped.status, stopped.iteration, stopped.iterations) == ("interrupted", 2, 4)
    assert "--resume" in stopped.note
    assert crashed.status == "failed" and crashed.iteration == 1 and crashed.best_test is None
    assert done.method == "supervised" and done.dataset == "synthetic"
    for run in (done, stopped):
        evals = _evals(runs_root / run.name)
        scores = [r["test_student_dice"] for r in evals]
        assert run.best_test == pytest.approx(max(scores))
        assert run.best_test_iteration == evals[scores.index(max(scores))]["iteration"]
        assert run.last_score == pytest.approx(scores[-1]) and run.last_score_iteration == evals[-1]["iteration"]
        assert run.best_val is None  # the demo has no validation split: -inf is not reported as a score


def test_runs_cli_table_and_json(runs_root, capsys):
    assert main(["runs", str(runs_root)]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["run", "method", "dataset"]
    row = next(line for line in lines if line.startswith("stopped"))
    assert "2/4" in row and "interrupted (resumable)" in row
    assert "finished" in next(line for line in lines if line.startswith("done "))
    assert main(["runs", str(runs_root), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert {d["name"]: d["status"] for d in data}["crashed"] == "failed"
    assert main(["runs", str(runs_root / "missing")]) == 2
    assert "no such folder" in capsys.readouterr().err


def test_unreadable_last_checkpoint_is_a_failed_run(tmp_path, runs_root):
    run = tmp_path / "broken"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text((runs_root / "done" / "config.yaml").read_text())
    (run / "checkpoints" / "last.pt").write_bytes(b"garbage")
    [summary] = list_runs(tmp_path)
    assert summary.status == "failed" and "last.pt" in summary.note
    assert "broken" in runs_table([summary])


def test_unreadable_last_checkpoint_with_a_readable_previous_one_is_resumable(tmp_path, runs_root):
    import shutil

    run = tmp_path / "fallback"
    shutil.copytree(runs_root / "stopped", run)
    shutil.copyfile(run / "checkpoints" / "last.pt", run / "checkpoints" / "last.prev.pt")
    (run / "checkpoints" / "last.pt").write_bytes(b"garbage")
    [summary] = list_runs(tmp_path)
    assert summary.status == "interrupted" and summary.iteration == 2 and "last.prev.pt" in summary.note
