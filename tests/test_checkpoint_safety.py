"""Checkpoints: loaded without running code, old ones still load, unreadable ones end in one sentence,
resume falls back to ``last.prev.pt``, files honour the umask (issue 11, items 10 and 11)."""

import os
import random
import stat
from pathlib import Path

import numpy as np
import pytest
import torch

from medsemi.checkpoints import CheckpointError, load_checkpoint, save_atomic
from medsemi.cli import main
from medsemi.config import load_config
from medsemi.engine.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "demo.yaml"


class _RunsCode:
    """Unpickling this calls ``os.system`` (what a hostile checkpoint would do)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "best_test.pt"
    torch.save({"model": {}, "payload": _RunsCode(marker)}, path)
    with pytest.raises(CheckpointError, match="system") as err:
        load_checkpoint(path)
    assert str(path) in str(err.value) and "could run code" in str(err.value)
    assert not marker.exists(), "the payload ran"


def test_predict_refuses_the_hostile_checkpoint_in_one_sentence(tmp_path, capsys):
    marker = tmp_path / "pwned"
    path = tmp_path / "best_test.pt"
    torch.save({"model": {}, "payload": _RunsCode(marker)}, path)
    (tmp_path / "in").mkdir()
    assert main(["predict", str(path), str(tmp_path / "in"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "refused" in err and "Traceback" not in err
    assert not marker.exists()


def test_a_checkpoint_written_the_old_way_still_loads(tmp_path):
    """Before issue 11, last.pt held np.random.get_state() (an ndarray) and NumPy float scores."""
    old = {
        "iteration": 3,
        "w": torch.arange(4.0),
        "rng": {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()},
        "best": {"test": {"score": np.float64(0.25), "iteration": 2}},
    }
    path = tmp_path / "last.pt"
    torch.save(old, path)
    state = load_checkpoint(path)
    assert state["iteration"] == 3 and torch.equal(state["w"], old["w"])
    keys = state["rng"]["numpy"][1]
    assert isinstance(keys, np.ndarray) and np.array_equal(keys, old["rng"]["numpy"][1])
    assert float(state["best"]["test"]["score"]) == 0.25


def test_an_old_training_checkpoint_resumes(tmp_path, tiny_overrides):
    """A trainer's last.pt with the NumPy RNG state stored the old way resumes to the same RNG state."""
    cfg = load_config(DEMO, [*tiny_overrides, "train.iterations=4", "train.eval_every=2",
                             "train.checkpoint_every=2"])
    t = Trainer(cfg, tmp_path / "run")
    t.fit(stop_after=2)
    t.save_checkpoint()
    path = tmp_path / "run" / "checkpoints" / "last.pt"
    state = load_checkpoint(path)
    np.random.seed(123)
    legacy = np.random.get_state()
    state["rng"]["numpy"] = legacy  # as the old code wrote it
    torch.save(state, path)
    np.random.seed(0)
    Trainer(cfg, tmp_path / "run", resume=True)
    assert np.array_equal(np.random.get_state()[1], legacy[1])


@pytest.mark.parametrize("content", [b"", b"this is not a checkpoint", "truncated"])
def test_unreadable_checkpoints_end_in_one_sentence(tmp_path, content):
    path = tmp_path / "best_test.pt"
    if content == "truncated":
        save_atomic({"model": {"w": torch.randn(1000)}}, path)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    else:
        path.write_bytes(content)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    message = str(err.value)
    assert message.startswith(str(path)) and "\n" not in message
    assert "train again" in message or "use another" in message


def _trained_run(tmp_path, tiny_overrides, iterations=4):
    run = tmp_path / "run"
    assert main(["train", str(DEMO), *tiny_overrides, f"train.iterations={iterations}", "train.eval_every=2",
                 "train.checkpoint_every=2", "--run-dir", str(run), "--no-eval"]) == 0
    return run


def test_cli_commands_name_a_broken_checkpoint(tmp_path, tiny_overrides, capsys):
    run = _trained_run(tmp_path, tiny_overrides)
    capsys.readouterr()
    best = run / "checkpoints" / "best_test.pt"
    best.write_bytes(best.read_bytes()[:100])
    (tmp_path / "in").mkdir()
    assert main(["predict", str(best), str(tmp_path / "in"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert str(best) in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert main(["evaluate", str(run), "--checkpoint", "best_test", "--out", str(tmp_path / "ev")]) == 2
    err = capsys.readouterr().err
    assert str(best) in err and len(err.strip().splitlines()) == 1


def test_resume_falls_back_to_the_previous_checkpoint(tmp_path, tiny_overrides, capsys):
    cfg = load_config(DEMO, [*tiny_overrides, "train.iterations=6", "train.eval_every=2",
                             "train.checkpoint_every=2"])
    run = tmp_path / "run"
    Trainer(cfg, run).fit(stop_after=4)  # interrupted after the checkpoints at 2 and 4
    ckpt = run / "checkpoints"
    assert load_checkpoint(ckpt / "last.prev.pt")["iteration"] == 2
    assert load_checkpoint(ckpt / "last.pt")["iteration"] == 4
    (ckpt / "last.pt").write_bytes(b"")  # e.g. a disk that filled up under another tool
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--no-eval"]) == 0
    err = capsys.readouterr().err
    assert "last.pt" in err and "last.prev.pt" in err and "iteration 2" in err
    assert load_checkpoint(ckpt / "last.pt")["iteration"] == 6


def test_resume_without_a_readable_checkpoint_is_one_sentence(tmp_path, tiny_overrides, capsys):
    run = _trained_run(tmp_path, tiny_overrides, iterations=2)
    ckpt = run / "checkpoints"
    assert not (ckpt / "last.prev.pt").exists()
    (ckpt / "last.pt").write_bytes(b"junk")
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--no-eval"]) == 2
    err = capsys.readouterr().err
    assert str(ckpt / "last.pt") in err and "cannot be resumed" in err and "Traceback" not in err


def test_checkpoints_honour_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        save_atomic({"w": torch.ones(2)}, tmp_path / "a.pt")
        os.umask(0o077)
        save_atomic({"w": torch.ones(2)}, tmp_path / "b.pt")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.pt").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "b.pt").stat().st_mode) == 0o600


def test_new_checkpoints_load_with_plain_weights_only(tmp_path, tiny_overrides):
    """What the trainer writes now needs no allow-list at all (plain data and tensors only)."""
    run = _trained_run(tmp_path, tiny_overrides, iterations=2)
    for name in ("last.pt", "best_test.pt"):
        torch.load(run / "checkpoints" / name, weights_only=True)
