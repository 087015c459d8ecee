"""``medsemi runs``: finished, interrupted and failed run directories, read without loading code.

The reference for the scores is metrics.jsonl itself, read here independently."""

import json
import os
import socket
import subprocess
import sys
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


def _dead_pid() -> int:
    """The pid of a process that has exited."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _write_lock(run_dir: Path, pid: int, host: str | None = None) -> None:
    (run_dir / "run.lock").write_text(json.dumps({"pid": pid, "host": host or socket.gethostname(),
                                                  "started": "2026-12-01 10:00:00"}))


def test_runs_tells_running_from_interrupted(runs_root, tmp_path):
    """run.lock: a live trainer on this machine is `running` (even before its first checkpoint); a lock
    whose process is gone is stale and the checkpoints decide; another machine's lock counts as running."""
    import shutil

    root = tmp_path / "runs"
    shutil.copytree(runs_root / "stopped", root / "live")
    shutil.copytree(runs_root / "stopped", root / "stale")
    shutil.copytree(runs_root / "stopped", root / "remote")
    shutil.copytree(runs_root / "crashed", root / "starting")
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _write_lock(root / "live", sleeper.pid)
        _write_lock(root / "starting", sleeper.pid)
        _write_lock(root / "stale", _dead_pid())
        _write_lock(root / "remote", 12345, host="another-node")
        runs = {r.name: r for r in list_runs(root)}
        assert runs["live"].status == "running" and f"pid {sleeper.pid}" in runs["live"].note
        assert "last logged" in runs["live"].note
        assert runs["starting"].status == "running"  # no checkpoint yet, but not failed
        assert runs["stale"].status == "interrupted" and "stale run.lock" in runs["stale"].note
        assert runs["remote"].status == "running" and "another-node" in runs["remote"].note
        assert "cannot be checked" in runs["remote"].note
        table = runs_table(list(runs.values()))
        assert "notes:" in table and f"live: training: pid {sleeper.pid}" in table
    finally:
        sleeper.kill()
        sleeper.wait()
    assert {r.name: r.status for r in list_runs(root)}["live"] == "interrupted"  # its process is gone


def test_a_second_trainer_on_a_running_run_is_refused(runs_root, tmp_path, tiny_overrides):
    """While another process on this machine holds run.lock, `train --resume` (or a fresh run) is refused
    with its pid; once it is gone the lock is stale, training takes it over and removes it at the end."""
    import shutil

    from medsemi.config import ConfigError

    run = tmp_path / "run"
    shutil.copytree(runs_root / "stopped", run)
    cfg = load_config(run / "config.yaml")
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _write_lock(run, sleeper.pid)
        with pytest.raises(ConfigError, match=f"another `medsemi train`.*pid {sleeper.pid}"):
            Trainer(cfg, run, resume=True)
        with pytest.raises(ConfigError, match=f"pid {sleeper.pid}"):
            Trainer(cfg, tmp_path / "run")
    finally:
        sleeper.kill()
        sleeper.wait()
    seen = []
    trainer = Trainer(cfg, run, resume=True)
    original = trainer._log

    def spy(record):  # during training the lock names this process
        seen.append(json.loads((run / "run.lock").read_text())["pid"])
        original(record)

    trainer._log = spy
    trainer.fit()
    assert trainer.iteration == cfg.train.iterations
    assert seen and set(seen) == {os.getpid()}
    assert not (run / "run.lock").exists()
