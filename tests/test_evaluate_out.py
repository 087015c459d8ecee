"""``medsemi evaluate`` without ``--out`` never replaces the run's own report with a different evaluation
(issue 11, item 5)."""

from pathlib import Path

from medsemi.cli import main

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "demo.yaml"


def _files(run: Path) -> dict[str, bytes]:
    return {n: (run / n).read_bytes() for n in ("report.md", "eval.json")}


def test_evaluate_with_other_options_writes_a_subfolder(tmp_path, tiny_overrides, capsys):
    run = tmp_path / "run"
    assert main(["train", str(DEMO), *tiny_overrides, "train.iterations=2", "train.eval_every=2",
                 "--run-dir", str(run)]) == 0
    before = _files(run)
    curves_written = (run / "curves.png").stat().st_mtime_ns
    capsys.readouterr()

    assert main(["evaluate", str(run), "eval.bn_adaptation=true"]) == 0
    err = capsys.readouterr().err
    sub = run / "evaluations" / "eval.bn_adaptation=True"
    assert str(sub) in err and "unchanged" in err
    assert _files(run) == before, "the run's own report was replaced"
    assert "re-estimated" in (sub / "report.md").read_text() and (sub / "curves.png").exists()
    assert (run / "curves.png").stat().st_mtime_ns == curves_written, "the run's curves.png was rewritten"

    assert main(["evaluate", str(run), "--checkpoint", "last_student"]) == 0
    assert _files(run) == before
    report = (run / "evaluations" / "last_student" / "report.md").read_text()
    assert "last_student" in report and "best_test" not in report

    # the evaluation training did goes where training put it (same options: same report)
    capsys.readouterr()
    assert main(["evaluate", str(run)]) == 0
    assert "differs" not in capsys.readouterr().err
    assert (run / "report.md").read_text().splitlines()[0] == before["report.md"].decode().splitlines()[0]
