"""A non-finite loss stops training with a message (or is skipped with train.nonfinite=skip_step), and a
run directory left by a run that died before its first checkpoint is not mixed into a new run
(issue 11, items 6 and 7)."""

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from medsemi.checkpoints import load_checkpoint
from medsemi.cli import main
from medsemi.config import load_config
from medsemi.engine.nonfinite import NonFiniteLossError
from medsemi.engine.step_guard import SkipNonFinite
from medsemi.engine.trainer import Trainer
from medsemi.methods.base import Progress
from medsemi.methods.registry import get_method
from medsemi.methods.supervised import Supervised

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "demo.yaml"


def _poison(monkeypatch, bad_iterations, cls=Supervised):
    """The method's loss becomes NaN at the given 0-based step indices (its gradients too)."""
    original = cls.train_step

    def step(self, labelled, unlabelled, progress):
        out = original(self, labelled, unlabelled, progress)
        if progress.iteration in bad_iterations:
            out.loss = out.loss * torch.tensor(float("nan"))
        return out

    monkeypatch.setattr(cls, "train_step", step)


def test_nan_loss_stops_with_the_iteration_and_the_last_good_checkpoint(tmp_path, tiny_overrides, monkeypatch,
                                                                        capsys):
    _poison(monkeypatch, {5})  # iteration 6 in the 1-based count of the logs
    run = tmp_path / "run"
    code = main(["train", str(DEMO), *tiny_overrides, "train.iterations=12", "train.eval_every=4",
                 "train.checkpoint_every=4", "train.log_every=4", "--run-dir", str(run)])
    assert code != 0
    err = capsys.readouterr().err
    assert "iteration 6" in err and str(run / "checkpoints" / "last.pt") in err and "(iteration 4)" in err
    assert "Traceback" not in err
    assert load_checkpoint(run / "checkpoints" / "last.pt")["iteration"] == 4  # nothing saved after the NaN
    assert not (run / "report.md").exists()


def test_nan_between_log_intervals_never_reaches_a_checkpoint(tmp_path, tiny_overrides, monkeypatch):
    """checkpoint_every not a multiple of log_every: the unlogged losses are checked before saving."""
    _poison(monkeypatch, {2})
    cfg = load_config(DEMO, [*tiny_overrides, "train.iterations=12", "train.eval_every=3",
                             "train.checkpoint_every=3", "train.log_every=5"])
    trainer = Trainer(cfg, tmp_path / "run")
    with pytest.raises(NonFiniteLossError, match="iteration 3"):
        trainer.fit()
    assert not (tmp_path / "run" / "checkpoints" / "last.pt").exists()
    assert not (tmp_path / "run" / "checkpoints" / "best_test.pt").exists()


def test_skip_step_skips_the_update_and_training_finishes(tmp_path, tiny_overrides, monkeypatch):
    _poison(monkeypatch, {1, 2}, get_method("mean_teacher"))
    cfg = load_config(DEMO, [*tiny_overrides, "train.iterations=6", "train.eval_every=6",
                             "train.checkpoint_every=6", "train.log_every=3", "train.nonfinite=skip_step",
                             "method.name=mean_teacher"])
    trainer = Trainer(cfg, tmp_path / "run")
    trainer.fit()
    assert trainer.finished
    state = trainer.method.state_dict()
    assert all(torch.isfinite(v).all() for v in state.values() if v.dtype.is_floating_point)
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert [r["skipped_steps"] for r in train] == [2, 0]
    assert all(r["loss"] == r["loss"] for r in train), "logged loss must be the mean of the kept steps"


