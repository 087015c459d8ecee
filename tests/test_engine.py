"""Engine: exact resume, atomic checkpoints, schedules, EMA, model selection records."""

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from medsemi.checkpoints import load_checkpoint, save_atomic
from medsemi.config import load_config
from medsemi.engine.ema import ema_update
from medsemi.engine.trainer import Trainer
from medsemi.methods.base import Progress
from medsemi.methods.registry import available_methods
from medsemi.schedules import consistency_weight, ema_alpha, poly_lr

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "demo.yaml"


def _cfg(overrides, *extra):
    return load_config(DEMO, [*overrides, "train.iterations=8", "train.eval_every=4",
                              "train.checkpoint_every=4", "train.log_every=2", *extra])


def _weights(trainer):
    return {k: v.detach().clone() for k, v in trainer.method.state_dict().items()}


@pytest.mark.parametrize("method,extra", [("supervised", ()), ("mean_teacher", ()), ("midss", ()), ("ustrun", ()),
                                          ("ustrun", ("method.forward_mode=grouped",))],  # interleaved BN on a CPU
                         ids=["supervised", "mean_teacher", "midss", "ustrun", "ustrun-grouped"])
def test_resume_equals_uninterrupted(tmp_path, tiny_overrides, method, extra):
    if method not in available_methods():
        pytest.skip(f"{method} not registered")
    cfg = _cfg(tiny_overrides, f"method.name={method}", *extra)
    straight = Trainer(cfg, tmp_path / "straight")
    straight.fit()
    assert straight.finished

    cfg = _cfg(tiny_overrides, f"method.name={method}", *extra)
    first = Trainer(cfg, tmp_path / "resumed")
    first.fit(stop_after=3)  # interrupted between checkpoints: the stop writes one
    assert first.iteration == 3 and not first.finished
    del first
    cfg = _cfg(tiny_overrides, f"method.name={method}", *extra)
    second = Trainer(cfg, tmp_path / "resumed", resume=True)
    assert second.iteration == 3
    second.fit()
    assert second.finished
    if extra:  # the grouped forward ran as grouped_norm=auto resolved it here
        assert second.method.student.__dict__["_grouped_norm_setup"]["auto"] == "interleaved"

    a, b = _weights(straight), _weights(second)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{method}: {key} differs after resume"
    assert straight.best == second.best
    records = [json.loads(x) for x in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    iters = [r["iteration"] for r in records if r["kind"] == "train"]
    assert iters == sorted(iters) and len(iters) == len(set(iters)), "log records duplicated after resume"


def test_run_directory_layout(tmp_path, tiny_overrides):
    cfg = _cfg(tiny_overrides, "data.val_fraction=0.25")
    trainer = Trainer(cfg, tmp_path / "run")
    trainer.fit()
    run = tmp_path / "run"
    for name in ("config.yaml", "splits.json", "metrics.jsonl", "checkpoints/last.pt",
                 "checkpoints/best_test.pt", "checkpoints/best_val.pt"):
        assert (run / name).exists(), name
    evals = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in evals if r["kind"] == "eval"]
    assert [r["iteration"] for r in evals] == [4, 8]
    assert all("test_student_dice" in r and "val_student_dice" in r for r in evals)
    best_test = load_checkpoint(run / "checkpoints" / "best_test.pt")
    assert best_test["score"] == pytest.approx(max(r["test_student_dice"] for r in evals))
    assert load_config(run / "config.yaml") == trainer.cfg


def test_atomic_save_keeps_previous_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_atomic({"iteration": 1, "w": torch.ones(3)}, path)

    def broken_save(obj, handle, *a, **k):
        handle.write(b"partial garbage")
        raise KeyboardInterrupt  # the kill arrives mid-write

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(KeyboardInterrupt):
        save_atomic({"iteration": 2}, path)
    monkeypatch.undo()
    assert load_checkpoint(path)["iteration"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"], "temporary file left behind"


def test_sigkill_during_writes_never_corrupts(tmp_path):
    """A writer killed at an arbitrary moment leaves a loadable checkpoint."""
    script = textwrap.dedent(f"""
        import torch, sys
        from medsemi.checkpoints import save_atomic
        i = 0
        while True:
            save_atomic({{"iteration": i, "w": torch.randn(400_000)}}, {str(tmp_path / 'last.pt')!r})
            i += 1
            if i == 1:
                print("ready", flush=True)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    import time

    time.sleep(0.7)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    state = load_checkpoint(tmp_path / "last.pt")
    assert state["iteration"] >= 0 and state["w"].shape == (400_000,)


def test_sigterm_checkpoints_and_resumes(tmp_path, tiny_overrides):
    run = tmp_path / "run"
    args = [sys.executable, "-m", "medsemi.cli", "train", str(DEMO), *tiny_overrides,
            "train.iterations=100000", "train.eval_every=100000", "train.checkpoint_every=100000",
            "--run-dir", str(run)]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    import time

    deadline = time.time() + 120
    while time.time() < deadline and not (run / "metrics.jsonl").exists():
        time.sleep(0.2)
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    assert state["iteration"] > 0
    assert "--resume" in out


def test_schedules_match_spec():
    assert consistency_weight(0, 30000) == pytest.approx(math.exp(-5), abs=1e-6)  # 0.0067
    assert consistency_weight(15000, 30000) == pytest.approx(0.2865, abs=1e-3)
    assert consistency_weight(29999, 30000) == pytest.approx(0.9999, abs=1e-4)
    assert poly_lr(0.03, 0, 100) == 0.03
    assert poly_lr(0.03, 50, 100) == pytest.approx(0.03 * 0.5**0.9)
    assert ema_alpha(0) == 0.0 and ema_alpha(1) == 0.5 and ema_alpha(10_000) == 0.99


def test_ema_parameters_only():
    torch.manual_seed(0)
    student = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2))
    teacher = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2))
    student[1].running_mean.fill_(5.0)
    ema_update(teacher, student, ema_alpha(0))
    for t, s in zip(teacher.parameters(), student.parameters()):
        assert torch.equal(t, s)
    assert torch.equal(teacher[1].running_mean, torch.zeros(2))
    old = [p.clone() for p in teacher.parameters()]
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    ema_update(teacher, student, 0.99)
    for t, o, s in zip(teacher.parameters(), old, student.parameters()):
        assert torch.allclose(t, 0.99 * o + 0.01 * s)


@pytest.mark.parametrize("method, options, own_stats", [
    ("unimatch", [], False),  # default teacher="student": the EMA model is never forwarded
    ("fixmatch", ["method.teacher=student"], False),
    ("fixmatch", [], True),  # teacher="ema" runs in train mode and keeps its own statistics
])
def test_teacher_bn_statistics_follow_the_student_when_never_forwarded(tmp_path, tiny_overrides, method,
                                                                      options, own_stats):
    """A teacher that is only an evaluation average must not keep the initial BN statistics (0, 1)."""
    trainer = Trainer(_cfg(tiny_overrides, f"method.name={method}", "train.iterations=3", *options),
                      tmp_path / "run")
    trainer.fit()
    t_bn = [m for m in trainer.method.teacher.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    s_bn = [m for m in trainer.student.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert t_bn and len(t_bn) == len(s_bn)
    same = all(torch.equal(t.running_mean, s.running_mean) and torch.equal(t.running_var, s.running_var)
               for t, s in zip(t_bn, s_bn))
    moved = all(not torch.equal(t.running_mean, torch.zeros_like(t.running_mean)) for t in t_bn)
    assert moved
    assert same != own_stats


def test_poly_lr_applied_after_each_step(tmp_path, tiny_overrides):
    cfg = _cfg(tiny_overrides, "train.iterations=4")
    trainer = Trainer(cfg, tmp_path / "run")
    trainer.fit()
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(poly_lr(0.03, 3, 4))


def test_fresh_run_refuses_to_overwrite_an_existing_run(tmp_path, tiny_overrides):
    from medsemi.config import ConfigError

    cfg = _cfg(tiny_overrides, "train.iterations=2")
    Trainer(cfg, tmp_path / "run").fit()
    with pytest.raises(ConfigError, match="--resume"):
        Trainer(_cfg(tiny_overrides, "train.iterations=2"), tmp_path / "run")


def test_compile_refused_with_a_reason_where_it_cannot_work(tmp_path, tiny_overrides):
    """UniMatch's eager feature-perturbation pass and a compiled forward of the same BatchNorms cannot share
    one backward (measured: torch raises 'modified by an inplace operation'); the trainer says so up front."""
    from medsemi.config import ConfigError

    cfg = _cfg(tiny_overrides, "method.name=unimatch", "train.compile=true")
    with pytest.raises(ConfigError, match="does not work with method unimatch.*feature_perturbation"):
        Trainer(cfg, tmp_path / "run")
    off = _cfg(tiny_overrides, "method.name=unimatch", "train.compile=true", "method.feature_perturbation=false")
    assert Trainer(off, tmp_path / "run2").method.compile_blocker() is None


def test_compiled_grouped_step_equals_eager(tmp_path, tiny_overrides):
    """MiDSS with forward_mode=grouped under train.compile=true (refused until 2026-12-01, when a
    BackendCompilerFailed had been seen): two compiled steps give the eager steps' losses and weights."""
    results = {}
    for compiled in (False, True):
        cfg = _cfg(tiny_overrides, "method.name=midss", "method.forward_mode=grouped",
                   f"train.compile={str(compiled).lower()}")
        trainer = Trainer(cfg, tmp_path / f"run_{compiled}")
        losses = [trainer.train_step(Progress(it, 8, 4))["loss"] for it in (1, 2)]
        weights = {k.replace("_orig_mod.", ""): v for k, v in _weights(trainer).items()}
        results[compiled] = (torch.stack(losses), weights)
    torch.testing.assert_close(results[True][0], results[False][0], rtol=1e-4, atol=1e-5)
    assert results[True][1].keys() == results[False][1].keys()
    for key, value in results[False][1].items():
        torch.testing.assert_close(results[True][1][key], value, rtol=1e-3, atol=1e-4, msg=key)