def test_skip_step_all_steps_of_an_interval_non_finite_stops(tmp_path, tiny_overrides, monkeypatch):
    _poison(monkeypatch, set(range(100)))
    cfg = load_config(DEMO, [*tiny_overrides, "train.iterations=6", "train.log_every=2",
                             "train.nonfinite=skip_step"])
    with pytest.raises(NonFiniteLossError, match="every step from iteration 1 to 2"):
        Trainer(cfg, tmp_path / "run").fit()


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_skip_non_finite_restores_parameters_buffers_and_optimiser_state(optimizer):
    """The masked update equals no update at all when the flag is false, and the real update when true."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    opt = (torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3) if optimizer == "sgd"
           else torch.optim.Adam(net.parameters(), lr=0.1))
    guard = SkipNonFinite(net)
    x = torch.randn(8, 3)

    def step(scale):
        guard.before(opt)
        loss = net(x).pow(2).mean() * scale
        opt.zero_grad()
        loss.backward()
        opt.step()
        guard.after(opt, torch.isfinite(loss.detach()))

    step(1.0)  # a real step creates the optimiser state
    before = {k: v.clone() for k, v in net.state_dict().items()}
    opt_before = {k: v.clone() for k, v in opt.state[net[0].weight].items() if torch.is_tensor(v)}
    step(float("nan"))
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k
    for k, v in opt.state[net[0].weight].items():
        if torch.is_tensor(v):
            assert torch.equal(v, opt_before[k]), k
    step(1.0)
    assert not torch.equal(net[0].weight, before["0.weight"])

    fresh = torch.nn.Linear(3, 1)  # a skipped FIRST step leaves zero state, as a fresh optimiser starts
    opt2 = torch.optim.SGD(fresh.parameters(), lr=0.1, momentum=0.9)
    guard2 = SkipNonFinite(fresh)
    guard2.before(opt2)
    loss = fresh(x).sum() * float("nan")
    loss.backward()
    opt2.step()
    guard2.after(opt2, torch.isfinite(loss.detach()))
    assert torch.isfinite(fresh.weight).all()
    assert torch.equal(opt2.state[fresh.weight]["momentum_buffer"], torch.zeros_like(fresh.weight))


def test_unknown_nonfinite_mode_is_refused(tmp_path, tiny_overrides):
    cfg = load_config(DEMO, [*tiny_overrides, "train.nonfinite=ignore"])
    with pytest.raises(ValueError, match="train.nonfinite"):
        Trainer(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_a_run_that_died_before_its_first_checkpoint_is_cleared(tmp_path, tiny_overrides, capsys):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "metrics.jsonl").write_text(json.dumps({"kind": "train", "iteration": 999, "loss": 1.0}) + "\n")
    (run / "config.yaml").write_text("name: old\n")
    (run / "train.log").write_text("OLD RUN\n")  # a run writes its log from the start
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (run / "run.lock").write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "started": "-"}))
    assert main(["train", str(DEMO), *tiny_overrides, "train.iterations=2", "train.eval_every=2",
                 "--run-dir", str(run), "--no-eval"]) == 0
    assert "before its first checkpoint" in capsys.readouterr().err
    assert "OLD RUN" not in (run / "train.log").read_text() and not (run / "run.lock").exists()
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(r["iteration"] <= 2 for r in records), "the dead run's records were mixed in"


def test_a_directory_with_other_files_is_refused(tmp_path, tiny_overrides, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "notes.txt").write_text("mine")
    assert main(["train", str(DEMO), *tiny_overrides, "--run-dir", str(run)]) == 2
    assert "notes.txt" in capsys.readouterr().err
    assert (run / "notes.txt").read_text() == "mine" and sorted(p.name for p in run.iterdir()) == ["notes.txt"]


def test_resume_of_a_run_without_checkpoint_is_one_sentence(tmp_path, capsys):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text((DEMO).read_text())
    assert main(["train", "--resume", str(run)]) == 2
    err = capsys.readouterr().err
    assert "no checkpoint to resume" in err and str(run) in err


def test_skip_step_reads_nothing_back_from_the_device(tmp_path, tiny_overrides, monkeypatch):
    """No .item(), .tolist(), bool() or .cpu() on a tensor inside a skip_step training step (on a GPU each
    would wait for the device)."""
    _poison(monkeypatch, {1})
    cfg = load_config(DEMO, [*tiny_overrides, "train.iterations=4", "train.nonfinite=skip_step",
                             "method.name=mean_teacher"])
    trainer = Trainer(cfg, tmp_path / "run")
    trainer.train_step(Progress(0, 4, 4))  # the first step builds lazy state

    def forbidden(*args, **kwargs):
        raise AssertionError("host sync inside the training step")

    with monkeypatch.context() as m:
        for name in ("item", "tolist", "__bool__", "cpu"):
            m.setattr(torch.Tensor, name, forbidden)
        for k in (1, 2):
            trainer.train_step(Progress(k, 4, 4))
    assert all(torch.isfinite(p).all() for p in trainer.student.parameters())
